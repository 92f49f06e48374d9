"""`labctl class report -o FILE` replaces only what it may: a new file, an empty one, or a report it wrote before.
A roster, a dot-file, a system file, a link or a device named by mistake is refused in one line (exit 2) and left
exactly as it was; a report is written beside its place and renamed in, readable by its owner only."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.cli.helpers import cli, one_line_error, seed, write_roster

from labctl.cli.render import REPORT_FIELDS


@pytest.fixture
def classroom(store):
    for sid in ("alice", "bob"):
        seed(store, f"labctl-c-{sid}-hello", "hello", "hello", owner=sid, course="c", student=sid,
             floating_ip=f"127.10.9.{1 if sid == 'alice' else 2}")
    return store


def report(path: Path, *more: str) -> tuple[int, str, str]:
    return cli("class", "report", "hello", "--course", "c", "-o", str(path), *more)


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), stat.S_IMODE(path.lstat().st_mode)


def test_a_new_report_is_private_and_a_rerun_refreshes_it_in_either_format(classroom, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    out = reports / "hello.csv"
    code, _, err = report(out)
    assert code == 0 and f"wrote {out}" in err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().splitlines()[0] == ",".join(REPORT_FIELDS)
    classroom.set_deployment_status("labctl-c-bob-hello", "failed", error="quota")
    assert report(out)[0] == 0 and "quota" in out.read_text()  # the same file, refreshed
    assert report(out, "--json")[0] == 0  # a CSV report may become a JSON one, and back
    assert [r["student_id"] for r in json.loads(out.read_text())] == ["alice", "bob"]
    assert report(out)[0] == 0 and out.read_text().startswith("student_id,")
    empty = reports / "made-by-mktemp.csv"
    empty.touch(mode=0o644)
    assert report(empty)[0] == 0 and stat.S_IMODE(empty.stat().st_mode) == 0o600
    assert sorted(p.name for p in reports.iterdir()) == ["hello.csv", "made-by-mktemp.csv"]  # no temporary left


def test_the_roster_named_by_mistake_is_refused_and_untouched(classroom, tmp_path):
    roster, _keys = write_roster(tmp_path, ("alice", "bob"))
    before = snapshot(roster)
    line = one_line_error(*report(roster)[::2])
    assert line == (f"error: -o {roster}: exists and is not a labctl class report: labctl replaces only a report it "
                    "wrote; name a new file, or move this one away first")
    assert snapshot(roster) == before


@pytest.mark.parametrize("kind", ["link to a report", "link to a file", "directory", "socket"])
def test_what_is_not_a_regular_file_is_refused_and_untouched(classroom, tmp_path, kind, request):
    target = tmp_path / "target.csv"
    if kind == "link to a report":
        assert report(target)[0] == 0
    else:
        target.write_text("keep me\n")
    before = snapshot(target)
    where = {"directory": tmp_path, "socket": tmp_path / "s"}.get(kind, tmp_path / "link.csv")
    if kind.startswith("link"):
        where.symlink_to(target)
    if kind == "socket":  # not a device: a labctl that wrote there anyway would harm this machine (as root)
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(where))
        request.addfinalizer(server.close)
    line = one_line_error(*report(where)[::2])
    assert line.startswith(f"error: -o {where}: ")
    assert ("is a directory" if kind == "directory" else "is not a regular file") in line
    assert snapshot(target) == before
    assert not kind.startswith("link") or where.is_symlink()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(min_size=1, max_size=300), mode=st.sampled_from([0o600, 0o644, 0o640, 0o444]))
def test_any_file_that_is_not_a_report_stays_as_it_was(classroom, tmp_path, content, mode):
    path = tmp_path / "existing"
    if path.exists():
        path.chmod(0o600)
    path.write_bytes(content)
    path.chmod(mode)
    head = content.split(b"\n", 1)[0].rstrip(b"\r")
    is_report_header = head in (b"student_id", ",".join(REPORT_FIELDS).encode())
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    is_json_report = isinstance(parsed, list) and all(isinstance(r, dict) and tuple(r) == REPORT_FIELDS
                                                      for r in parsed)
    code, _, err = report(path)
    if is_report_header or is_json_report:
        assert code == 0, err
    else:
        one_line_error(code, err)
        assert snapshot(path) == (content, mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".existing")) == []
