"""The shipped lab profiles: every one validates, and plans at every site it declares with the types it names.

`labctl validate` and `labctl plan` are pure commands (no cloud, no testbed), run here as the CLI in
subprocesses, several at a time, so the whole module stays fast.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.conftest import LABCTL

from labctl import hardware, sites
from labctl.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
COURSE_LABS = [
    "mltrain", "mltrain-amd", "mlflow", "serve-model", "serve-system", "serve-edge",
    "eval-offline", "eval-online", "eval-loop", "data-platform",
]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABCTL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def _expected_types(path: Path, site_name: str) -> dict[str, list[str]]:
    """Role -> the node types the profile names for the site (or the cloud defaults when it names none)."""
    profile = load_profile(path)
    site = sites.resolve(site_name, profile)
    real = site.stands_for or site.name
    out = {}
    for role, group in profile.nodes.items():
        types = (profile.types_for(role, site_name, site.family) or profile.types_for(role, real, site.family)
                 or profile.types_for(role, site.catalog or real, site.family))
        if not types and site.family in ("aws", "gcp"):
            types = list(hardware.default_types(site.family, group.gpu.model if group.gpu else None))
        out[role] = types
    return out


def test_every_shipped_profile_validates(labctl_env: dict[str, str], tmp_path: Path) -> None:
    result = _run(["validate"], labctl_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in PROFILES:
        assert f"ok: {path.stem} (" in result.stdout


@pytest.mark.parametrize("lab", COURSE_LABS)
def test_course_lab_is_shipped_and_well_formed(lab: str) -> None:
    path = ROOT / "profiles" / f"{lab}.yaml"
    assert path.is_file(), f"missing profiles/{lab}.yaml"
    profile = load_profile(path)
    assert profile.name == lab
    assert "teaching-on-testbeds/" in path.read_text().split("\nname:")[0], "cite the course material on top"
    assert any(step.safe_on_sim for step in profile.setup), "at least one step must run on --site sim"
    host_changing = [s for s in profile.setup if any(w in (s.run or "") for w in ("sudo", "apt", "docker"))]
    assert all(not s.safe_on_sim for s in host_changing), "steps that change the host must not run on sim"
    assert profile.outputs, "show the student where things are"
    assert "chi@edge" not in profile.sites  # labctl cannot lease devices; see serve-edge.yaml


def test_every_profile_plans_at_every_declared_site(labctl_env: dict[str, str], tmp_path: Path) -> None:
    cases = [(path, site) for path in PROFILES for site in load_profile(path).sites]
    assert len(cases) >= len(PROFILES)

    def plan(case: tuple[Path, str]) -> str | None:
        path, site = case
        result = _run(["plan", path.stem, "--site", site, "--json"], labctl_env, tmp_path)
        if result.returncode != 0:
            return f"{path.stem} at {site}: exit {result.returncode}: {result.stderr.strip()[-400:]}"
        data = json.loads(result.stdout)
        got: dict[str, list[str]] = {}
        for node in data["nodes"]:
            got.setdefault(node["role"], node["types"])
        want = _expected_types(path, site)
        if got != want:
            return f"{path.stem} at {site}: planned types {got}, profile names {want}"
        if data["lab"] != path.stem:
            return f"{path.stem} at {site}: plan is for lab {data['lab']!r}"
        if site in ("aws", "gcp") and data["site"] != sites.DEFAULT_CLOUD_SITES[site]:
            return f"{path.stem} at {site}: resolved to {data['site']}, not the default region"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(plan, cases) if p]
    assert not problems, "\n".join(problems)


def test_serve_edge_says_chi_edge_is_not_supported(labctl_env: dict[str, str], tmp_path: Path) -> None:
    result = _run(["validate", "serve-edge", "--site", "chi@edge"], labctl_env, tmp_path)
    assert result.returncode == 2
    assert "not supported at this site" in result.stderr
