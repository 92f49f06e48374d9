"""Class mode end to end on the emulated testbed: a roster of 30, per-student access, kills, teardown."""

from __future__ import annotations

import contextlib
import csv
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from tests.e2e.helpers import REPO, kill_when, labctl_leftovers, run, run_json, start

pytestmark = pytest.mark.slow

N = 30


def make_keys(directory: Path, n: int) -> list[tuple[Path, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        key = Ed25519PrivateKey.generate()
        path = directory / f"s{i:02d}"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        keys.append((path, public.decode() + f" s{i:02d}@laptop"))
    return keys


def write_roster(path: Path, keys: list[tuple[Path, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student_id", "name", "email", "ssh_public_key"])
        for i, (_, public) in enumerate(keys):
            w.writerow([f"s{i:02d}", f"Student {i}", f"s{i:02d}@uni.edu", public])


@pytest.fixture
def klass(labctl_env, tmp_path):
    keys = make_keys(tmp_path / "keys", N)
    roster = tmp_path / "roster.csv"
    write_roster(roster, keys)
    return keys, roster


def world(env):
    from labctl.testbed.world import World

    return World(Path(env["LABCTL_TESTBED_DIR"]))


def labctl_servers(w, site="kvm@tacc"):
    return [s for s in w.inventory(site)["servers"] if s["name"].startswith("labctl-")]


def known_hosts(env, path: Path, port: int) -> Path:
    """The host keys labctl pinned, for the port this process serves the emulated nodes on."""
    with contextlib.closing(sqlite3.connect(Path(env["LABCTL_STATE_DIR"]) / "state.db")) as db:
        rows = db.execute("SELECT host, key FROM host_keys").fetchall()
    path.write_text("".join(f"[{h}]:{port} {k}\n" for h, k in rows))
    return path


def ssh_as(key: Path, ip: str, port: int, kh: Path, user: str = "cc") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
         f"{user}@{ip}", "echo", "ok"],
        capture_output=True, text=True, timeout=60,
    )


def gce_servers(env):
    from labctl.testbed.gce.world import GceWorld

    return [i for i in GceWorld(Path(env["LABCTL_TESTBED_DIR"])).inventory()["instances"]
            if "labctl" in str(i.get("labels"))]


def test_class_of_30_on_chameleon_and_gcp_each_key_on_its_own_node_only_then_down(labctl_env, klass, tmp_path):
    keys, roster = klass
    run(labctl_env, "class", "up", "hello", "--roster", str(roster), "--sites", "sim:kvm@tacc,sim-gcp", "--spread",
        "--course", "mlsys", timeout=600)
    w = world(labctl_env)
    assert len(labctl_servers(w)) == N // 2 and len(gce_servers(labctl_env)) == N // 2
    status = run_json(labctl_env, "class", "status", "hello", "--course", "mlsys")
    assert sorted(r["student_id"] for r in status) == [f"s{i:02d}" for i in range(N)]
    assert all(r["status"] == "up" for r in status)
    ip_of = {r["student_id"]: r["nodes"][0]["ip"] for r in status}
    user_of = {r["student_id"]: "labctl" if "gcp" in r["site"] else "cc" for r in status}
    assert len(set(ip_of.values())) == N

    # Serve the emulated nodes from this process, then try every student's key on their own node and
    # on a neighbour's (on the other cloud, since students alternate between the two sites).
    from labctl.testbed import Testbed

    tb = Testbed.start(state_dir=Path(labctl_env["LABCTL_TESTBED_DIR"]))
    tb.gce()
    try:
        port = tb.ssh_port
        kh = known_hosts(labctl_env, tmp_path / "known_hosts", port)
        for i, (key, _) in enumerate(keys):
            me, neighbour = f"s{i:02d}", f"s{(i + 1) % N:02d}"
            tb.wait_ssh(ip_of[me], port)
            tb.wait_ssh(ip_of[neighbour], port)
            mine = ssh_as(key, ip_of[me], port, kh, user_of[me])
            assert mine.returncode == 0 and mine.stdout.strip() == "ok", mine.stderr
            theirs = ssh_as(key, ip_of[neighbour], port, kh, user_of[neighbour])
            assert theirs.returncode != 0 and "Permission denied" in theirs.stderr
    finally:
        tb.stop()

    report = run(labctl_env, "class", "report", "hello", "--course", "mlsys").stdout
    rows = list(csv.DictReader(report.splitlines()))
    assert len(rows) == N and all(r["ips"] and r["ssh"].startswith("ssh ") for r in rows)

    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {} and gce_servers(labctl_env) == []
    assert run_json(labctl_env, "class", "status", "hello", "--course", "mlsys") == []


def class_up_over_two_sites(env, roster: Path, kvm_servers: int) -> None:
    """`class up` of the roster at sim:kvm@tacc then sim-gcp: every student up, `kvm_servers` of them at kvm@tacc
    and the others moved to the emulated GCP."""
    import json

    out = run(env, "class", "up", "hello", "--roster", str(roster), "--sites", "sim:kvm@tacc,sim-gcp",
              "--course", "mlsys", "--concurrency", "4", "--json", timeout=600)
    assert all(r["status"] == "up" for r in json.loads(out.stdout))
    assert len(labctl_servers(world(env))) == kvm_servers and len(gce_servers(env)) == N - kvm_servers


def test_site_out_of_capacity_moves_its_students_to_the_next_site(labctl_env, klass):
    _, roster = klass
    w = world(labctl_env)
    w.set_flavor_slots("kvm@tacc", "m1.small", 8)
    w.set_flavor_slots("kvm@tacc", "m1.medium", 0)
    class_up_over_two_sites(labctl_env, roster, 8)
    assert len(w.inventory("kvm@tacc")["leases"]) == 8  # the failed leases were cleaned up

    extended = run(labctl_env, "class", "extend", "hello", "--hours", "2", "--course", "mlsys").stdout.splitlines()
    # One line per student: the new end (Chameleon's lease, or the end Compute Engine enforces on the instance), or
    # why it was not moved.
    assert len(extended) == N and all(_moved(line) or ": not extended: " in line for line in extended), extended
    assert sum(_moved(line) for line in extended) >= 8  # at least every Chameleon lease moved

    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {} and gce_servers(labctl_env) == []


def test_site_out_of_floating_ip_quota_moves_its_students_to_the_next_site(labctl_env, klass):
    """Each environment's node takes a floating IP: with a quota of 6, Neutron refuses the 7th student's. That site is
    out of quota, the student who met it is cleaned up there, and the rest of the class goes on at the next site."""
    _, roster = klass
    w = world(labctl_env)
    w.set_quota("kvm@tacc", "floatingip", 6)
    class_up_over_two_sites(labctl_env, roster, 6)
    inventory = w.inventory("kvm@tacc")
    assert len(inventory["leases"]) == 6 and len(inventory["floating_ips"]) == 6  # the refused one cleaned up
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {} and gce_servers(labctl_env) == []


def test_a_rerun_keeps_the_environments_a_site_already_has_when_a_new_student_finds_it_out_of_quota(
        labctl_env, klass, tmp_path):
    """A site out of quota takes no new environment, but those it already has stay where they are: a rerun where a
    new student (first in the roster) meets the quota moves only that student, and does not make the others' again
    at the next site (which would leave their first environments behind, out of labctl's state)."""
    import json

    keys, _ = klass
    w = world(labctl_env)
    w.set_quota("kvm@tacc", "floatingip", 4)
    six = tmp_path / "six.csv"
    write_roster(six, keys[:6])
    args = ["--sites", "sim:kvm@tacc,sim-gcp", "--course", "mlsys", "--concurrency", "1", "--json"]
    out = run(labctl_env, "class", "up", "hello", "--roster", str(six), *args, timeout=600)
    assert [r["status"] for r in json.loads(out.stdout)] == ["up"] * 6
    assert len(labctl_servers(w)) == 4 and len(gce_servers(labctl_env)) == 2

    seven = tmp_path / "seven.csv"  # a late student, first in the roster
    with seven.open("w", newline="") as f:
        rows = list(csv.reader(six.open()))
        csv.writer(f).writerows([rows[0], ["late", "Late Student", "late@uni.edu", keys[6][1]], *rows[1:]])
    out = run(labctl_env, "class", "up", "hello", "--roster", str(seven), *args, timeout=600)
    statuses = {r["student_id"]: (r["status"], r["site"]) for r in json.loads(out.stdout)}
    assert statuses["late"] == ("up", "sim:gcp:us-central1-a")
    assert all(statuses[f"s{i:02d}"] == ("already up", "sim:kvm@tacc") for i in range(4)), statuses
    assert len(labctl_servers(w)) == 4 and len(gce_servers(labctl_env)) == 3
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {} and gce_servers(labctl_env) == []


def test_a_rerun_on_other_sites_does_not_make_again_an_environment_that_is_elsewhere(labctl_env, klass, tmp_path):
    """A rerun whose --sites leave out where a student's environment is: it is not made again at another site (its
    record would no longer name the first, and nothing would delete that); one line says where it is."""
    import json

    keys, _ = klass
    w = world(labctl_env)
    two = tmp_path / "two.csv"
    write_roster(two, keys[:2])
    run(labctl_env, "class", "up", "hello", "--roster", str(two), "--site", "sim:kvm@tacc", "--course", "mlsys",
        timeout=600)
    out = run(labctl_env, "class", "up", "hello", "--roster", str(two), "--site", "sim-gcp", "--course", "mlsys",
              "--json", check=False, timeout=600)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    rows = json.loads(out.stdout)
    assert [r["status"] for r in rows] == ["failed"] * 2
    assert all(r["error"].startswith("has an environment at sim:kvm@tacc (up): not made again at ") for r in rows)
    assert gce_servers(labctl_env) == [] and len(labctl_servers(w)) == 2
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {}


def test_a_site_that_refuses_the_class_its_shared_group_moves_every_student_on(labctl_env, klass):
    """A group quota the project's default group fills: Neutron refuses the class's group, so that site is out of
    quota before any environment starts there, and the whole class goes to the next site."""
    _, roster = klass
    w = world(labctl_env)
    w.set_quota("kvm@tacc", "security_group", 1)
    class_up_over_two_sites(labctl_env, roster, 0)
    assert labctl_leftovers(w, "kvm@tacc") == {}
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {} and gce_servers(labctl_env) == []
    with contextlib.closing(sqlite3.connect(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db")) as db:
        assert {s for (s,) in db.execute("SELECT status FROM deployments")} == {"destroyed"}


def test_a_shared_group_the_cloud_keeps_refusing_fails_the_sites_students_after_one_try_then_retry_works(
        labctl_env, klass, tmp_path):
    """Neutron answers every group create with a 500: the class's group is tried once in the run (its calls retried
    as any create's), not once per student waiting in turn at the site, and every student there fails with one
    line that says why. `class retry`, once Neutron answers again, makes them all."""
    import json

    keys, _ = klass
    roster = tmp_path / "six.csv"
    write_roster(roster, keys[:6])
    w = world(labctl_env)
    w.inject_fault("kvm@tacc", "POST /v2.0/security-groups", "error500", 100)
    before = len(w.request_log())
    out = run(labctl_env, "class", "up", "hello", "--roster", str(roster), "--site", "sim:kvm@tacc",
              "--course", "mlsys", "--json", check=False, timeout=600)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    rows = json.loads(out.stdout)
    assert [r["status"] for r in rows] == ["failed"] * 6
    assert all(r["error"].startswith("what the class shares at sim:kvm@tacc could not be made: ") for r in rows)
    creates = [p for s, m, p in w.request_log()[before:]
               if s == "kvm@tacc" and m == "POST" and not p.startswith("/identity/")]
    # The class's key pair, once, then its group: nothing of the students was made.
    assert creates[0] == "/compute/v2.1/os-keypairs" and set(creates[1:]) == {"/network/v2.0/security-groups"}
    assert len(creates[1:]) <= 4  # providers.base.CREATE_ATTEMPTS sends, once for the class (6 x 4 before)
    # What was made of it stays for `class retry` (as a failed environment's resources do) or `class down`.
    assert [k["name"] for k in labctl_leftovers(w, "kvm@tacc")["keypairs"]] == [
        "labctl-mlsys-class-sim-kvm-tacc-hello"]
    assert labctl_leftovers(w, "kvm@tacc").keys() == {"keypairs"}

    w.clear_faults()
    out = run(labctl_env, "class", "retry", "hello", "--roster", str(roster), "--site", "sim:kvm@tacc",
              "--course", "mlsys", "--json", timeout=600)
    assert [r["status"] for r in json.loads(out.stdout)] == ["up"] * 6
    assert len(w.inventory("kvm@tacc")["security_groups"]) == 1
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {}


def test_a_class_shares_one_key_pair_and_group_per_site_which_go_after_its_last_environment(labctl_env, klass,
                                                                                            tmp_path):
    """Every student's would hold the same key (the instructor's) and the same rules: the class makes one key pair
    and one group at the site (a deployment of its own) and its environments use them. A key pair quota of 1 and a
    group quota of 2 (the project's default group and the class's) hold a class of 8. `class down` of one student
    keeps them for the others, a plain `down` of them is refused while they are shared, and `class down` of the
    rest deletes them after them."""
    import json

    keys, _ = klass
    roster = tmp_path / "eight.csv"
    write_roster(roster, keys[:8])
    w = world(labctl_env)
    w.set_quota("kvm@tacc", "security_group", 2)
    w.set_quota("kvm@tacc", "key_pairs", 1)
    out = run(labctl_env, "class", "up", "hello", "--roster", str(roster), "--site", "sim:kvm@tacc",
              "--course", "mlsys", "--concurrency", "8", "--json", timeout=600)
    assert [r["status"] for r in json.loads(out.stdout)] == ["up"] * 8
    (group,) = w.inventory("kvm@tacc")["security_groups"]
    assert group["name"] == "labctl-mlsys-class-sim-kvm-tacc-hello"
    (pair,) = w.inventory("kvm@tacc")["keypairs"]
    assert pair["name"] == group["name"]
    servers = labctl_servers(w)
    assert len(servers) == 8 and all(s["security_groups"] == [group["name"]] for s in servers)
    assert all(s["key_name"] == pair["name"] for s in servers)
    rules = [(r["port_range_min"], r["protocol"]) for r in group["rules"] if r["direction"] == "ingress"]
    assert rules == [(22, "tcp")]
    shared_id = group["name"]

    refused = run(labctl_env, "down", shared_id, check=False)
    assert refused.returncode == 2 and "class down hello --course mlsys" in refused.stderr
    assert "Traceback" not in refused.stderr and len(w.inventory("kvm@tacc")["security_groups"]) == 1
    assert len(w.inventory("kvm@tacc")["keypairs"]) == 1

    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--student", "s00", "--yes", timeout=600)
    assert len(labctl_servers(w)) == 7 and len(w.inventory("kvm@tacc")["security_groups"]) == 1
    assert len(w.inventory("kvm@tacc")["keypairs"]) == 1
    status = run_json(labctl_env, "class", "status", "hello", "--course", "mlsys")
    assert sorted(r["student_id"] for r in status) == [f"s{i:02d}" for i in range(1, 8)]  # the group is no student

    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {}
    with contextlib.closing(sqlite3.connect(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db")) as db:
        assert {s for (s,) in db.execute("SELECT status FROM deployments")} == {"destroyed"}


def _moved(line: str) -> bool:
    """`student: <ISO 8601 end>`, as class extend prints a moved end."""
    from datetime import datetime

    _, _, end = line.partition(": ")
    try:
        return datetime.fromisoformat(end).tzinfo is not None
    except ValueError:
        return False


def test_lease_ends_on_three_clouds_shown_and_extended(labctl_env, tmp_path):
    """One student per cloud: every environment has the end its cloud enforces (a Blazar lease, an EC2 or Compute
    Engine instance's scheduled end) in class status, about lease_hours (6 h) from now; class extend moves each by
    the hours asked, or says in its line why it could not."""
    from datetime import UTC, datetime

    roster = tmp_path / "roster.csv"
    write_roster(roster, make_keys(tmp_path / "keys", 3))
    started = datetime.now(UTC)
    run(labctl_env, "class", "up", "hello", "--roster", str(roster), "--sites", "sim:kvm@tacc,sim-aws,sim-gcp",
        "--spread", "--course", "ends", timeout=600)
    status = run_json(labctl_env, "class", "status", "hello", "--course", "ends")
    assert sorted(r["site"] for r in status) == ["sim:aws:us-east-1", "sim:gcp:us-central1-a", "sim:kvm@tacc"]
    ends = {r["site"]: datetime.fromisoformat(r["lease_end"]) for r in status if r["lease_end"]}
    assert sorted(ends) == sorted(r["site"] for r in status), f"an environment without an end: {status}"
    for site, end in ends.items():
        assert 5.9 * 3600 <= (end - started).total_seconds() <= 6.1 * 3600, (site, end)
    lines = run(labctl_env, "class", "extend", "hello", "--hours", "2", "--course", "ends").stdout.splitlines()
    assert len(lines) == 3 and all(_moved(line) or ": not extended: " in line for line in lines), lines
    after = {r["site"]: r["lease_end"] for r in run_json(labctl_env, "class", "status", "hello", "--course", "ends")}
    moved = {line.split(": ", 1)[0] for line in lines if _moved(line)}
    by_student = {r["student_id"]: r["site"] for r in status}
    for student, site in by_student.items():
        delta = (datetime.fromisoformat(after[site]) - ends[site]).total_seconds()
        assert (7140 <= delta <= 7260) if student in moved else delta == 0, (student, site, delta, lines)
    assert by_student[next(s for s, site in by_student.items() if "kvm" in site)] and any(
        "kvm" in by_student[s] for s in moved), "the Chameleon lease was not extended"
    print(f"\nENDS {dict(after)}; extend: {lines}")
    run(labctl_env, "class", "down", "hello", "--course", "ends", "--yes", timeout=600)


def test_class_up_killed_three_times_then_completes_without_duplicates(labctl_env, klass):
    _, roster = klass
    w = world(labctl_env)
    args = ("class", "up", "hello", "--roster", str(roster), "--site", "sim", "--course", "mlsys")
    rng = random.Random(9183)
    for _ in range(3):
        proc = start(labctl_env, *args)
        # Kill after a random number of API calls, so the kill lands at a different point each time: at most 90
        # each, so three kills land before the end of a class that needs ~11 calls per environment (N = 30).
        target = len(w.request_log()) + rng.randint(20, 90)
        kill_when(proc, lambda t=target: len(w.request_log()) >= t, timeout=300)
    run(labctl_env, *args, timeout=600)
    servers = labctl_servers(w)
    assert len(servers) == N
    assert len({s["name"] for s in servers}) == N  # one server per student, no duplicates
    assert len([lease for lease in w.inventory("kvm@tacc")["leases"]]) == N
    status = run_json(labctl_env, "class", "status", "hello", "--course", "mlsys")
    assert len(status) == N and all(r["status"] == "up" for r in status)
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {}


def test_bad_roster_creates_nothing(labctl_env, tmp_path, klass):
    keys, _ = klass
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "student_id,name,email,ssh_public_key\n"
        f"s01,One,s01@uni.edu,{keys[0][1]}\n"
        f"s01,Dup,dup@uni.edu,{keys[1][1]}\n"
        "s;rm -rf,Evil,e@uni.edu,ssh-ed25519 AAAA\n"
    )
    proc = run(labctl_env, "class", "up", "hello", "--roster", str(bad), "--site", "sim", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "bad.csv:3" in proc.stderr and "bad.csv:4" in proc.stderr
    assert not Path(labctl_env["LABCTL_TESTBED_DIR"]).exists() or labctl_leftovers(world(labctl_env)) == {}


def test_two_operators_on_one_postgresql_state_make_one_environment_per_student(labctl_env, klass, pg_server):
    _, roster = klass
    env = {**labctl_env, "LABCTL_STATE_URL": pg_server.new_database()}
    args = ("class", "up", "hello", "--roster", str(roster), "--site", "sim", "--course", "mlsys", "--json")
    first, second = start(env, *args), start(env, *args)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    import json

    results = [json.loads(out) for out, _ in outs]
    made = [r["student_id"] for rs in results for r in rs if r["status"] == "up"]
    assert sorted(made) == sorted(set(made))  # nobody provisioned the same student twice
    w = world(env)
    servers = labctl_servers(w)
    assert len(servers) == N and len({s["name"] for s in servers}) == N
    assert len(w.inventory("kvm@tacc")["leases"]) == N
    # Whatever one operator skipped because the other held it, the other finished: all 30 are up.
    status = run_json(env, "class", "status", "hello", "--course", "mlsys")
    assert len(status) == N and all(r["status"] == "up" for r in status)
    run(env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {}


# `labctl ARGS` with SIGINT raising KeyboardInterrupt, as in a terminal, whatever this process inherited: a child
# of a process that ignores SIGINT (pytest run as a background job of a non-interactive shell, some CI runners)
# inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler, so Ctrl-C would be a no-op.
_INTERACTIVE_LABCTL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'labctl'; runpy.run_module('labctl', run_name='__main__', alter_sys=True)"
)


def start_as_from_a_terminal(env, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _INTERACTIVE_LABCTL, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_ctrl_c_stops_new_work_saves_state_and_a_rerun_finishes(labctl_env, klass):
    import signal

    _, roster = klass
    w = world(labctl_env)
    args = ("class", "up", "hello", "--roster", str(roster), "--site", "sim", "--course", "mlsys",
            "--concurrency", "4")
    proc = start_as_from_a_terminal(labctl_env, *args)
    kill_point = lambda: len(labctl_servers(w)) >= 4  # noqa: E731
    import time

    deadline = time.monotonic() + 120
    while not kill_point() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun" in err
    assert len(labctl_servers(w)) < N  # it stopped starting new environments
    run(labctl_env, *args[:-2], timeout=600)  # the rerun at the default concurrency
    assert len(labctl_servers(w)) == N and len({s["name"] for s in labctl_servers(w)}) == N
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(w) == {}


def test_status_warns_in_one_line_when_under_an_hour_of_the_lease_is_left(labctl_env):
    """`labctl status` (one lab, and the overview) warns on stderr when a lab's end is less than an hour away,
    and when it has passed; JSON carries the same warning. The state is written directly: no cloud is needed."""
    from datetime import UTC, datetime, timedelta

    from labctl.state import DeploymentRecord, StateStore

    store = StateStore(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db")
    soon = (datetime.now(UTC) + timedelta(minutes=30)).isoformat(timespec="seconds")
    later = (datetime.now(UTC) + timedelta(hours=5)).isoformat(timespec="seconds")
    for name, end in (("soon", soon), ("later", later)):
        store.save_deployment(DeploymentRecord(f"labctl-student1-{name}", name, "hello", "student1", None,
                                               "sim:kvm@tacc", "up", None, {"nodes": [], "lease_end": end}))
    store.close()
    one = run(labctl_env, "status", "soon")
    warnings = [line for line in one.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and ("soon: its lease ends in 29 min" in warnings[0]
                                   or "soon: its lease ends in 30 min" in warnings[0]), one.stderr
    assert soon in one.stdout
    assert not [line for line in run(labctl_env, "status", "later").stderr.splitlines() if "warning" in line]
    overview = run(labctl_env, "status")
    assert [line for line in overview.stderr.splitlines() if line.startswith("warning:")] == warnings
    assert "ends in" in run_json(labctl_env, "status", "soon")["warning"]


# A labctl whose engine counts the thread pools it makes for a dependency level's resources.
COUNTING_POOLS = r"""
import atexit, sys
import labctl.engine as engine
made = []
class Counting(engine.ThreadPoolExecutor):
    def __init__(self, *args, **kwargs):
        made.append(kwargs.get("max_workers"))
        super().__init__(*args, **kwargs)
engine.ThreadPoolExecutor = Counting
atexit.register(lambda: print("pools", len(made)))
from labctl.cli import main
sys.argv = ["labctl", *sys.argv[1:]]
main()
"""


def test_class_up_makes_each_environment_in_its_own_thread_and_up_alone_in_parallel(labctl_env, tmp_path):
    """In a class the environments are the concurrency: a thread per keypair, group and lease of each one was 1,200
    threads at the start of a class of 500 (its memory peak). `labctl up` alone still makes a level at once."""
    keys = make_keys(tmp_path / "keys", 3)
    roster = tmp_path / "roster.csv"
    write_roster(roster, keys)

    def labctl(*args: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", COUNTING_POOLS, *args], env=labctl_env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-2:]

    assert labctl("class", "up", "hello", "--roster", str(roster), "--site", "sim", "--course", "mlsys") == [
        "pools", "0"]
    status = run_json(labctl_env, "class", "status", "hello", "--course", "mlsys")
    assert sorted(r["status"] for r in status) == ["up"] * 3
    pools = labctl("up", "hello", "--site", "sim")
    assert pools[0] == "pools" and int(pools[1]) >= 1
    run(labctl_env, "down", "hello", timeout=600)
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert labctl_leftovers(world(labctl_env)) == {}
