"""What a newcomer meets (issue 13) and the overview (issue 12 item 3), read as the user reads it: help text,
output off a terminal, exit codes. Nothing here reaches a cloud (the state is seeded); the whole-lab cases are
in test_newcomer_sim.py."""

from __future__ import annotations

import io
import json
import re

import pytest
from tests.cli.helpers import cli, one_line_error, seed, words

from labctl import sites
from labctl.state import CLASS_SHARED, DeploymentRecord

SITE_FORMS = ["chi@tacc", "chi@uc", "kvm@tacc", "aws:<region|zone>", "gcp:<zone|region>", "sim", "sim:<site>",
              "sim-aws", "sim-gcp"]


# -- 1. site lists from the registry -------------------------------------------------------------------
def test_the_registry_lists_every_usable_site_and_not_chi_edge(home):
    assert sites.site_names() == SITE_FORMS
    assert "chi@edge" in sites.BUILTIN_SITES and not sites.usable(sites.BUILTIN_SITES["chi@edge"])


@pytest.mark.parametrize("command", [("up",), ("plan",)])
def test_site_help_names_every_site_from_the_registry(home, command):
    code, out, _ = cli(*command, "--help")
    assert code == 0
    text = words(out)
    for name in sites.site_names():
        assert name in text, name
    assert "chi@edge" not in text


def test_an_unknown_site_lists_every_site_and_suggests(home):
    line = one_line_error(*cli("plan", "hello", "--site", "sim-awz")[::2])
    assert "unknown site 'sim-awz' (did you mean 'sim-aws'?)" in line
    assert line.split("; known sites: ", 1)[1].split(", ") == sites.site_names()
    assert "chi@edge" not in line


def test_a_user_site_is_in_the_unknown_site_list(home):
    (home / "config").mkdir(exist_ok=True)
    (home / "config" / "sites.yaml").write_text("my-tacc: {base: chi@tacc}\n")
    line = one_line_error(*cli("plan", "hello", "--site", "my-tac")[::2])
    assert "(did you mean 'my-tacc'?)" in line and "my-tacc, aws:<region|zone>" in line


# -- 2. every problem, never "(+N more)" ---------------------------------------------------------------
PROFILE = """\
name: two-problems
sites: [chi@tacc]
lease_hours: 3
image: ubuntu-24.04
nodes:
  node:
    count: 1
    types: {chi@tacc: [compute_skylake]}
"""


@pytest.mark.parametrize("command", ["plan", "up"])
def test_plan_and_up_print_every_problem(home, command):
    path = home / "two-problems.yaml"
    path.write_text(PROFILE)
    line = one_line_error(*cli(command, str(path), "--site", "chi@uc")[::2])
    assert "2 problems: " in line and "more)" not in line
    assert "sites: chi@uc is not one of this profile's sites (chi@tacc)" in line
    assert "nodes.node.types: no node types for chi@uc" in line


def test_validate_help_says_it_prints_every_problem(home):
    code, out, _ = cli("validate", "--help")
    assert code == 0 and "print every problem" in words(out) and "first problem" not in words(out)


def test_validate_prints_every_problem_of_the_schema_too(home):
    path = home / "two-problems.yaml"
    path.write_text(PROFILE.replace("lease_hours: 3", "lease_hours: 200").replace("count: 1", "count: 0"))
    code, out, err = cli("validate", str(path))
    assert code == 2 and "more)" not in err
    assert "2 problems: lease_hours: Input should be less than or equal to 168" in err and "node.count" in err


# -- 4. off a terminal nothing is cut; one JSON convention ----------------------------------------------
LEASE_END = "2026-12-05T00:27:00+00:00"


def test_status_off_a_terminal_keeps_every_value_whole(store):
    seed(store, "labctl-student1-a-lab-with-a-long-name", "a-lab-with-a-long-name", "hello",
         site="sim:kvm@tacc", lease_end=LEASE_END, floating_ip="127.10.200.201")
    code, out, _ = cli("status")
    assert code == 0
    row = next(line for line in out.splitlines() if "a-lab-with-a-long-name" in line)
    for value in ("127.10.200.201", LEASE_END, "sim:kvm@tacc", "m1.small" if "m1.small" in row else "node-1"):
        assert value in row, row
    assert "…" not in out


