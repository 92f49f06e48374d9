"""OpenStack credentials for a Chameleon site, and where they came from.

Sources, in the order the OpenStack clients use:

1. `--cloud NAME` or `OS_CLOUD=NAME`: that entry of the first clouds.yaml found (`$OS_CLIENT_CONFIG_FILE`,
   `./clouds.yaml`, `~/.config/openstack/clouds.yaml`, `/etc/openstack/clouds.yaml`), merged with the same
   entry of secure.yaml if there is one.
2. `OS_*` variables, as an openrc file sets them (application credential, password, or Chameleon's
   `v3oidcpassword`).

Credentials are per site: an `auth_url` for another site's Keystone is an error, not a silent mismatch.
No secret ever appears in a message, an exception or a `repr`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from labctl.errors import CredentialsError, UserError

if TYPE_CHECKING:
    from labctl.sites import Site

#: Where clouds.yaml lives system-wide (a module attribute so tests can move it).
SYSTEM_CONFIG_DIR = Path("/etc/openstack")

_SECRET_WORDS = ("password", "secret", "token", "otp")

# keystoneauth plugin options (loading.get_plugin_loader(name).get_options()), without importing it.
_SCOPE = (
    "auth_url",
    "system_scope",
    "domain_id",
    "domain_name",
    "project_id",
    "project_name",
    "project_domain_id",
    "project_domain_name",
    "trust_id",
)
_USER = ("user_id", "username", "user_domain_id", "user_domain_name")
_DEFAULT_DOMAIN = ("default_domain_id", "default_domain_name")
_OIDC = (
    "identity_provider",
    "protocol",
    "client_id",
    "client_secret",
    "scope",
    "access_token_endpoint",
    "discovery_endpoint",
    "access_token_type",
    "username",
    "password",
    "idp_otp_key",
)
PLUGIN_OPTIONS: dict[str, tuple[str, ...]] = {
    "password": (*_SCOPE, *_DEFAULT_DOMAIN, *_USER, "password"),
    "v3password": (*_SCOPE, *_USER, "password"),
    # no project/domain scope: an application credential carries its own, and Keystone rejects another
    "v3applicationcredential": (
        "auth_url",
        *_USER,
        "application_credential_secret",
        "application_credential_id",
        "application_credential_name",
    ),
    "v3oidcpassword": (*_SCOPE, *_OIDC),
    "token": (*_SCOPE, *_DEFAULT_DOMAIN, "token"),
    "v3token": (*_SCOPE, "token"),
}
_ALL_OPTIONS = tuple(dict.fromkeys(o for opts in PLUGIN_OPTIONS.values() for o in opts))
# Legacy and alternative variable names (the default is OS_<OPTION>).
_ENV_ALIASES = {
    "project_name": ("OS_PROJECT_NAME", "OS_TENANT_NAME"),
    "project_id": ("OS_PROJECT_ID", "OS_TENANT_ID"),
    "scope": ("OS_OPENID_SCOPE",),
}
# What each kind of plugin needs beyond auth_url: groups of alternatives (any one of a group will do).
_APP_CRED_KIND = "application credential"
_KIND_BY_TYPE = {
    "v3applicationcredential": _APP_CRED_KIND,
    "applicationcredential": _APP_CRED_KIND,
    "application_credential": _APP_CRED_KIND,
    "password": "password",
    "v3password": "password",
    "v3oidcpassword": "v3oidcpassword",
    "token": "token",
    "v3token": "token",
}


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_WORDS)


class RedactedDict(dict):
    """A dict (keystoneauth kwargs) whose repr/str hide secret values."""

    def __repr__(self) -> str:
        items = ", ".join(f"{k!r}: {'***' if _is_secret(str(k)) else repr(v)}" for k, v in self.items())
        return "{" + items + "}"

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class Credentials:
    """What to give keystoneauth: `auth_type` and `auth` (plugin kwargs), plus region and interface."""

    source: str  # human description, never a secret
    auth: Mapping[str, Any]
    auth_type: str
    region_name: str | None = None
    interface: str = "public"
    cloud: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # other clouds.yaml settings (verify, cacert, ...)

    @property
    def auth_url(self) -> str:
        return str(self.auth.get("auth_url", ""))

    def __repr__(self) -> str:
        return (
            f"Credentials(source={self.source!r}, auth_type={self.auth_type!r}, "
            f"region_name={self.region_name!r}, interface={self.interface!r}, "
            f"auth={RedactedDict(self.auth)!r})"
        )

    def __str__(self) -> str:
        return self.source

    def session(self) -> Any:
        """A keystoneauth1 Session for these credentials (imports keystoneauth1 only when called)."""
        from keystoneauth1 import loading, session

        plugin = loading.get_plugin_loader(self.auth_type).load_from_options(**dict(self.auth))
        verify: Any = self.extra.get("cacert") or self.extra.get("verify", True)
        return session.Session(auth=plugin, verify=verify)


# ------------------------------------------------------------------------------------------ helpers


def _fail(site: Site, detail: str) -> CredentialsError:
    return CredentialsError(" ".join(f"no credentials for {site.name}: {detail}".split()))


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _tilde(path: Path, env: Mapping[str, str]) -> str:
    home = str(_home(env))
    text = str(path)
    if home not in ("", "/") and text.startswith(home + os.sep):
        return "~" + text[len(home) :]
    if not path.is_absolute():
        return text if text.startswith(".") else f"./{text}"
    return text


def _host(url: str) -> str:
    try:
        return (urlparse(url).hostname or "").lower()
    except ValueError:
        return ""


def _kind(auth_type: str) -> str:
    return _KIND_BY_TYPE.get(auth_type.lower().replace("-", ""), auth_type)


def _requirements(kind: str, auth: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Groups of option names, one of each group needed, for this kind of plugin and what is set."""
    if kind == _APP_CRED_KIND:
        need: list[tuple[str, ...]] = [("application_credential_secret",)]
        if not auth.get("application_credential_id"):
            need.append(("application_credential_id", "application_credential_name"))
            if auth.get("application_credential_name"):
                need.append(("username", "user_id"))
        return need
    if kind == "password":
        need = [("username", "user_id"), ("password",), ("project_name", "project_id")]
        if auth.get("username") and not auth.get("user_id"):
            need.append(("user_domain_name", "user_domain_id", *_DEFAULT_DOMAIN))
        if auth.get("project_name") and not auth.get("project_id"):
            need.append(("project_domain_name", "project_domain_id", *_DEFAULT_DOMAIN))
        return need
    if kind == "v3oidcpassword":
        return [
            ("username",),
            ("password",),
            ("identity_provider",),
            ("protocol",),
            ("discovery_endpoint", "access_token_endpoint"),
            ("project_id", "project_name"),
        ]
    if kind == "token":
        return [("token",)]
    return []


