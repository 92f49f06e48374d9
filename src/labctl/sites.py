"""Sites: where a lab can run. Built-in Chameleon sites, user sites from sites.yaml, and emulated stand-ins.

`resolve("chi@tacc")` gives the real site; `resolve("sim", profile)` the emulated stand-in for the profile's
first Chameleon site; `resolve("sim:chi@uc")` an explicit one. User sites live in
`<user config dir>/labctl/sites.yaml` (or `$LABCTL_CONFIG_DIR/sites.yaml`)::

    my-tacc:                 # a new name ...
      base: chi@tacc         # ... inheriting everything from a known site
      images: {ubuntu-24.04-ml: my-snapshot}
    chi@uc:                  # or a built-in name: change some of its settings
      network: sharednet2
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from labctl.errors import UserError

#: Abstract image name -> Chameleon image name, for bare-metal and KVM sites.
CHAMELEON_IMAGES: Mapping[str, str] = MappingProxyType(
    {
        "ubuntu-24.04": "CC-Ubuntu24.04",
        "ubuntu-24.04-cuda": "CC-Ubuntu24.04-CUDA",
        "ubuntu-24.04-rocm": "CC-Ubuntu24.04-ROCm",
        "ubuntu-22.04": "CC-Ubuntu22.04",
        "ubuntu-22.04-cuda": "CC-Ubuntu22.04-CUDA",
    }
)
_NO_IMAGES: Mapping[str, str] = MappingProxyType({})

FAMILY_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "chi": {"reservation": "host", "security_groups": False, "images": CHAMELEON_IMAGES},
        "kvm": {"reservation": "flavor", "security_groups": True, "images": CHAMELEON_IMAGES},
        "edge": {"reservation": "device", "security_groups": False, "images": _NO_IMAGES},
    }
)
SIM = "sim"
SIM_POLL_INTERVAL = 0.05
_NAME = re.compile(r"^[a-z0-9][a-z0-9@._-]{0,63}$")


@dataclass(frozen=True)
class Site:
    """One place labs run: its endpoint and the defaults that go with it."""

    name: str  # chi@tacc, kvm@tacc, sim:chi@uc, or a user site's name
    provider: str  # "chameleon"
    family: str  # "chi" (bare metal) | "kvm" | "edge"
    region: str  # "CHI@TACC"
    auth_url: str  # Keystone v3; "" for an emulated site until the testbed fills it in
    reservation: str = "host"  # "host" | "flavor" | "device" | "none"
    ssh_user: str = "cc"
    ssh_port: int = 22
    network: str = "sharednet1"
    public_network: str = "public"
    security_groups: bool = False  # bare-metal sites do not use security groups
    images: Mapping[str, str] = field(default_factory=lambda: CHAMELEON_IMAGES, hash=False)
    poll_interval: float = 5.0
    emulated: bool = False
    stands_for: str | None = None  # for sim: the real site's name
    max_lease_hours: float = 168
    catalog: str | None = None  # which labctl.hardware catalog lists its node types (default: the real name)
    zone: str | None = None  # AWS/GCP: a zone pinned by the site name (else any zone of the region)
    block_storage: bool = False  # block volumes (Cinder on Chameleon KVM; EBS / persistent disks on AWS / GCP)
    # The object store labctl makes containers in: "swift" (the site's own `object-store` catalog entry) or None.
    object_storage: str | None = None

    @property
    def real_name(self) -> str:
        """The Chameleon site this is (itself, or what a sim site stands for)."""
        return self.stands_for or self.name

    def image(self, abstract: str) -> str:
        """Concrete image name for an abstract one (unknown names pass through unchanged)."""
        return self.images.get(abstract, abstract)


def _chameleon(name: str, family: str, region: str, host: str, *, block_storage: bool = False,
               object_storage: str | None = None) -> Site:
    defaults = FAMILY_DEFAULTS[family]
    return Site(
        name=name,
        provider="chameleon",
        family=family,
        region=region,
        auth_url=f"https://{host}:5000/v3",
        reservation=defaults["reservation"],
        security_groups=defaults["security_groups"],
        images=defaults["images"],
        block_storage=block_storage,
        object_storage=object_storage,
    )


#: Abstract image names on AWS and GCP; each adapter finds the concrete image (newest matching AMI, image family).
CLOUD_IMAGES: Mapping[str, str] = MappingProxyType({k: k for k in CHAMELEON_IMAGES})

_AWS_REGION = re.compile(r"^(?P<region>[a-z]{2}(-gov)?-[a-z]+-\d)(?P<zone>[a-z])?$")
_GCP_ZONE = re.compile(r"^(?P<region>[a-z]+-[a-z]+\d+)(?P<zone>-[a-z])?$")
DEFAULT_CLOUD_SITES = {"aws": "aws:us-east-1", "gcp": "gcp:us-central1-a"}
SIM_CLOUD_SITES = {"sim-aws": "aws:us-east-1", "sim-gcp": "gcp:us-central1-a"}


def _commercial(name: str) -> Site | None:
    """aws:<region>|aws:<zone>|gcp:<zone>|gcp:<region>, or None if the name is not of that form."""
    provider, _, where = name.partition(":")
    if provider == "aws" and (m := _AWS_REGION.match(where)):
        region, zone = m.group("region"), (where if m.group("zone") else None)
        return Site(name=name, provider="aws", family="aws", region=region, auth_url="", reservation="none",
                    ssh_user="ubuntu", network="", public_network="", security_groups=True,
                    images=CLOUD_IMAGES, catalog="aws", zone=zone, block_storage=True,
                    object_storage="s3")
    if provider == "gcp" and (m := _GCP_ZONE.match(where)):
        region, zone = m.group("region"), (where if m.group("zone") else None)
        return Site(name=name, provider="gcp", family="gcp", region=region, auth_url="", reservation="none",
                    ssh_user="labctl", network="default", public_network="", security_groups=True,
                    images=CLOUD_IMAGES, catalog="gcp", zone=zone, block_storage=True)
    if provider in ("aws", "gcp"):
        example = "aws:us-east-1 or aws:us-east-1a" if provider == "aws" else "gcp:us-central1-a or gcp:us-central1"
        raise UserError(f"unknown site '{name}': expected {example}")
    return None


BUILTIN_SITES: dict[str, Site] = {
    s.name: s
    for s in (
        # Object store: on real Chameleon the course's containers live in the Swift of CHI@TACC / CHI@UC; labctl
        # makes a lab's containers in the `object-store` entry of the lab's own site's Keystone catalog.
        # Block storage (Cinder): KVM@TACC only; the bare-metal sites have none.
        _chameleon("chi@tacc", "chi", "CHI@TACC", "chi.tacc.chameleoncloud.org", object_storage="swift"),
        _chameleon("chi@uc", "chi", "CHI@UC", "chi.uc.chameleoncloud.org", object_storage="swift"),
        _chameleon("kvm@tacc", "kvm", "KVM@TACC", "kvm.tacc.chameleoncloud.org", block_storage=True,
                   object_storage="swift"),
        _chameleon("chi@edge", "edge", "CHI@Edge", "chi.edge.chameleoncloud.org"),
    )
}


# ---------------------------------------------------------------------------------------- user sites


def config_dir() -> Path:
    """labctl's config directory: $LABCTL_CONFIG_DIR, else the platform's user config dir."""
    if env := os.environ.get("LABCTL_CONFIG_DIR"):
        return Path(env)
    from platformdirs import user_config_dir

    return Path(user_config_dir("labctl"))


def sites_file() -> Path:
    return config_dir() / "sites.yaml"


def _shown(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if home != "/" and text.startswith(home + os.sep) else text


def _user_site_model() -> Any:
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class UserSite(BaseModel):
        model_config = ConfigDict(extra="forbid")
        base: str | None = None
        provider: Literal["chameleon"] | None = None
        family: Literal["chi", "kvm", "edge"] | None = None
        region: str | None = Field(None, min_length=1)
        auth_url: str | None = Field(None, pattern=r"^https?://[^/\s]+")
        reservation: Literal["host", "flavor", "device", "none"] | None = None
        ssh_user: str | None = Field(None, min_length=1)
        ssh_port: int | None = Field(None, ge=1, le=65535)
        network: str | None = Field(None, min_length=1)
        public_network: str | None = Field(None, min_length=1)
        security_groups: bool | None = None
        images: dict[str, str] | None = None
        # Finite and bounded: a poll every hour at most; no cloud offers leases longer than 120 days (GCE's
        # maxRunDuration limit), Chameleon's sites 7 days.
        poll_interval: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False)
        max_lease_hours: float | None = Field(None, ge=1, le=2880, allow_inf_nan=False)

    return UserSite


def load_user_sites(path: Path | None = None) -> dict[str, Site]:
    """Sites defined in sites.yaml (name -> Site); {} if there is no file. Errors are one-line UserErrors."""
    path = path or sites_file()
    if not path.is_file():
        return {}
    from pydantic import ValidationError

    from labctl.errors import ProfileError
    from labctl.profile import format_validation_error, read_yaml

    shown = _shown(path)
    try:
        data = read_yaml(path, what="a mapping of site name -> settings", shown=shown)
    except ProfileError as exc:
        raise UserError(str(exc)) from None
    if not isinstance(data, dict):
        raise UserError(f"{shown}: the top level must be a mapping of site name -> settings")
    model = _user_site_model()
    raw: dict[str, Any] = {}
    for name, fields in data.items():
        key = str(name).strip().lower()
        if not _NAME.match(key) or key == SIM or ":" in key:
            raise UserError(
                f"{shown}: {name}: site names are lower-case letters, digits and @ . _ - "
                "(and may not be 'sim' or contain ':')"
            )
        if not isinstance(fields, dict):
            raise UserError(f"{shown}: {name}: should be a mapping of settings (base, auth_url, ...)")
        try:
            raw[key] = model.model_validate(fields)
        except ValidationError as exc:
            raise UserError(f"{shown}: {key}.{format_validation_error(exc, model)}") from None

    built: dict[str, Site] = {}

    def build(key: str, chain: tuple[str, ...]) -> Site:
        if key in built:
            return built[key]
        spec = raw[key]
        base_name = (spec.base or "").strip().lower() or None
        if base_name is None and key in BUILTIN_SITES:
            base_name = key
        if base_name in chain:
            raise UserError(f"{shown}: {key}.base: circular base ({' -> '.join((*chain, base_name))})")
        base: Site | None = None
        if base_name is not None:
            if base_name in raw and base_name != key:
                base = build(base_name, (*chain, key))
            elif base_name in BUILTIN_SITES:
                base = BUILTIN_SITES[base_name]
            else:
                known = sorted({*BUILTIN_SITES, *raw} - {key})
                raise UserError(
                    f"{shown}: {key}.base: unknown site '{base_name}' (known: {', '.join(known)})"
                    + _did_you_mean(base_name, known)
                )
        values = spec.model_dump(exclude_none=True, exclude={"base"})
        user_images = values.pop("images", {})
        if base is None:
            missing = [f for f in ("family", "region", "auth_url") if f not in values]
            if missing:
                raise UserError(
                    f"{shown}: {key}: {', '.join(missing)} missing (or set 'base: chi@tacc' to inherit)"
                )
            family = values["family"]
            site = Site(
                name=key,
                provider="chameleon",
                family=family,
                region=values["region"],
                auth_url=values["auth_url"],
                **FAMILY_DEFAULTS[family],
            )
        else:
            site = dataclasses.replace(base, name=key, catalog=base.catalog or base.name)
            if values.get("family", base.family) != base.family:
                site = dataclasses.replace(site, **FAMILY_DEFAULTS[values["family"]])
        site = dataclasses.replace(site, **values, images=MappingProxyType({**site.images, **user_images}))
        if site.catalog == key:
            site = dataclasses.replace(site, catalog=None)
        built[key] = site
        return site

    for key in raw:
        build(key, ())
    return built


# ------------------------------------------------------------------------------------------ resolve


def _did_you_mean(word: str, choices: list[str]) -> str:
    import difflib  # only for a mistyped name: the CLI imports this module at every start (--site's help)

    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _all_sites() -> dict[str, Site]:
    sites = dict(BUILTIN_SITES)
    sites.update(load_user_sites())
    return sites


def known_sites() -> list[Site]:
    """Built-in sites (as changed by sites.yaml), then the user's own."""
    return list(_all_sites().values())