def test_sites_off_a_terminal_is_one_line_per_site(home):
    code, out, _ = cli("sites")
    assert code == 0 and "…" not in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    names = [row.split("│")[1].strip() for row in rows]
    assert names == ["chi@tacc", "chi@uc", "kvm@tacc", "aws:<region|zone>", "gcp:<zone|region>", "sim",
                     "sim:<site>", "sim-aws", "sim-gcp"]
    assert all("missing" in row or "none needed" in row or "found" in row for row in rows)


TABLE_COMMANDS = [("up",), ("down",), ("status",), ("plan",), ("sites",), ("extend",), ("gc",), ("class", "up"),
                  ("class", "retry"), ("class", "status"), ("class", "down"), ("class", "report"),
                  ("testbed", "status")]


@pytest.mark.parametrize("command", TABLE_COMMANDS)
def test_every_command_that_prints_a_table_takes_json(home, command):
    code, out, _ = cli(*command, "--help")
    assert code == 0 and "--json" in out


def test_class_report_json_is_format_json(store):
    for sid in ("alice", "bob"):
        seed(store, f"labctl-c-{sid}-hello", "hello", "hello", owner=sid, course="c", student=sid,
             floating_ip=f"127.10.9.{1 if sid == 'alice' else 2}")
    a, b = cli("class", "report", "hello", "--json"), cli("class", "report", "hello", "--format", "json")
    assert a[0] == b[0] == 0 and a[1] == b[1]
    assert [r["student_id"] for r in json.loads(a[1])] == ["alice", "bob"]
    assert "labctl testbed start" in a[2]  # the report's ssh commands on sim need the emulated sshd


# -- 6. completion, --version, -h -------------------------------------------------------------------------
def test_version_and_short_help(home):
    from importlib.metadata import version

    code, out, _ = cli("--version")
    assert (code, out.strip()) == (0, f"labctl {version('labctl')}")
    assert cli("-h")[:2] == cli("--help")[:2]
    assert cli("status", "-h")[:2] == cli("status", "--help")[:2]
    assert cli("class", "status", "-h")[1] == cli("class", "status", "--help")[1]