def _missing(need: list[tuple[str, ...]], auth: Mapping[str, Any]) -> list[tuple[str, ...]]:
    return [group for group in need if not any(auth.get(o) not in (None, "") for o in group)]


def _names(groups: list[tuple[str, ...]], spell: Any) -> str:
    parts = []
    for group in groups:
        first, *rest = group
        parts.append(spell(first) + (f" (or {', '.join(spell(o) for o in rest)})" if rest else ""))
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text} {'is' if len(parts) == 1 else 'are'} missing"


def _env_names(option: str) -> tuple[str, ...]:
    return _ENV_ALIASES.get(option, (f"OS_{option.upper()}",))


def _check_site(
    site: Site, auth_url: str, region: str | None, url_field: str, region_field: str, hint: str
) -> None:
    want = _host(site.auth_url)
    have = _host(auth_url)
    if want and have != want:
        raise _fail(
            site,
            f"{url_field} points to {have or 'an invalid URL'}, not {want} "
            f"(credentials are per site; {hint})",
        )
    if region and site.region and not site.emulated and region.lower() != site.region.lower():
        raise _fail(site, f"{region_field} is {region}, but {site.name} is region {site.region} ({hint})")


# ----------------------------------------------------------------------------------------- OS_* env


def _from_env(site: Site, env: Mapping[str, str]) -> Credentials:
    auth_url = env.get("OS_AUTH_URL", "").strip()
    if not auth_url:
        raise _fail(site, "set OS_CLOUD or source an openrc file (OS_AUTH_URL is not set)")
    values: dict[str, str] = {}
    for option in _ALL_OPTIONS:
        for name in _env_names(option):
            if env.get(name):
                values[option] = env[name]
                break
    auth_type = env.get("OS_AUTH_TYPE", "").strip().lower()
    if not auth_type:
        app_cred = any(k.startswith("application_credential") for k in values)
        auth_type = (
            "v3applicationcredential"
            if app_cred
            else ("token" if "token" in values and "password" not in values else "password")
        )
    region = env.get("OS_REGION_NAME") or None
    _check_site(
        site, auth_url, region, "OS_AUTH_URL", "OS_REGION_NAME", f"source the openrc file for {site.name}"
    )
    kind = _kind(auth_type)
    missing = _missing(_requirements(kind, values), values)
    if missing:
        names = _names(missing, lambda o: _env_names(o)[0])
        raise _fail(site, f"OS_AUTH_URL is set but {names} (source your openrc again)")
    allowed = PLUGIN_OPTIONS.get(auth_type, _ALL_OPTIONS)
    auth = RedactedDict({k: v for k, v in values.items() if k in allowed})
    auth["auth_url"] = auth_url
    return Credentials(
        source=f"OS_* variables ({kind})",
        auth=auth,
        auth_type=auth_type,
        region_name=region or site.region or None,
        interface=env.get("OS_INTERFACE") or "public",
    )


