"""Sites: built-ins, emulated stand-ins, user sites from sites.yaml, and one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from labctl import sites
from labctl.errors import UserError
from labctl.profile import Profile
from labctl.site_fit import validate_for_site


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    monkeypatch.setenv("LABCTL_CONFIG_DIR", str(directory))
    return directory


def _user_sites(config_dir: Path, text: str) -> None:
    (config_dir / "sites.yaml").write_text(textwrap.dedent(text))


def _one_line_error(name: str, profile: object = None) -> str:
    with pytest.raises(UserError) as info:
        sites.resolve(name, profile)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_builtin_sites() -> None:
    assert set(sites.BUILTIN_SITES) == {"chi@tacc", "chi@uc", "kvm@tacc", "chi@edge"}
    tacc = sites.resolve("chi@tacc")
    assert tacc.auth_url == "https://chi.tacc.chameleoncloud.org:5000/v3"
    assert (tacc.provider, tacc.family, tacc.region, tacc.reservation) == (
        "chameleon",
        "chi",
        "CHI@TACC",
        "host",
    )
    assert (tacc.ssh_user, tacc.ssh_port, tacc.network, tacc.public_network) == (
        "cc",
        22,
        "sharednet1",
        "public",
    )
    assert tacc.security_groups is False and tacc.emulated is False and tacc.stands_for is None
    assert tacc.images["ubuntu-24.04-cuda"] == "CC-Ubuntu24.04-CUDA"
    assert tacc.max_lease_hours == 168 and tacc.poll_interval == 5.0

    uc = sites.resolve("chi@uc")
    assert uc.auth_url == "https://chi.uc.chameleoncloud.org:5000/v3" and uc.region == "CHI@UC"
    kvm = sites.resolve("KVM@TACC")
    assert kvm.name == "kvm@tacc" and kvm.family == "kvm" and kvm.reservation == "flavor"
    assert kvm.security_groups is True
    assert kvm.auth_url == "https://kvm.tacc.chameleoncloud.org:5000/v3"
    edge = sites.resolve("chi@edge")
    assert edge.family == "edge" and edge.reservation == "device"
    assert edge.auth_url == "https://chi.edge.chameleoncloud.org:5000/v3"
    assert [s.name for s in sites.known_sites()] == ["chi@tacc", "chi@uc", "kvm@tacc", "chi@edge"]


def test_sim_stands_for_the_profiles_first_chameleon_site() -> None:
    profile = SimpleNamespace(name="gpu", sites=["aws:us-east-1", "chi@edge", "chi@uc", "chi@tacc"])
    sim = sites.resolve("sim", profile)
    assert sim.name == "sim:chi@uc" and sim.stands_for == "chi@uc" and sim.emulated
    real = sites.resolve("chi@uc")
    assert (sim.family, sim.region, sim.reservation, sim.images) == (
        real.family,
        real.region,
        real.reservation,
        real.images,
    )
    assert sim.auth_url == "" and sim.poll_interval == 0.05
    assert sim.real_name == "chi@uc"


@pytest.mark.parametrize(("scale", "expected"), [(0.001, 0.05), (0.01, 0.05), (0.1, 0.5), (1.0, 5.0)])
def test_an_emulated_site_is_polled_as_the_real_one_at_the_time_scale(scale, expected) -> None:
    """The emulated cloud's waits are the real ones times its time scale: labctl polls it as it polls the real
    site (every 5 s), scaled alike, never more often than SIM_POLL_INTERVAL."""
    assert sites.resolve("kvm@tacc").poll_interval == 5.0
    assert sites.emulated_poll_interval(sites.resolve("sim:kvm@tacc"), scale) == pytest.approx(expected)


def test_an_emulated_session_polls_at_the_worlds_time_scale(tmp_path) -> None:
    from labctl.providers.chameleon import connect
    from labctl.testbed.server import Testbed

    with Testbed.start(str(tmp_path / "world"), time_scale=0.1, ssh=False) as tb:
        provider = connect(sites.resolve("sim:kvm@tacc"), testbed=lambda: tb)
        assert provider.poll_interval == pytest.approx(0.5)


def test_sim_needs_a_profile_with_a_site_to_emulate() -> None:
    assert "give a profile" in _one_line_error("sim")
    message = _one_line_error("sim", SimpleNamespace(name="x", sites=["chi@edge"]))
    assert "lists no Chameleon site" in message
    cloud = sites.resolve("sim", SimpleNamespace(name="x", sites=["aws:us-east-1", "chi@edge"]))
    assert cloud.emulated and cloud.provider == "aws" and cloud.stands_for == "aws:us-east-1"


def test_explicit_sim_site() -> None:
    sim = sites.resolve("sim:chi@uc")
    assert sim.name == "sim:chi@uc" and sim.stands_for == "chi@uc" and sim.emulated
    assert sites.resolve("sim:kvm@tacc").security_groups is True
    assert "did you mean 'chi@uc'" in _one_line_error("sim:chi@ucc")
    assert "sim:<site> takes a real site" in _one_line_error("sim:sim")


def test_unknown_site_suggests_and_lists() -> None:
    message = _one_line_error("chi@tac")
    assert message.startswith("unknown site 'chi@tac' (did you mean 'chi@tacc'?)")
    known = message.split("; known sites: ", 1)[1].split(", ")
    assert known == ["chi@tacc", "chi@uc", "kvm@tacc", "aws:<region|zone>", "gcp:<zone|region>", "sim", "sim:<site>",
                     "sim-aws", "sim-gcp"]  # chi@edge resolves (validate explains why not), but is no choice


@pytest.mark.parametrize(
    ("name", "provider", "region", "zone"),
    [
        ("aws:us-east-1", "aws", "us-east-1", None),
        ("aws:us-east-1b", "aws", "us-east-1", "us-east-1b"),
        ("gcp:us-central1-a", "gcp", "us-central1", "us-central1-a"),
        ("gcp:europe-west4", "gcp", "europe-west4", None),
    ],
)
def test_commercial_cloud_sites(name: str, provider: str, region: str, zone: str | None) -> None:
    site = sites.resolve(name)
    assert (site.provider, site.region, site.zone) == (provider, region, zone)
    assert site.reservation == "none" and site.security_groups


@pytest.mark.parametrize("name", ["sim-aws", "sim-gcp", "sim:aws:us-west-2"])
def test_emulated_commercial_sites(name: str) -> None:
    site = sites.resolve(name)
    assert site.emulated and site.provider in ("aws", "gcp")


def test_malformed_cloud_site_says_the_form() -> None:
    assert "expected aws:us-east-1" in _one_line_error("aws:moon-1")


def test_user_sites(config_dir: Path) -> None:
    _user_sites(
        config_dir,
        """\
        my-tacc:
          base: chi@tacc
          network: sharednet2
          images: {ubuntu-24.04-ml: my-snapshot}
        chi@uc:
          poll_interval: 10
        lab-cloud:
          family: kvm
          region: RegionOne
          auth_url: https://keystone.example.edu:5000/v3
          ssh_user: ubuntu
        """,
    )
    mine = sites.resolve("my-tacc")
    assert mine.name == "my-tacc" and mine.network == "sharednet2"
    assert mine.auth_url == sites.BUILTIN_SITES["chi@tacc"].auth_url
    assert mine.images["ubuntu-24.04-ml"] == "my-snapshot" and mine.images["ubuntu-24.04"] == "CC-Ubuntu24.04"
    assert mine.catalog == "chi@tacc"
    assert sites.resolve("chi@uc").poll_interval == 10
    other = sites.resolve("lab-cloud")
    assert (other.family, other.reservation, other.security_groups, other.ssh_user) == (
        "kvm",
        "flavor",
        True,
        "ubuntu",
    )
    assert [s.name for s in sites.known_sites()] == [
        "chi@tacc",
        "chi@uc",
        "kvm@tacc",
        "chi@edge",
        "my-tacc",
        "lab-cloud",
    ]
    sim = sites.resolve("sim:my-tacc")
    assert sim.stands_for == "my-tacc" and sim.network == "sharednet2"

    profile = Profile.model_validate(
        {
            "name": "p",
            "sites": ["my-tacc"],
            "lease_hours": 1,
            "image": "ubuntu-24.04-ml",
            "nodes": {"n": {"types": {"chi": ["compute_skylake", "nope"]}}},
        }
    )
    assert [p.split(":")[0] for p in validate_for_site(profile, sim)] == ["nodes.n.types.chi[1]"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("my:\n  base: chi@tacc\n  netwrk: x\n", "my.netwrk: unknown field (did you mean 'network'?)"),
        ("my:\n  base: chi@tac\n", "my.base: unknown site 'chi@tac'"),
        ("my:\n  family: chi\n", "my: region, auth_url missing (or set 'base: chi@tacc' to inherit)"),
        ("my:\n  base: chi@tacc\n  ssh_port: 0\n", "my.ssh_port: Input should be greater than or equal to 1"),
        ("my:\n  base: chi@tacc\n  auth_url: ftp\n", "my.auth_url: String should match pattern"),
        ("a:\n  base: b\nb:\n  base: a\n", "circular base"),
        ("sim:\n  base: chi@tacc\n", "may not be 'sim'"),
        ("- chi@tacc\n", "top level must be a mapping"),
        ("my:\n  base: chi@tacc\n  network: x: y\n", "sites.yaml:3:13: YAML syntax error: mapping values"),
    ],
)
def test_bad_user_sites(config_dir: Path, text: str, fragment: str) -> None:
    _user_sites(config_dir, text)
    message = _one_line_error("chi@tacc")
    assert "sites.yaml" in message
    assert fragment in message, message


@pytest.mark.parametrize("field, value", [
    ("max_lease_hours", ".inf"), ("max_lease_hours", ".nan"), ("max_lease_hours", "0"), ("max_lease_hours", "1e9"),
    ("poll_interval", ".inf"), ("poll_interval", "-1"), ("poll_interval", "1e308"),
])
def test_user_site_numbers_are_finite_and_bounded(config_dir: Path, field: str, value: str) -> None:
    _user_sites(config_dir, f"my-tacc:\n  base: chi@tacc\n  {field}: {value}\n")
    with pytest.raises(UserError) as err:
        sites.resolve("my-tacc")
    assert f"my-tacc.{field}" in str(err.value) and "\n" not in str(err.value)
