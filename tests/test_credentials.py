"""OpenStack credentials: OS_* variables, clouds.yaml, precise one-line errors, and no secret ever shown."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labctl import credentials, sites
from labctl.credentials import describe, find_openstack_credentials
from labctl.errors import CredentialsError, UserError

SECRET = "s3cr3t-Value-42"
TACC = sites.BUILTIN_SITES["chi@tacc"]
KVM = sites.BUILTIN_SITES["kvm@tacc"]

APP_CRED = {
    "OS_AUTH_TYPE": "v3applicationcredential",
    "OS_AUTH_URL": "https://chi.tacc.chameleoncloud.org:5000/v3",
    "OS_IDENTITY_API_VERSION": "3",
    "OS_REGION_NAME": "CHI@TACC",
    "OS_INTERFACE": "public",
    "OS_APPLICATION_CREDENTIAL_ID": "0123abcd",
    "OS_APPLICATION_CREDENTIAL_SECRET": SECRET,
}
PASSWORD = {
    "OS_AUTH_URL": "https://chi.tacc.chameleoncloud.org:5000/v3",
    "OS_USERNAME": "alice",
    "OS_PASSWORD": SECRET,
    "OS_PROJECT_NAME": "CHI-123456",
    "OS_USER_DOMAIN_NAME": "chameleon",
    "OS_PROJECT_DOMAIN_NAME": "chameleon",
}
OIDC = {  # as Chameleon's OpenRC sets them
    "OS_AUTH_URL": "https://chi.tacc.chameleoncloud.org:5000/v3",
    "OS_IDENTITY_API_VERSION": "3",
    "OS_INTERFACE": "public",
    "OS_PROJECT_ID": "ae76673270164b048b59d3bd30676721",
    "OS_USERNAME": "alice@example.edu",
    "OS_PROTOCOL": "openid",
    "OS_AUTH_TYPE": "v3oidcpassword",
    "OS_PASSWORD": SECRET,
    "OS_IDENTITY_PROVIDER": "chameleon",
    "OS_DISCOVERY_ENDPOINT": "https://auth.chameleoncloud.org/auth/realms/chameleon/.well-known/openid-configuration",
    "OS_CLIENT_ID": "keystone-tacc-prod",
    "OS_ACCESS_TOKEN_TYPE": "access_token",
    "OS_CLIENT_SECRET": "none",
    "OS_REGION_NAME": "CHI@TACC",
}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No clouds.yaml from the real machine: cwd, HOME and /etc/openstack all point into tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(credentials, "SYSTEM_CONFIG_DIR", tmp_path / "etc-openstack")
    return home


def _env(home: Path, **values: str) -> dict[str, str]:
    return {"HOME": str(home), **values}


def _clouds(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


CLOUDS = f"""\
clouds:
  chi-tacc:
    auth:
      auth_url: https://chi.tacc.chameleoncloud.org:5000/v3
      application_credential_id: "abc123"
      application_credential_secret: "{SECRET}"
    region_name: CHI@TACC
    interface: public
    identity_api_version: 3
    auth_type: v3applicationcredential
  kvm-tacc:
    auth:
      auth_url: https://kvm.tacc.chameleoncloud.org:5000/v3
      application_credential_id: "def456"
    region_name: KVM@TACC
    auth_type: v3applicationcredential