# ------------------------------------------------------------------------------------- clouds.yaml


def config_files(name: str, env: Mapping[str, str], override: str | None = None) -> list[Path]:
    """Where the OpenStack clients look for clouds.yaml / secure.yaml, in order."""
    xdg = env.get("XDG_CONFIG_HOME")
    user_dir = Path(xdg) / "openstack" if xdg else _home(env) / ".config" / "openstack"
    paths = [Path(env[override])] if override and env.get(override) else []
    for directory in (Path("."), user_dir, SYSTEM_CONFIG_DIR):
        for ext in ("yaml", "yml"):
            paths.append(directory / f"{name}.{ext}")
    return paths


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _load_cloud_file(path: Path, site: Site, env: Mapping[str, str]) -> dict[str, Any]:
    import yaml

    from labctl import inputs
    from labctl.profile_yaml import GuardedSafeLoader, yaml_error_parts

    shown = _tilde(path, env)
    try:
        text = inputs.read_regular_file(path, inputs.MAX_PROFILE_BYTES, "config file", shown=shown).decode("utf-8")
        # read as openstacksdk reads it (YAML 1.1, safe), but a hostile file ends in a YAMLError, not a traceback
        data = yaml.load(text, Loader=GuardedSafeLoader)  # noqa: S506 - a SafeLoader
    except UserError as exc:
        raise _fail(site, str(exc)) from None
    except UnicodeDecodeError:
        raise _fail(site, f"{shown}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        where, problem = yaml_error_parts(shown, exc, "invalid")
        raise _fail(site, f"{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("clouds", {}), dict):
        raise _fail(site, f"{_tilde(path, env)}: expected a mapping with a 'clouds' key")
    return data.get("clouds") or {}


def _from_clouds_yaml(site: Site, cloud: str, env: Mapping[str, str], how: str) -> Credentials:
    searched = config_files("clouds", env, "OS_CLIENT_CONFIG_FILE")
    found = next((p for p in searched if p.is_file()), None)
    if found is None:
        looked = ", ".join(dict.fromkeys(_tilde(p, env) for p in searched if p.suffix == ".yaml"))
        raise _fail(site, f"{how} but no clouds.yaml was found (looked in {looked})")
    shown = _tilde(found, env)
    clouds = _load_cloud_file(found, site, env)
    if cloud not in clouds:
        names = ", ".join(map(str, clouds)) or "none"
        import difflib

        match = difflib.get_close_matches(cloud, list(map(str, clouds)), n=1, cutoff=0.6)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise _fail(site, f"{how} but {shown} has no cloud '{cloud}' (clouds there: {names}){hint}")
    entry = clouds[cloud] or {}
    if not isinstance(entry, dict):
        raise _fail(site, f"{shown}: clouds.{cloud} should be a mapping")
    secure = next((p for p in config_files("secure", env, "OS_CLIENT_SECURE_FILE") if p.is_file()), None)
    if secure is not None:
        extra = _load_cloud_file(secure, site, env).get(cloud)
        if isinstance(extra, dict):
            entry = _merge(entry, extra)
    source = f"clouds.yaml: {shown} cloud '{cloud}'"
    raw_auth = entry.get("auth") or {}
    if not isinstance(raw_auth, dict):
        raise _fail(site, f"{shown}: clouds.{cloud}.auth should be a mapping")
    values = {str(k): v for k, v in raw_auth.items() if v not in (None, "")}
    auth_url = str(values.get("auth_url", "")).strip()
    if not auth_url:
        raise _fail(site, f"{shown} cloud '{cloud}' has no auth.auth_url")
    auth_type = str(entry.get("auth_type") or "").strip().lower()
    if not auth_type:
        app_cred = any(k.startswith("application_credential") for k in values)
        auth_type = "v3applicationcredential" if app_cred else "password"
    region = entry.get("region_name")
    if not region and isinstance(entry.get("regions"), list) and entry["regions"]:
        first = entry["regions"][0]
        region = first.get("name") if isinstance(first, dict) else first
    region = str(region) if region else None
    _check_site(
        site,
        auth_url,
        region,
        f"{shown} cloud '{cloud}': auth.auth_url",
        f"{shown} cloud '{cloud}': region_name",
        f"use a clouds.yaml entry for {site.name}",
    )
    kind = _kind(auth_type)
    missing = _missing(_requirements(kind, values), values)
    if missing:
        names = _names(missing, lambda o: f"auth.{o}")
        raise _fail(site, f"{shown} cloud '{cloud}': {names}")
    auth = RedactedDict(values)
    auth["auth_url"] = auth_url
    extra = {k: entry[k] for k in ("verify", "cacert", "identity_api_version") if k in entry}
    return Credentials(
        source=source,
        auth=auth,
        auth_type=auth_type,
        region_name=region or site.region or None,
        interface=str(entry.get("interface") or "public"),
        cloud=cloud,
        extra=extra,
    )


# ---------------------------------------------------------------------------------------------- API


def find_openstack_credentials(
    site: Site, cloud: str | None = None, env: Mapping[str, str] = os.environ
) -> Credentials:
    """Credentials for `site`: --cloud / OS_CLOUD (clouds.yaml), else OS_* variables.

    Raises `CredentialsError` (one line naming exactly what is missing, never a secret). The secret values
    found are registered with `labctl.redact` at once: masked in whatever labctl prints or logs from then on
    (a cloud's error body that echoes the request included).
    """
    if cloud:
        creds = _from_clouds_yaml(site, cloud, env, f"--cloud {cloud} was given")
    elif env.get("OS_CLOUD", "").strip():
        name = env["OS_CLOUD"].strip()
        creds = _from_clouds_yaml(site, name, env, f"OS_CLOUD={name}")
    else:
        creds = _from_env(site, env)
    register_secrets(creds.auth)
    return creds


def register_secrets(auth: Mapping[str, Any]) -> None:
    """Register the secret values of keystoneauth options (password, application credential secret, token,
    client secret, ...) with `labctl.redact`; endpoints and types are not secrets."""
    from labctl.redact import register_secret

    for key, value in auth.items():
        if _is_secret(str(key)) and not str(key).endswith(("_endpoint", "_type")) and isinstance(value, str | bytes):
            register_secret(value)


def describe(site: Site, cloud: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """One line for `labctl sites`: 'found: <source>' or 'missing: <what>'."""
    try:
        creds = find_openstack_credentials(site, cloud, env)
    except CredentialsError as exc:
        text = str(exc)
        prefix = f"no credentials for {site.name}: "
        return "missing: " + (text[len(prefix) :] if text.startswith(prefix) else text)
    return f"found: {creds.source}"