def usable(site: Site) -> bool:
    """Whether labctl can run a lab there: CHI@Edge leases devices (containers), not servers."""
    return site.reservation != "device" and site.family != "edge"


def usable_sites() -> list[Site]:
    """The known sites a lab can run at (`labctl sites`, the unknown-site error, `--site`'s help)."""
    return [s for s in known_sites() if usable(s)]


#: The emulated stand-ins, by --site value: what each one emulates.
EMULATED_SITES: Mapping[str, str] = MappingProxyType({
    SIM: "the profile's first Chameleon site, emulated",
    f"{SIM}:<site>": "that Chameleon site, emulated",
    **{name: f"{stands_for}, emulated" for name, stands_for in SIM_CLOUD_SITES.items()},
})
#: The forms --site takes for AWS and GCP, by provider.
CLOUD_FORMS: Mapping[str, str] = MappingProxyType({"aws": "aws:<region|zone>", "gcp": "gcp:<zone|region>"})


def site_names(sites: list[Site] | None = None) -> list[str]:
    """Every form --site takes, from the registry: the usable named sites (built-in and sites.yaml, or
    `sites`), the AWS and GCP forms, and the emulated stand-ins."""
    named = [s.name for s in (usable_sites() if sites is None else sites)]
    return [*named, *CLOUD_FORMS.values(), *EMULATED_SITES]