def test_shell_completion_is_offered_and_completes(home, monkeypatch):
    code, out, _ = cli("--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out
    code, out, _ = cli("--show-completion", "bash")
    assert code == 0 and "_LABCTL_COMPLETE=complete_bash" in out
    # What the shell function then runs: labctl with the words typed so far.
    monkeypatch.setenv("_LABCTL_COMPLETE", "complete_bash")
    for words_typed, expected in (("labctl st", ["status"]), ("labctl class st", ["status"]),
                                  ("labctl down --mi", ["--missing-ok"])):
        monkeypatch.setenv("COMP_WORDS", words_typed)
        monkeypatch.setenv("COMP_CWORD", str(len(words_typed.split()) - 1))
        code, out, _ = cli()
        assert (code, out.split()) == (0, expected), words_typed


# -- 8. down --missing-ok --------------------------------------------------------------------------------
def test_down_of_nothing_exits_2_and_0_with_missing_ok(store):
    seed(store, "labctl-student1-hello", "hello", "hello")
    line = one_line_error(*cli("down", "helo")[::2])
    assert "no deployment named 'helo' (yours: hello)" in line
    code, out, err = cli("down", "helo", "--missing-ok")
    assert (code, out.strip(), err) == (0, "nothing named 'helo' to delete", "")
    code, out, _ = cli("down", "helo", "--missing-ok", "--json")
    assert code == 0 and json.loads(out) == {"deleted": False, "missing": True, "left": [], "kept": []}
    assert [d.name for d in store.deployments()] == ["hello"]


def test_down_missing_ok_does_not_skip_a_lab_that_exists(store, monkeypatch):
    """With a matching deployment --missing-ok changes nothing: down runs (here it reaches the service)."""
    from labctl import service

    seed(store, "labctl-student1-hello", "hello", "hello")
    called = []
    monkeypatch.setattr(service, "down", lambda ctx, lab, **kw: called.append(lab) or [])
    code, out, _ = cli("down", "hello", "--missing-ok")
    assert code == 0 and called == ["hello"] and "Deleted" in out


# -- issue 12 item 3: the overview -------------------------------------------------------------------------
@pytest.fixture
def mixed(store):
    seed(store, "labctl-student1-hello", "hello", "hello", lease_end=LEASE_END, floating_ip="127.10.1.1")
    seed(store, "labctl-ta-gpu", "gpu", "gpu-a100", owner="ta", site="chi@tacc")
    for i, sid in enumerate(("alice", "bob", "carol")):
        seed(store, f"labctl-ml-{sid}-hello", "hello", "hello", owner=sid, course="ml-sys", student=sid,
             status="failed" if sid == "carol" else "up", lease_end=f"2026-12-05T0{i}:00:00+00:00")
    seed(store, "labctl-os-dave-hello", "hello", "hello", owner="dave", course="os-101", student="dave",
         site="sim:chi@uc")
    # What ml-sys shares at kvm@tacc (its security group): shown with the class, never counted as a student.
    shared = seed(store, SHARED_ML, SHARED_ML, "hello", owner="student1", course="ml-sys")
    store.save_deployment(DeploymentRecord(**{**shared.__dict__, "data": {CLASS_SHARED: True, "nodes": []}}))
    return store


SHARED_ML = "labctl-ml-sys-class-sim-kvm-tacc-hello"


def test_status_lists_your_labs_and_every_class_by_course_and_lab(mixed):
    code, out, _ = cli("status")
    assert code == 0
    assert "127.10.1.1" in out and "gpu" not in out.split("classes")[0].replace("gpu-a100", "")
    assert "1 lab(s) of other owners in this state: labctl status --all" in out
    rows = {line.split("│")[1].strip(): line for line in out.split("classes", 1)[1].splitlines()
            if line.startswith("│")}
    assert "1 failed, 2 up" in rows["ml-sys"] and "3" in rows["ml-sys"].split("│")[3]
    assert "sim:kvm@tacc (3)" in rows["ml-sys"] and "2026-12-05T00:00:00+00:00" in rows["ml-sys"]
    assert "1 up" in rows["os-101"] and "sim:chi@uc (1)" in rows["os-101"]
    assert "labctl class status hello --course ml-sys" in out
    assert f"shared by ml-sys/hello: {SHARED_ML} (class down deletes it after the last environment" in out


def test_status_all_shows_every_owner_with_an_owner_column(mixed):
    code, out, _ = cli("status", "--all")
    assert code == 0 and "other owners" not in out
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    assert [c.strip() for c in header.strip("┃").split("┃")][:3] == ["lab", "owner", "site"]
    assert re.search(r"│ gpu\s+│ ta\s+│ chi@tacc", out)


def test_status_json_has_labs_and_classes(mixed):
    code, out, _ = cli("status", "--json")
    data = json.loads(out)
    assert code == 0 and [s["name"] for s in data["labs"]] == ["hello"]
    assert data["classes"] == [
        {"course": "ml-sys", "lab": "hello", "environments": 3, "by_state": {"failed": 1, "up": 2},
         "by_site": {"sim:kvm@tacc": 3}, "first_lease_end": "2026-12-05T00:00:00+00:00", "shared": [SHARED_ML]},
        {"course": "os-101", "lab": "hello", "environments": 1, "by_state": {"up": 1},
         "by_site": {"sim:chi@uc": 1}, "first_lease_end": None, "shared": []},
    ]
    assert [s["owner"] for s in json.loads(cli("status", "--all", "--json")[1])["labs"]] == ["student1", "ta"]


def test_status_with_nothing_says_how_to_start(store):
    code, out, _ = cli("status")
    assert code == 0 and "No labs. Start one with labctl up hello --site sim." in out
    assert json.loads(cli("status", "--json")[1]) == {"labs": [], "classes": []}


def test_class_status_without_course_lists_the_courses_or_uses_the_only_one(mixed):
    line = one_line_error(*cli("class", "status", "hello")[::2])
    assert "lab 'hello' is in 2 courses: ml-sys (3 environments), os-101 (1 environment)" in line
    assert "--course" in line
    one_line_error(*cli("class", "status", "nolab")[::2])
    mixed.forget_deployment("labctl-os-dave-hello")
    code, out, _ = cli("class", "status", "hello")
    assert code == 0 and "(3 students)" in out and all(s in out for s in ("alice", "bob", "carol"))
    code, out, _ = cli("class", "status", "hello", "--course", "os-101")
    assert code == 0 and "(0 students)" in out  # an explicit course is taken as given


# -- 3. the live display's final frame ------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _replay(progress, nodes: int = 3) -> None:
    """The events of an `up` of `nodes` nodes, as the engine and runner send them."""
    progress("preflight", "checking", "credentials and images at sim:kvm@tacc")
    for key in ("keypair", "secgroup", "network"):
        progress(key, "creating", f"labctl-student1-lab-{key}")
    progress("ssh", "waiting", f"{nodes} node(s)")
    for i in range(1, nodes + 1):
        progress(f"node-{i}", "ssh-wait", "connection refused (the node is probably still booting)")
        progress(f"node-{i}", "ssh-ready", f"cc@127.10.0.{i}:2222")


def _final_frame(ok: bool, monkeypatch) -> str:
    from rich.console import Console

    from labctl.cli import render

    screen = _Terminal()
    monkeypatch.setattr(render, "err_console", Console(file=screen, force_terminal=True, width=160, no_color=True))
    progress = render.LiveProgress()
    _replay(progress)
    progress.stop(ok=ok)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    return text[text.rindex("labctl ("):]


def test_the_live_table_ends_on_a_final_frame(monkeypatch):
    frame = _final_frame(True, monkeypatch)
    assert "creating" not in frame and "waiting" not in frame and "checking" not in frame
    assert re.search(r"│ ssh\s+│ ready\s+│ 3/3 node\(s\)", frame)
    assert all(re.search(rf"│ {key}\s+│ created", frame) for key in ("keypair", "secgroup", "network"))


def test_after_an_error_the_final_frame_says_what_stopped(monkeypatch):
    frame = _final_frame(False, monkeypatch)
    assert re.search(r"│ keypair\s+│ creating, stopped", frame)


def test_a_booting_node_is_shown_waiting_not_as_an_error(monkeypatch):
    from rich.console import Console

    from labctl.cli import render

    screen = io.StringIO()
    monkeypatch.setattr(render, "err_console", Console(file=screen, width=200, no_color=True))
    progress = render.LiveProgress()
    progress("node-1", "ssh-wait", "connection refused (the node is probably still booting)")
    progress.stop()
    line = screen.getvalue().strip()
    assert line.endswith("node-1: waiting for SSH (the node is still booting: it refuses connections so far)")
    assert "refused (the node is probably" not in line


def test_what_an_adapter_logs_is_a_progress_note_until_progress_stops(monkeypatch):
    """An adapter's own decisions (a zone full, another tried) reach the user as notes of the running command."""
    import logging

    from rich.console import Console

    from labctl.cli import render

    screen = io.StringIO()
    monkeypatch.setattr(render, "err_console", Console(file=screen, width=200, no_color=True))
    progress = render.LiveProgress()
    logging.getLogger("labctl.providers.gcp").info("zone %s is full; launched in %s", "us-central1-a", "us-central1-b")
    logging.getLogger("labctl.providers.gcp").debug("not shown: below INFO")
    progress.stop()
    logging.getLogger("labctl.providers.gcp").info("after stop: not shown")
    lines = screen.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("gcp: note (zone us-central1-a is full; launched in us-central1-b)")