"""


def _error(site: sites.Site, env: dict[str, str], cloud: str | None = None) -> str:
    with pytest.raises(CredentialsError) as info:
        find_openstack_credentials(site, cloud, env)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message and SECRET not in message
    return message


# ------------------------------------------------------------------------------------- OS_* env


def test_env_application_credential(isolated: Path) -> None:
    # a leftover project variable must not scope an application credential (Keystone rejects that)
    creds = find_openstack_credentials(TACC, env=_env(isolated, OS_PROJECT_NAME="leftover", **APP_CRED))
    assert creds.source == "OS_* variables (application credential)"
    assert creds.auth_type == "v3applicationcredential"
    assert dict(creds.auth) == {
        "auth_url": "https://chi.tacc.chameleoncloud.org:5000/v3",
        "application_credential_id": "0123abcd",
        "application_credential_secret": SECRET,
    }
    assert creds.region_name == "CHI@TACC" and creds.interface == "public"


def test_env_application_credential_type_is_inferred(isolated: Path) -> None:
    env = {k: v for k, v in APP_CRED.items() if k not in ("OS_AUTH_TYPE", "OS_REGION_NAME")}
    creds = find_openstack_credentials(TACC, env=_env(isolated, **env))
    assert creds.auth_type == "v3applicationcredential"
    assert creds.region_name == "CHI@TACC"  # the site's region when OS_REGION_NAME is not set


def test_env_password(isolated: Path) -> None:
    creds = find_openstack_credentials(TACC, env=_env(isolated, **PASSWORD))
    assert creds.source == "OS_* variables (password)"
    assert creds.auth_type == "password"
    assert creds.auth["username"] == "alice" and creds.auth["project_name"] == "CHI-123456"
    assert creds.auth["user_domain_name"] == "chameleon" and creds.auth["project_domain_name"] == "chameleon"
    assert describe(TACC, env=_env(isolated, **PASSWORD)) == "found: OS_* variables (password)"


def test_env_chameleon_oidc_openrc(isolated: Path) -> None:
    creds = find_openstack_credentials(TACC, env=_env(isolated, **OIDC))
    assert creds.auth_type == "v3oidcpassword"
    assert creds.source == "OS_* variables (v3oidcpassword)"
    for key in (
        "identity_provider",
        "protocol",
        "client_id",
        "client_secret",
        "discovery_endpoint",
        "access_token_type",
        "project_id",
        "username",
        "password",
    ):
        assert key in creds.auth, key
    assert "project_domain_name" not in creds.auth


def test_nothing_set(isolated: Path) -> None:
    assert _error(TACC, _env(isolated)) == (
        "no credentials for chi@tacc: set OS_CLOUD or source an openrc file (OS_AUTH_URL is not set)"
    )
    assert describe(TACC, env=_env(isolated)) == (
        "missing: set OS_CLOUD or source an openrc file (OS_AUTH_URL is not set)"
    )


def test_missing_application_credential_secret(isolated: Path) -> None:
    env = {k: v for k, v in APP_CRED.items() if k != "OS_APPLICATION_CREDENTIAL_SECRET"}
    assert _error(TACC, _env(isolated, **env)) == (
        "no credentials for chi@tacc: OS_AUTH_URL is set but OS_APPLICATION_CREDENTIAL_SECRET is missing "
        "(source your openrc again)"
    )


def test_missing_password_pieces(isolated: Path) -> None:
    env = {k: v for k, v in PASSWORD.items() if k not in ("OS_PASSWORD", "OS_PROJECT_NAME")}
    assert _error(TACC, _env(isolated, **env)) == (
        "no credentials for chi@tacc: OS_AUTH_URL is set but OS_PASSWORD and OS_PROJECT_NAME "
        "(or OS_PROJECT_ID) are missing (source your openrc again)"
    )
    env = {k: v for k, v in OIDC.items() if k != "OS_PASSWORD"}
    assert "but OS_PASSWORD is missing" in _error(TACC, _env(isolated, **env))


def test_credentials_are_per_site(isolated: Path) -> None:
    message = _error(KVM, _env(isolated, **APP_CRED))
    assert message.startswith(
        "no credentials for kvm@tacc: OS_AUTH_URL points to chi.tacc.chameleoncloud.org, "
        "not kvm.tacc.chameleoncloud.org"
    )
    env = dict(APP_CRED, OS_REGION_NAME="CHI@UC")
    assert "OS_REGION_NAME is CHI@UC, but chi@tacc is region CHI@TACC" in _error(TACC, _env(isolated, **env))


def test_emulated_site_skips_the_host_check(isolated: Path) -> None:
    sim = sites.resolve("sim:chi@tacc")
    env = dict(APP_CRED, OS_AUTH_URL="http://127.0.0.1:40000/v3")
    assert find_openstack_credentials(sim, env=_env(isolated, **env)).auth_url == "http://127.0.0.1:40000/v3"


# ----------------------------------------------------------------------------------- clouds.yaml


def test_clouds_yaml_with_os_cloud(isolated: Path) -> None:
    _clouds(isolated / ".config" / "openstack" / "clouds.yaml", CLOUDS)
    env = _env(isolated, OS_CLOUD="chi-tacc", **PASSWORD)  # OS_CLOUD wins over OS_* variables
    creds = find_openstack_credentials(TACC, env=env)
    assert creds.source == "clouds.yaml: ~/.config/openstack/clouds.yaml cloud 'chi-tacc'"
    assert creds.auth_type == "v3applicationcredential" and creds.cloud == "chi-tacc"
    assert creds.auth["application_credential_secret"] == SECRET
    assert creds.region_name == "CHI@TACC"
    assert describe(TACC, env=env) == "found: clouds.yaml: ~/.config/openstack/clouds.yaml cloud 'chi-tacc'"


def test_clouds_yaml_search_order(isolated: Path, tmp_path: Path) -> None:
    _clouds(isolated / ".config" / "openstack" / "clouds.yaml", CLOUDS)
    _clouds(Path("clouds.yaml"), CLOUDS)
    assert find_openstack_credentials(TACC, "chi-tacc", _env(isolated)).source == (
        "clouds.yaml: ./clouds.yaml cloud 'chi-tacc'"
    )
    explicit = _clouds(tmp_path / "elsewhere" / "my-clouds.yaml", CLOUDS)
    env = _env(isolated, OS_CLIENT_CONFIG_FILE=str(explicit))
    assert str(explicit) in find_openstack_credentials(TACC, "chi-tacc", env).source


def test_secure_yaml_is_merged(isolated: Path) -> None:
    directory = isolated / ".config" / "openstack"
    _clouds(directory / "clouds.yaml", CLOUDS)
    _clouds(
        directory / "secure.yaml",
        f"clouds:\n  kvm-tacc:\n    auth:\n      application_credential_secret: {SECRET}\n",
    )
    creds = find_openstack_credentials(KVM, "kvm-tacc", _env(isolated))
    assert creds.auth["application_credential_secret"] == SECRET
    assert creds.auth["application_credential_id"] == "def456"


def test_clouds_yaml_problems(isolated: Path) -> None:
    assert _error(TACC, _env(isolated, OS_CLOUD="chi-tacc")).startswith(
        "no credentials for chi@tacc: OS_CLOUD=chi-tacc but no clouds.yaml was found "
        "(looked in ./clouds.yaml, ~/.config/openstack/clouds.yaml, "
    )
    _clouds(isolated / ".config" / "openstack" / "clouds.yaml", CLOUDS)
    assert _error(TACC, _env(isolated), cloud="chi-tac") == (
        "no credentials for chi@tacc: --cloud chi-tac was given but ~/.config/openstack/clouds.yaml has no "
        "cloud 'chi-tac' (clouds there: chi-tacc, kvm-tacc) (did you mean 'chi-tacc'?)"
    )
    assert _error(KVM, _env(isolated, OS_CLOUD="kvm-tacc")) == (
        "no credentials for kvm@tacc: ~/.config/openstack/clouds.yaml cloud 'kvm-tacc': "
        "auth.application_credential_secret is missing"
    )
    assert "credentials are per site" in _error(KVM, _env(isolated, OS_CLOUD="chi-tacc"))


@pytest.mark.parametrize(("content", "expected"), [
    # PyYAML's own SafeLoader fails with an AttributeError on the first, a RecursionError on the deep one
    ("clouds: !!timestamp 2001-13-45# x\n", "clouds.yaml:1:9: YAML value error: not a timestamp: '2001-13-45# x'"),
    ("clouds:\n  chi-tacc: !!timestamp 2001-02-30\n",
     "clouds.yaml:2:13: YAML value error: '2001-02-30' is not a valid !!timestamp (day is out of range for month)"),
    ("[" * 10_000, "clouds.yaml:1:33: YAML syntax error: nested more than 32 levels deep"),
    ("clouds: {chi-tacc: x\n", "clouds.yaml:2:1: YAML syntax error: expected ',' or '}', but got '<stream end>'"),
    (b"clouds: \xff\n", "clouds.yaml: not UTF-8 text"),
    ("# " + "x" * (1 << 20), "clouds.yaml: 1,048,578 bytes is too large for a config file (limit 1 MiB)"),
    ("clouds:\n  chi-tacc:\n    auth: !!int\n", "clouds.yaml:3:11: YAML value error: '' is not a valid !!int"),
    ("- clouds\n", "clouds.yaml: expected a mapping with a 'clouds' key"),
])
def test_a_broken_clouds_yaml_is_a_one_line_error(isolated: Path, content: str | bytes, expected: str) -> None:
    path = isolated / ".config" / "openstack" / "clouds.yaml"
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = _error(TACC, _env(isolated, OS_CLOUD="chi-tacc"))
    assert message.startswith(f"no credentials for chi@tacc: ~/.config/openstack/{expected}"), message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list("clouds:chi-tac{}[]!&*#|>'\"\n -0123456789.") + ["!!timestamp ", "!!int ",
       "!!float ", "!!binary ", "!!python/name:os.system ", "auth:\n    ", "\u00e9", "\t"]), max_size=60).map("".join))
def test_any_clouds_yaml_gives_credentials_or_a_one_line_error(isolated: Path, text: str) -> None:
    path = isolated / ".config" / "openstack" / "clouds.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("clouds:\n  chi-tacc:\n    " + text, encoding="utf-8")
    try:
        find_openstack_credentials(TACC, None, _env(isolated, OS_CLOUD="chi-tacc"))
    except CredentialsError as exc:
        assert "\n" not in str(exc)


# ------------------------------------------------------------------------------------- secrets


def test_secrets_never_shown(isolated: Path) -> None:
    for env in (APP_CRED, PASSWORD, OIDC):
        creds = find_openstack_credentials(TACC, env=_env(isolated, **env))
        for text in (
            repr(creds),
            str(creds),
            repr(creds.auth),
            str(creds.auth),
            f"{creds}",
            describe(TACC, env=_env(isolated, **env)),
        ):
            assert SECRET not in text
        assert "***" in repr(creds)
    _clouds(isolated / ".config" / "openstack" / "clouds.yaml", CLOUDS)
    creds = find_openstack_credentials(TACC, "chi-tacc", _env(isolated))
    assert SECRET not in repr(creds) and SECRET not in str(creds.auth)
    # errors raised while a secret is set never include it (_error checks every message)
    _error(KVM, _env(isolated, **APP_CRED))
    _error(TACC, _env(isolated, **{k: v for k, v in PASSWORD.items() if k != "OS_USERNAME"}))
    _error(KVM, _env(isolated, OS_CLOUD="chi-tacc"))