def site_help() -> str:
    """--site's help text, from the built-in registry (read at start-up: the user's sites.yaml is not)."""
    builtin = ", ".join(s.name for s in BUILTIN_SITES.values() if usable(s))
    return (f"Where to run: {builtin}, {', '.join(CLOUD_FORMS.values())} (aws and gcp alone: "
            f"{DEFAULT_CLOUD_SITES['aws']}, {DEFAULT_CLOUD_SITES['gcp']}), a site of your sites.yaml; emulated: "
            f"{', '.join(EMULATED_SITES)}. 'labctl sites' lists them.")


def emulate(site: Site) -> Site:
    """The emulated stand-in for a real site (the testbed fills in auth_url at run time)."""
    return dataclasses.replace(
        site,
        name=f"{SIM}:{site.name}",
        emulated=True,
        stands_for=site.name,
        auth_url="",
        poll_interval=SIM_POLL_INTERVAL,
        catalog=site.catalog,
    )


def emulated_poll_interval(site: Site, time_scale: float) -> float:
    """How often labctl polls emulated `site`: as often as it polls the site it stands for, at the emulated
    cloud's time scale (its waits are the real ones times that scale), and at most every SIM_POLL_INTERVAL.
    At a scale of 0.1, polling every SIM_POLL_INTERVAL was ten times what labctl does on the real site."""
    real = BUILTIN_SITES.get(site.stands_for or "")
    return max(site.poll_interval, real.poll_interval * time_scale) if real else site.poll_interval


