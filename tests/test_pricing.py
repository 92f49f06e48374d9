"""Lease hours and cost before `up`: the shipped price table, `plan --json` estimates, `--prices` overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labctl import hardware, pricing

LABCTL = [sys.executable, "-m", "labctl"]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABCTL, *args], env=env, capture_output=True, text=True, timeout=120)


def plan_json(env: dict[str, str], *args: str) -> dict:
    proc = run(env, "plan", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_shipped_table_loads_and_covers_every_mapped_type() -> None:
    table = pricing.load_prices()
    assert table["as_of"] and table["source"] and table["currency"] == "USD"
    for provider, region, types in (("aws", "us-east-1", hardware.AWS_TYPES), ("aws", "us-west-2", hardware.AWS_TYPES),
                                    ("gcp", "us-central1", hardware.GCP_TYPES),
                                    ("gcp", "europe-west4", hardware.GCP_TYPES)):
        missing = set(types) - set(table[provider][region])
        assert not missing, f"{provider} {region}: no price for {sorted(missing)}"
    # every default a profile can get is priced too
    for provider, table_types in hardware.DEFAULT_TYPES.items():
        for names in table_types.values():
            region = "us-east-1" if provider == "aws" else "us-central1"
            assert set(names) <= set(table[provider][region])


@pytest.mark.parametrize("lab", ["hello", "gpu-a100"])
@pytest.mark.parametrize(("site", "provider", "region"),
                         [("aws:us-east-1", "aws", "us-east-1"), ("gcp:us-central1-a", "gcp", "us-central1")])
def test_plan_json_estimate_is_hours_times_unit_price(labctl_env, lab, site, provider, region) -> None:
    out = plan_json(labctl_env, lab, "--site", site)
    table = pricing.load_prices()[provider][region]
    est = out["estimate"]
    assert est["kind"] == "cost" and est["region"] == region and est["complete"]
    assert est["as_of"] and est["source"]
    hours = out["lease_hours"]
    expected = 0.0
    for node, line in zip(out["nodes"], est["lines"], strict=True):
        assert line["node"] == node["name"] and line["type"] == node["types"][0]
        assert line["fallbacks"] == node["types"][1:]
        assert line["hours"] == hours
        assert line["unit_price"] == table[line["type"]]
        assert line["cost"] == pytest.approx(hours * table[line["type"]])
        expected += hours * table[line["type"]]
    assert est["total"] == pytest.approx(expected)
    # the existing keys are still there
    assert {"deployment", "lab", "site", "lease_hours", "nodes", "resources"} <= set(out)


def test_plan_on_chameleon_reports_sus(labctl_env) -> None:
    out = plan_json(labctl_env, "gpu-a100", "--site", "chi@tacc")
    est = out["estimate"]
    assert est["kind"] == "sus" and est["region"] == "CHI@TACC"
    hours = out["lease_hours"]
    (line,) = est["lines"]
    assert line["type"] == "compute_liqid" and line["hours"] == hours
    # one host-hour per hour, plus one SU per hour for the floating IP
    assert line["sus"] == pytest.approx(2 * hours)
    assert est["total"] == pytest.approx(2 * hours)
    assert line["cost"] is None
    text = run(labctl_env, "plan", "gpu-a100", "--site", "chi@tacc")
    assert text.returncode == 0, text.stderr
    assert "SUs" in text.stdout and "compute_liqid" in text.stdout


def test_prices_override_changes_the_numbers(labctl_env, tmp_path: Path) -> None:
    table = pricing.load_prices()
    table["aws"]["us-east-1"]["t3.small"] = 1.5
    table["as_of"], table["source"] = "2030-01-01", "my course's negotiated rates"
    file = tmp_path / "prices.json"
    file.write_text(json.dumps(table))
    out = plan_json(labctl_env, "hello", "--site", "aws:us-east-1", "--prices", str(file))
    est = out["estimate"]
    assert est["lines"][0]["unit_price"] == 1.5
    assert est["total"] == pytest.approx(1.5 * out["lease_hours"])
    assert est["source"] == "my course's negotiated rates" and est["as_of"] == "2030-01-01"
    text = run(labctl_env, "plan", "hello", "--site", "aws:us-east-1", "--prices", str(file))
    assert "2030-01-01" in text.stdout and "negotiated" in text.stdout


def test_type_missing_from_table_says_no_price(labctl_env, tmp_path: Path) -> None:
    table = pricing.load_prices()
    del table["aws"]["us-east-1"]["t3.small"]
    file = tmp_path / "prices.json"
    file.write_text(json.dumps(table))
    est = plan_json(labctl_env, "hello", "--site", "aws:us-east-1", "--prices", str(file))["estimate"]
    assert est["lines"][0]["cost"] is None and est["lines"][0]["note"] == "no price"
    assert not est["complete"]


@pytest.mark.parametrize(("content", "words"), [
    ("{not json", "not valid JSON"),
    ('{"as_of": "2026-01-01", "source": "x", "currency": "USD", "aws": {"us-east-1": {"t3.small": "cheap"}}}',
     "aws.us-east-1.t3.small"),
    ("[1, 2]", "top level"),
])
def test_malformed_prices_file_exits_2_with_one_line(labctl_env, tmp_path: Path, content: str, words: str) -> None:
    file = tmp_path / "bad-prices.json"
    file.write_text(content)
    proc = run(labctl_env, "plan", "hello", "--site", "aws:us-east-1", "--prices", str(file))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(file) in lines[0] and words in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_prices_file_exits_2(labctl_env, tmp_path: Path) -> None:
    proc = run(labctl_env, "plan", "hello", "--site", "aws:us-east-1", "--prices", str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and "nope.json" in proc.stderr and "Traceback" not in proc.stderr


def test_import_is_cheap() -> None:
    code = "import sys, labctl.pricing; print('pydantic' in sys.modules, 'rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_kvm_says_the_rule_is_unconfirmed(labctl_env) -> None:
    est = plan_json(labctl_env, "hello", "--site", "kvm@tacc")["estimate"]
    assert est["kind"] == "unknown" and est["total"] is None and not est["complete"]
    assert any("no documented SU rule" in note for note in est["notes"])
