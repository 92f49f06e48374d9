"""Property tests of the CLI's arguments (issue 9): whatever text or number a user (or a script) passes, labctl
answers exit 0, or exit 2 with exactly one `error:` line and no traceback, and creates nothing it should not.

The CLI runs in this process (`tests.test_cli_safety.cli`). Each command is chosen so that a valid value
stops at a later, harmless refusal (an unknown site, a missing roster, no deployments): no cloud is reached.
Example counts come from the Hypothesis profile (tests/conftest.py: "ci" by default, HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from tests.test_cli_safety import check_volume_script, cli, ids, seed

from labctl.naming import sanitise
from labctl.state import StateStore

# The fixtures set up one private home for all examples of a test; each example checks nothing was added.
reuse_fixtures = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ARGV_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=40)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda f: f"{f:g}"),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e308", "1e400", "0", "-0", "1_000", " 2 ", "0x10", "", "½"]),
    ARGV_TEXT,
)


def as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def in_bounds(text: str, high: float) -> bool:
    value = as_float(text)
    return value is not None and math.isfinite(value) and 0 < value <= high


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()  # splits on \u2028, \x85, ... too: those may not appear either
    assert len(lines) == 1 and lines[0].startswith("error: "), repr(err)
    return lines[0]


@pytest.fixture
def home(labctl_env, monkeypatch, tmp_path):
    monkeypatch.delenv("LABCTL_STATE_URL", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


@pytest.fixture
def store(home):
    with StateStore() as s:
        yield s


# -- numbers -----------------------------------------------------------------------------------------------
@reuse_fixtures
@given(hours=NUMBERS)
@example(hours="-5")
@example(hours="1e6")
@example(hours="168")
@example(hours="nan")
def test_extend_hours(store, hours):
    code, _, err = cli("extend", f"--hours={hours}")  # no deployments: a valid number stops there
    line = one_error_line(code, err)
    if in_bounds(hours, 168):
        assert "you have no deployments" in line
    else:
        assert "--hours" in line
    code, _, err = cli("class", "extend", "hello", "--course", "c", f"--hours={hours}")
    if in_bounds(hours, 168):
        assert code == 0 and err == ""  # no class environments: nothing to extend
    else:
        assert "--hours" in one_error_line(code, err)
    assert ids(store) == []


@reuse_fixtures
@given(timeout=NUMBERS)
@example(timeout="-1")
@example(timeout="86400")
@example(timeout="86400.5")
def test_up_ssh_timeout(home, store, timeout):
    code, _, err = cli("up", "hello", "--site", "no-such-site", f"--ssh-timeout={timeout}")
    line = one_error_line(code, err)
    assert ("--ssh-timeout" in line) != in_bounds(timeout, 86400)
    assert ids(store) == [] and not (home / "testbed").exists()


@reuse_fixtures
@given(rate=NUMBERS, concurrency=st.one_of(st.integers(-1000, 1000).map(str), NUMBERS))
@example(rate="-1", concurrency="16")
@example(rate="1000", concurrency="256")
@example(rate="5", concurrency="0")
@example(rate="5", concurrency="²")  # a digit to isdigit(), not to int(): found by the CI run of 2026-12-05
def test_class_up_rate_and_concurrency(home, store, rate, concurrency):
    missing = home / "no-roster.csv"
    code, _, err = cli("class", "up", "hello", "--roster", str(missing), "--site", "sim",
                       f"--rate={rate}", f"--concurrency={concurrency}")
    line = one_error_line(code, err)
    conc_ok = concurrency.strip().lstrip("+-").isdecimal() and 1 <= int(concurrency) <= 256  # as int() reads
    if in_bounds(rate, 1000) and conc_ok:
        assert "no-roster.csv" in line  # got as far as reading the roster
    else:
        assert "--rate" in line or "--concurrency" in line
    assert ids(store) == [] and not (home / "testbed").exists()


# -- names -------------------------------------------------------------------------------------------------
@reuse_fixtures
@given(name=ARGV_TEXT, option=st.sampled_from(["--name", "--owner"]))
@example(name="a/b", option="--name")
@example(name="a.b", option="--name")
@example(name="", option="--owner")
def test_up_names(home, store, name, option):
    code, _, err = cli("up", "hello", "--site", "no-such-site", f"{option}={name}")
    line = one_error_line(code, err)
    canonical = bool(name) and sanitise(name) == name and len(name) <= 24
    if canonical:
        assert "no-such-site" in line  # the name passed; the site is what stopped it
    else:
        assert option in line and "lowercase" in line
    assert ids(store) == [] and not (home / "testbed").exists()


@reuse_fixtures
@given(course=ARGV_TEXT)
def test_class_up_course(home, store, course):
    code, _, err = cli("class", "up", "hello", "--roster", str(home / "none.csv"), "--site", "sim",
                       f"--course={course}")
    line = one_error_line(code, err)
    if course and sanitise(course, 16) == course and len(course) <= 16:
        assert "none.csv" in line
    else:
        assert "--course" in line
    assert ids(store) == []


@pytest.fixture
def klass(store):
    for sid in ("alice", "bob"):
        seed(store, f"labctl-c-{sid}-hello", "hello", "hello", owner=sid, course="c", student={"id": sid})
    return store


@reuse_fixtures
@given(student=ARGV_TEXT)
@example(student="")
@example(student=" ")
@example(student="*")
@example(student="%")
def test_class_down_student(klass, student):
    assume(student not in ("alice", "bob"))
    code, _, err = cli("class", "down", "hello", "--course", "c", f"--student={student}", "--yes")
    line = one_error_line(code, err)
    assert ("is empty" in line) if not student.strip() else ("no environment of student" in line)
    assert ids(klass) == ["labctl-c-alice-hello", "labctl-c-bob-hello"]


@reuse_fixtures
@given(name=ARGV_TEXT)
@example(name="")
@example(name="hello")
@example(name="%")
def test_down_name(store, name):
    seed(store, "labctl-student1-a", "a", "hello")
    seed(store, "labctl-student1-b", "b", "hello")
    assume(name not in ("a", "b", "labctl-student1-a", "labctl-student1-b"))
    code, _, err = cli("down", "--", name)
    line = one_error_line(code, err)
    if not name.strip():
        assert "empty" in line
    elif name == "hello":
        assert "matches 2 deployments" in line
    else:
        assert "no deployment named" in line
    assert ids(store) == ["labctl-student1-a", "labctl-student1-b"]


# -- the state database ------------------------------------------------------------------------------------
@reuse_fixtures
@given(state=st.text(st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)), min_size=1,
                     max_size=40))
@example(state="host=db password=Hunter2xyz")
@example(state="a=b")
@example(state="u:Hunter2xyz@h")
@example(state="..")
@example(state="~")
@example(state="~0")  # a user this machine does not have: pathlib raised RuntimeError (a traceback)
@example(state="ok.db")
def test_state(home, monkeypatch, state):
    assume(not state.strip().lower().startswith(("postgres", "sqlite")) and "://" not in state)
    work = home / "cwd"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home / "home"))
    code, _, err = cli("--state", state, "status")
    if code != 0:
        line = one_error_line(code, err)
        if "=" in state or "@" in state:
            assert "Hunter2xyz" not in line
    assert not any("=" in p.name for p in work.iterdir())
    for p in work.iterdir():  # clean up, so that the next example starts from an empty directory
        if p.is_file():
            p.unlink()
        else:
            subprocess.run(["rm", "-rf", str(p)], check=True)


# -- mount paths -------------------------------------------------------------------------------------------
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.text(st.characters(exclude_characters="\x00\x01", exclude_categories=("Cs",)), min_size=1,
                    max_size=30))
@example(tail="a;touch${IFS}pwned")
@example(tail="$(touch pwned)")
@example(tail="`touch pwned`")
def test_volume_script_runs_the_mount_path_as_data(tmp_path_factory, tail):
    tmp = Path(tmp_path_factory.mktemp("vol"))
    check_volume_script("/mnt/" + tail, tmp)
    assert sorted(os.listdir(tmp)) == ["dev-vdb", "fstab", "sudo.log"]  # nothing else was created