def _not_yet(name: str) -> None:
    """Nothing is unsupported any more; kept as the one place to refuse a provider by prefix."""
    return None


def resolve(name: str, profile: Any = None) -> Site:
    """The Site for a --site value: a site name, `sim` (needs the profile) or `sim:<site>`."""
    key = name.strip().lower()
    if key == SIM:
        if profile is None:
            raise UserError(
                "--site sim stands for the profile's first Chameleon site: give a profile, "
                "or name the site (sim:chi@tacc)"
            )
        sites = _all_sites()
        for candidate in getattr(profile, "sites", []):
            site = sites.get(str(candidate).lower())
            if site is not None and site.provider == "chameleon" and site.family != "edge":
                return emulate(site)
        for candidate in getattr(profile, "sites", []):
            cloud = str(candidate).lower().split(":")[0]
            if cloud in ("aws", "gcp"):
                return emulate(resolve(SIM_CLOUD_SITES[f"sim-{cloud}"]))
        listed = ", ".join(getattr(profile, "sites", [])) or "none"
        raise UserError(
            f"--site sim: profile '{getattr(profile, 'name', '?')}' lists no Chameleon site to emulate "
            f"(sites: {listed}); use sim:chi@tacc, sim:chi@uc or sim:kvm@tacc"
        )
    if key in SIM_CLOUD_SITES:
        return emulate(resolve(SIM_CLOUD_SITES[key]))
    if key.startswith(f"{SIM}:"):
        real_name = key[len(SIM) + 1 :]
        _not_yet(real_name)
        if real_name == SIM or real_name.startswith(f"{SIM}:"):
            raise UserError(f"unknown site '{name}': sim:<site> takes a real site, e.g. sim:chi@tacc")
        real = resolve(real_name)
        return emulate(real)
    sites = _all_sites()
    if key in sites:
        return sites[key]
    if key in DEFAULT_CLOUD_SITES:  # a profile's `sites: [aws]` means "any region": check the default one
        return resolve(DEFAULT_CLOUD_SITES[key])
    if (cloud := _commercial(key)) is not None:
        return cloud
    known = site_names([s for s in sites.values() if usable(s)])
    plain = [n for n in known if "<" not in n] + list(DEFAULT_CLOUD_SITES)
    raise UserError(f"unknown site '{name}'" + _did_you_mean(key, plain) + f"; known sites: {', '.join(known)}")
