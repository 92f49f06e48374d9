"""`labctl class up` for a whole class on the emulated testbed, next to a python-chi notebook loop.

Provisions `--students` environments of `--lab` with labctl's class mode (in-process: `classroom.class_up`)
at one or more emulated Chameleon sites (`--site`, comma-separated) where every API call takes `--latency`
realistic seconds and labctl may send at most `--rate` realistic calls per second per site, all in scaled
time (`--time-scale`, default 0.1: lease start 3 s, VM boot 6 s, 30 ms per call). Then provisions
`--baseline-students` of them one after another with python-chi, as a course notebook loop does, on another
fresh world at the same settings, and extrapolates that linearly to `--students`. Prints, for both: wall
time, the lower bound that the latencies and the rate limit allow, their ratio, API calls per environment,
CPU per API call and peak memory, then the speed-up, and the SSH phase on its own. Tears labctl's class down
with `class_down` and exits 1 if the world still holds anything of labctl's (or a student was not
provisioned). `--json FILE` writes the summary.

Usage: python benchmarks/class_up.py [--students 200] [--time-scale 0.1] [--latency 0.3] [--rate 10]
                                     [--concurrency 32] [--baseline-students 10] [--lab hello]
                                     [--site sim:kvm@tacc[,sim:chi@uc]] [--json FILE] [--tracemalloc]

Each run (labctl, python-chi) happens in a fresh interpreter of its own (this script, with `--role`), and the
emulated clouds it talks to are served by other processes over the same world directory, as `labctl testbed
serve` serves them: one process per emulated site for its HTTP APIs, one for the nodes' SSH. So each client's
CPU time and peak RSS are its own, and the emulators' are reported apart. Everything listens and connects on
127.0.0.1 only (a guard in each process refuses any other address). See benchmarks/README.md for the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

COURSE = "bench"
LABEL_DEFAULT = "other"  # requests made outside any resource's ensure / wait (auth, discovery, preflight)
WAIT = "wait"  # status polls (shared by the whole class in labctl, per student in python-chi)


# ================================================================================================ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", type=int, default=200, help="class size for labctl (default 200)")
    p.add_argument("--time-scale", type=float, default=0.1,
                   help="emulated seconds per realistic second (default 0.1: a 60 s boot takes 6 s; "
                        "0.01 is a stress setting where the emulators' CPU dominates)")
    p.add_argument("--latency", type=float, default=0.3, help="realistic seconds per API call (default 0.3)")
    p.add_argument("--rate", type=float, default=10.0,
                   help="realistic API calls per second allowed per site (default 10); labctl gets rate/scale")
    p.add_argument("--concurrency", type=int, default=32,
                   help="labctl environments in flight per site (default 32)")
    p.add_argument("--baseline-students", type=int, default=10,
                   help="students the python-chi loop provisions; extrapolated linearly (default 10, 0 = skip)")
    p.add_argument("--lab", default="hello",
                   help="a single-node lab or a profile file (default hello: KVM flavor lease + VM + FIP)")
    p.add_argument("--site", default="sim:kvm@tacc",
                   help="emulated Chameleon site(s), comma-separated; students are spread over them "
                        "(default sim:kvm@tacc)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the summary as JSON to FILE")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also report tracemalloc's peak (slows allocation-heavy code, so wall times grow)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (worlds, state, logs)")
    p.add_argument("--ssh-processes", type=int, default=2,
                   help="processes serving the emulated nodes' SSH, each every node on one port (default 2: this "
                        "machine's cores; real nodes are machines of their own)")
    p.add_argument("--timeline", metavar="FILE",
                   help="also write every student's progress events of class up, timed, as JSON to FILE")
    p.add_argument("--role", choices=("labctl", "baseline", "emulator"), help=argparse.SUPPRESS)
    p.add_argument("--roster", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--emulators", help=argparse.SUPPRESS)  # JSON: {"endpoints": {site: url}, "ssh_port": N}
    p.add_argument("--serve", help=argparse.SUPPRESS)  # emulator role: "ssh" or the real site it serves
    p.add_argument("--ready", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if (a.students < 1 or a.baseline_students < 0 or a.time_scale <= 0 or a.rate <= 0 or a.latency < 0
            or a.ssh_processes < 1):
        p.error("--students >= 1, --baseline-students >= 0, --time-scale > 0, --rate > 0, --latency >= 0, "
                "--ssh-processes >= 1")
    if Path(a.lab).is_file():
        a.lab = str(Path(a.lab).resolve())  # the runs' working directory is a temporary one
    a.sites = [s.strip() for s in a.site.split(",")]
    if not all(s.startswith("sim:") for s in a.sites) or len(set(a.sites)) != len(a.sites):
        p.error("--site takes distinct emulated Chameleon sites, e.g. sim:kvm@tacc or sim:kvm@tacc,sim:chi@uc")
    return a


# ================================================================================ helpers for both runs
def loopback_only() -> None:
    """Refuse any connection to an address outside 127.0.0.0/8 (or to a name) in this process."""
    import ipaddress

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        if isinstance(address, tuple) and address:
            try:
                ok = ipaddress.ip_address(address[0]).is_loopback
            except ValueError:
                ok = False
            if not ok:
                raise OSError(f"benchmark loopback guard: refusing to connect to {address[0]!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]


class HttpCounter:
    """Counts the HTTP requests every OpenStack client sends, by what the sending thread was doing.

    openstacksdk, python-blazarclient and python-chi's clients all go through keystoneauth's
    `Session.request`; the label is a per-thread stack set around each resource's ensure/wait.
    """

    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.requests: list[tuple[float, float, str, str, str]] | None = None  # with --timeline: each request
        self.t0 = time.perf_counter()

    def install(self) -> None:
        from keystoneauth1 import session

        original = session.Session.request
        counter = self

        @functools.wraps(original)
        def request(self: Any, *args: Any, **kwargs: Any) -> Any:
            stack = getattr(counter.local, "stack", None)
            with counter.lock:
                counter.counts[stack[-1] if stack else LABEL_DEFAULT] += 1
            began = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                if counter.requests is not None:  # (start, end, thread, method, URL path)
                    url = str(args[0] if args else kwargs.get("url", ""))
                    counter.requests.append((round(began - counter.t0, 3), round(time.perf_counter() - counter.t0, 3),
                                             threading.current_thread().name, str(args[1] if len(args) > 1 else
                                                                                  kwargs.get("method", "")),
                                             url.split("?")[0][-80:]))

        session.Session.request = request

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        stack = self.local.__dict__.setdefault("stack", [])
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()

    def wrap(self, cls: Any, method: str, name: Any) -> None:
        """Label every request `cls.method` makes: `name` is a string or a function of the call's arguments."""
        original = getattr(cls, method, None)
        if original is None:
            print(f"note: {cls.__name__}.{method} not found; its requests count as '{LABEL_DEFAULT}'",
                  file=sys.stderr)
            return
        counter = self

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with counter.label(name(*args, **kwargs) if callable(name) else name):
                return original(*args, **kwargs)

        setattr(cls, method, wrapper)

    def take(self) -> dict[str, int]:
        with self.lock:
            out = dict(self.counts)
            self.counts.clear()
        return out


class ThreadCpu:
    """CPU time (this thread's, `time.thread_time`) spent inside the wrapped functions, summed over threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds = 0.0

    def wrap(self, module: Any, name: str) -> None:
        original = getattr(module, name)
        meter = self

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.thread_time() - began
                with meter.lock:
                    meter.seconds += spent

        setattr(module, name, wrapper)


def ssh_threads_cpu() -> float:
    """CPU time of labctl's SSH threads (the one SSH loop's and its pool's: `labctl.runner.reach`), from their own
    clocks in /proc; 0 where there is none."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for thread in threading.enumerate():
        if not thread.name.startswith("labctl-ssh") or not thread.native_id:
            continue
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def machine_cpu_seconds() -> float | None:
    """CPU time every process of this machine has used since boot (Linux's /proc/stat), None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def lab_shape(lab: str, site_name: str, scale: float) -> dict[str, Any]:
    """What the lower bound needs from the lab's plan: its dependency levels (kinds), resources per kind, and the
    node's image and types (the kinds' lifecycle delays: `add_delays`)."""
    from labctl import service
    from labctl.plan import build_plan, class_shared_plan
    from labctl.testbed.openstack import catalog

    prof, site = service.load(lab, site_name)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkKvZ0Qz2Zl7uF6yN1dYx3dQ3bVQ3bVQ3bVQ3bVQ3bV bench"
    # A student's plan as class mode makes it: what the class shares at the site (made once) is given to it.
    shared = class_shared_plan(prof, site, COURSE, "bench", key)
    plan = build_plan(prof, site, "shape", key, course=COURSE,
                      given={r.key: r for r in shared.resources} if shared else None)
    real = site.stands_for or site.name
    kind = catalog.resolve_site(real).kind  # "kvm" | "baremetal"
    levels = [sorted({r.kind for r in level}) for level in plan.levels()]
    per_kind = Counter(r.kind for r in plan.resources)
    skipped = [s.name for s in prof.setup if not s.safe_on_sim]
    return {"site": site_name, "real_site": real, "site_kind": kind, "reservation": site.reservation, "levels": levels,
            "per_kind": dict(per_kind), "scale": scale, "nodes": len(plan.nodes),
            "image": plan.nodes[0].image, "candidates": list(plan.nodes[0].candidates),
            "lease_hours": prof.lease_hours, "skipped_steps": skipped, "setup_steps": len(prof.setup)}


def add_delays(shape: dict[str, Any]) -> dict[str, Any]:
    """The lifecycle delay of each kind at the shape's time scale, from the emulator's model: read after the run,
    so that labctl's process has not loaded the emulator's code when its peak RSS is taken."""
    from labctl.testbed.openstack.model import base as model

    scale = shape["scale"]
    shape["delays"] = {"reservation": model.LEASE_START_DELAY * scale,
                       "server": model.BOOT_SECONDS.get(shape["site_kind"], 0.0) * scale}
    return shape


def configure_world(world: Any, shape: dict[str, Any], latency: float, n: int) -> None:
    """Realistic latency on every call, and room for the whole class (a course asks Chameleon for that)."""
    from labctl.testbed.openstack import catalog

    world.set_latency("*", latency)
    real = shape["real_site"]
    for candidate in shape["candidates"]:
        if shape["reservation"] == "flavor":
            world.set_flavor_slots(real, candidate, n * shape["nodes"] + 10)
        else:
            world.set_hosts(real, candidate, n * shape["nodes"] + 10)
    world.set_fip_quota(real, n * shape["nodes"] + 10)
    # Every resource Neutron and Nova refuse past a quota, per environment, with room: a group has two egress
    # rules and one per port.
    for counted, per_env in (("security_group", 2), ("security_group_rule", 16), ("network", 2), ("subnet", 2),
                             ("router", 2), ("instances", shape["nodes"]), ("key_pairs", 1)):
        world.set_quota(real, counted, n * per_env + 100)
    world.set_public_subnets(real, min(len(catalog.PUBLIC_PREFIXES), -(-(n * shape["nodes"] + 10)
                                                                       // catalog.FIPS_PER_SUBNET)))


def site_requests(world: Any) -> list[dict[str, Any]]:
    return [r for r in world.request_log(detail=True) if r["site"] != "refapi"]


def peak_rate(requests: list[dict[str, Any]], window: float = 1.0) -> float:
    """Most requests within any `window` seconds of wall time, per second."""
    ts = sorted(r["ts"] for r in requests)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while t - ts[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / window


def leftovers(world: Any, site: str, marker: str) -> dict[str, list[str]]:
    inv = world.inventory(site)
    left: dict[str, list[str]] = {}
    for kind, items in inv.items():
        mine = [str(i.get("name") or i.get("id")) for i in items
                if marker in (str(i.get("name") or "") + str(i.get("description") or ""))]
        if mine:
            left[kind] = mine
    return left


def lower_bound(shapes: list[dict[str, Any]], calls_by_label: dict[str, int], envs: int, busiest_site_requests: float,
                latency_s: float, rate_s: float, envs_by_site: dict[str, int] | None = None,
                burst: float = 0) -> dict[str, Any]:
    """max(critical path of one environment at the slowest site, the busiest site's requests / its rate, and with
    `envs_by_site` the creates' path of each site's last environment, `creates_path`); see the README for the
    derivation."""
    best: dict[str, Any] | None = None
    first = float("inf")  # the shortest path: the earliest any environment's nodes can be up
    for shape in shapes:
        path, chain = 0.0, []
        for level in shape["levels"]:
            best_kind, best_cost, best_calls = None, -1.0, 0.0
            for kind in level:
                calls = calls_by_label.get(kind, 0) / envs / max(1, shape["per_kind"].get(kind, 1))
                cost = calls * latency_s + shape["delays"].get(kind, 0.0)
                if cost > best_cost:
                    best_kind, best_cost, best_calls = kind, cost, calls
            path += best_cost
            chain.append((best_kind, round(best_calls, 2), round(shape["delays"].get(best_kind, 0.0), 4)))
        first = min(first, path)
        if best is None or path > best["path"]:
            best = {"path": path, "chain": chain, "site": shape["real_site"]}
    assert best is not None
    chain = best["chain"]
    rate_term = busiest_site_requests / rate_s
    creates, kind, site = max(((*creates_path(shape, envs_by_site[shape["site"]], latency_s, rate_s, burst),
                                shape["site"]) for shape in shapes if (envs_by_site or {}).get(shape["site"])),
                              default=(0.0, "", ""))
    return {"bound": max(best["path"], rate_term, creates), "path": best["path"], "first_path": first,
            "rate_term": rate_term,
            "chain": chain, "site": best["site"], "sequential_calls": sum(c for _, c, _ in chain),
            "delays": sum(d for _, _, d in chain),
            "creates_path": creates, "creates_path_kind": kind, "creates_path_site": site}


def creates_path(shape: dict[str, Any], envs: int, latency_s: float, rate_s: float, burst: float) -> tuple[float, str]:
    """When a site's last environment can be through its API path if each resource took one call, its create, and
    the site's calls shared one rate limit (a bucket of `burst` calls, refilled at `rate_s`): the last create of
    kind k comes after every environment's creates of k and of the levels before k's (an environment makes a level
    once the levels before it are made). Its answer, k's lifecycle delay and one create per later level follow.
    Not the calls labctl made: a client that made more would not raise it. (seconds, the kind that bounds it)"""
    levels = shape["levels"]
    count = {kind: max(1, shape["per_kind"].get(kind, 1)) for level in levels for kind in level}
    best, before = (0.0, ""), 0
    for j, level in enumerate(levels):
        after = sum(latency_s + max(shape["delays"].get(k, 0.0) for k in later) for later in levels[j + 1:])
        for kind in level:
            queued = max(0.0, envs * (before + count[kind]) - burst) / rate_s
            best = max(best, (queued + latency_s + shape["delays"].get(kind, 0.0) + after, kind))
        before += sum(count[k] for k in level)
    return best


def write_result(path: str, data: dict[str, Any]) -> None:
    """Whole or not at all: the parent polls for the file and reads it as soon as it exists."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ================================================================================ the emulators' processes
class ServedTestbed:
    """The emulated clouds as labctl's adapters and this benchmark see a `Testbed`, served by other processes
    over one world directory: each site's HTTP APIs by its own process, every node's SSH by another."""

    def __init__(self, state_dir: str, endpoints: dict[str, str], ssh_port: int) -> None:
        from labctl.testbed.world import World

        self.world = World(state_dir)  # the same world on disk: credentials, request log, capacity
        self.endpoints = endpoints
        self.ssh_port = ssh_port
        self.ssh_elsewhere = True

    def endpoint(self, site: str) -> str:
        from labctl.testbed.openstack import catalog

        return self.endpoints[catalog.resolve_site(site).name]

    def site_url(self, site: str) -> str:
        from labctl.testbed.openstack import catalog

        return f"{self.endpoint(site)}/{catalog.resolve_site(site).slug}"

    def auth_url(self, site: str) -> str:
        return f"{self.site_url(site)}/identity/v3"

    @property
    def refapi_url(self) -> str:
        return f"{next(iter(self.endpoints.values()))}/refapi"

    def os_env(self, site: str) -> dict[str, str]:
        from labctl.testbed.openstack import catalog  # not the server: this process only calls the emulators

        return catalog.openstack_env(site, self.auth_url(site), self.world.credentials)

    def wait_ssh(self, address: str, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((address, int(port))) == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SSH listener on {address}:{port} after {timeout:g}s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Nothing to stop here: the parent stops the emulators' processes."""


def profile_threads() -> list[Any]:
    """cProfile every thread started from now on (one profiler per thread: cProfile sees only its own)."""
    import cProfile

    profiles: list[Any] = []

    def start(*_: Any) -> None:
        profile = cProfile.Profile(time.thread_time)  # CPU time: waits (latency, locks, sockets) left out
        profiles.append(profile)
        profile.enable()  # replaces this hook in the new thread

    threading.setprofile(start)
    return profiles


def dump_profiles(profiles: list[Any], out: Path) -> None:
    """Every thread's profile, merged, as a pstats file (`python -m pstats FILE`)."""
    import pstats

    out.parent.mkdir(parents=True, exist_ok=True)
    stats = None
    for profile in list(profiles):
        profile.disable()
        profile.create_stats()
        if not profile.stats:
            continue
        if stats is None:
            stats = pstats.Stats(profile)
        else:
            stats.add(profile)
    if stats is not None:
        stats.dump_stats(str(out))


def run_emulator(a: argparse.Namespace) -> int:
    """Child: serve one site's HTTP APIs (or, with `--serve ssh`, every node's SSH) over the world until SIGTERM;
    then write this process's CPU time and peak RSS."""
    loopback_only()
    from labctl.testbed.server import Testbed

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ssh = a.serve == "ssh"
    profiles = profile_threads() if os.environ.get("LABCTL_BENCH_PROFILE") else None  # the servers' threads too
    tb = Testbed.start(os.environ["LABCTL_TESTBED_DIR"], time_scale=a.time_scale, ssh=ssh, shared_ssh_port=ssh)
    if ssh:
        tb.slow_ssh_polls(0.05)  # a node answers SSH within 50 ms of becoming reachable
    cpu0, children0 = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    write_result(a.ready, {"endpoint": tb.endpoint, "ssh_port": tb.ssh_port})
    stop.wait()
    cpu = cpu_seconds() - cpu0
    tb.stop()
    # The nodes' own processes (their machines' holders, each session's commands), reaped by now.
    children = cpu_seconds(resource.RUSAGE_CHILDREN) - children0
    if profiles is not None:
        name = Path(a.result).name.split(".")[0]  # ssh, ssh-2, ... or the site
        dump_profiles(profiles, Path(os.environ["LABCTL_BENCH_PROFILE"]) / f"emulator-{name}.prof")
    write_result(a.result, {"serves": a.serve, "cpu": cpu, "children_cpu": children, "peak_rss_mib": peak_rss_mib()})
    return 0


class Emulators:
    """The emulators' processes for one run: one per site, one for SSH (the parent's side)."""

    def __init__(self, root: Path, role: str, sites: list[str], scale: float, ssh_processes: int = 1) -> None:
        self.root, self.role, self.scale, self.ssh_processes = root, role, scale, ssh_processes
        self.dir = root / role / "emulators"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.sites = [s.split(":", 1)[1] for s in sites]

    def start(self) -> Path:
        """Start them, wait until each serves; return the file the client reads the endpoints from."""
        endpoints: dict[str, str] = {}
        ssh_port = 0
        # The SSH side may be served by several processes: each serves every node on the world's one port
        # (SO_REUSEPORT), and the kernel spreads the connections over them, as over a class's many machines.
        ssh = [(f"ssh-{i + 1}" if i else "ssh", "ssh") for i in range(self.ssh_processes)]
        for name, serves in [*((site, site) for site in self.sites), *ssh]:
            ready = self.dir / f"{name}.ready.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "emulator", "--serve", serves,
                   "--time-scale", repr(self.scale), "--ready", str(ready),
                   "--result", str(self.dir / f"{name}.result.json")]
            proc = subprocess.Popen(cmd, env=child_env(self.root, self.role, self.scale), cwd=self.root)
            self.procs.append((name, proc))
            deadline = time.monotonic() + 120
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"the emulator for {name} did not start (exit {proc.returncode})")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            if serves == "ssh":
                ssh_port = int(info["ssh_port"])
            else:
                endpoints[serves] = info["endpoint"]
        out = self.dir / "emulators.json"
        write_result(str(out), {"endpoints": endpoints, "ssh_port": ssh_port})
        return out

    def stop(self) -> dict[str, Any]:
        """SIGTERM them all; their CPU time and peak RSS."""
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        usage: dict[str, Any] = {}
        for serves, proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            result = self.dir / f"{serves}.result.json"
            if result.exists():
                usage[serves] = json.loads(result.read_text())
        self.procs.clear()
        return usage


def served_testbed(a: argparse.Namespace) -> ServedTestbed:
    info = json.loads(Path(a.emulators).read_text())
    return ServedTestbed(os.environ["LABCTL_TESTBED_DIR"], info["endpoints"], int(info["ssh_port"]))


# ======================================================================================= the labctl run
def ssh_phase_alone(a: argparse.Namespace, ctx: Any, classroom: Any, roster: Path) -> float | None:
    """The SSH phase's bound: one student's environment provisioned alone on the idle world (another course),
    timed from its first SSH wait to the end of its setup; then deleted."""
    one = roster.with_name("roster-one.csv")
    with roster.open(newline="") as src, one.open("w", newline="") as dst:
        dst.writelines(list(src)[:2])
    began: list[float] = []
    ended: list[float] = []

    def student(sid: str, stage: str, detail: str) -> None:
        if stage == "waiting" and detail.startswith("ssh ") and not began:
            began.append(time.perf_counter())

    opts = classroom.ClassOptions(lab=a.lab, course=f"{COURSE}-alone", sites=a.sites[:1], roster=one,
                                  concurrency=1, rate=a.rate / a.time_scale)
    classroom.class_up(ctx, opts, classroom.ClassEvents(
        student=student, finished=lambda result: ended.append(time.perf_counter())))
    classroom.class_down(ctx, a.lab, f"{COURSE}-alone", concurrency=1)
    return ended[0] - began[0] if began and ended else None


def run_labctl(a: argparse.Namespace) -> int:
    """Child: `class_up` for the roster on a fresh world, then `class_down`. Env vars are set by the parent; the
    emulators are other processes (`--emulators`)."""
    loopback_only()
    if a.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    from labctl import classroom, service
    from labctl.engine import Engine
    from labctl.providers.kit import BURST

    scale = a.time_scale
    shapes = {site: lab_shape(a.lab, site, scale) for site in a.sites}
    tb = served_testbed(a)
    world = tb.world
    for shape in shapes.values():
        configure_world(world, shape, a.latency, a.students)
    world.clear_request_log()

    counter = HttpCounter()
    counter.install()
    counter.wrap(Engine, "_ensure", lambda self, plan, res, *rest, **kw: res.kind)
    counter.wrap(Engine, "_wait", WAIT)
    # labctl's SSH phase (waiting for the nodes, pinning host keys, setup: one `run_setup` with `wait_first`) starts
    # in each environment's thread and runs on the process's one SSH loop: both parts' CPU is told apart from the
    # API path's.
    from labctl.runner import ssh as runner

    ssh_cpu = ThreadCpu()
    ssh_cpu.wrap(runner, "run_setup")

    done: list[str] = []
    ssh_started: dict[str, float] = {}
    ssh_phase: list[float] = []
    started = time.perf_counter()

    timeline: list[tuple[float, str, str, str, str]] = []
    if a.timeline:
        counter.requests = []

    def student(sid: str, stage: str, detail: str) -> None:
        if a.timeline:
            timeline.append((round(time.perf_counter() - started, 3), sid, stage, detail,
                             threading.current_thread().name))
        if stage == "waiting" and detail.startswith("ssh ") and sid not in ssh_started:
            ssh_started[sid] = time.perf_counter()

    def finished(result: Any) -> None:
        done.append(result.status)
        if result.student_id in ssh_started:
            ssh_phase.append(time.perf_counter() - ssh_started[result.student_id])
        if len(done) % max(1, a.students // 10) == 0 or len(done) == a.students:
            say(f"  labctl: {len(done)}/{a.students} finished ({Counter(done)}) at "
                f"{time.perf_counter() - started:.1f} s")

    ctx = service.Context.create(owner="bench", testbed=tb)
    opts = classroom.ClassOptions(lab=a.lab, course=COURSE, sites=a.sites, roster=Path(a.roster),
                                  concurrency=a.concurrency, rate=a.rate / scale, spread=len(a.sites) > 1)
    say(f"labctl: class up {a.lab} for {a.students} students at {', '.join(a.sites)} (concurrency "
        f"{a.concurrency} per site, rate {a.rate / scale:g}/s per site, latency {a.latency * scale * 1000:g} ms, "
        f"time scale {scale:g})")
    profiles = profile_threads() if os.environ.get("LABCTL_BENCH_PROFILE") else None  # class up's threads
    cpu0, machine0, ssh_threads0 = cpu_seconds(), machine_cpu_seconds(), ssh_threads_cpu()
    started = time.perf_counter()
    results = classroom.class_up(ctx, opts, classroom.ClassEvents(student=student, finished=finished))
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu0
    machine_cpu = (machine_cpu_seconds() or 0.0) - machine0 if machine0 is not None else None
    ssh_cpu_up = ssh_cpu.seconds + ssh_threads_cpu() - ssh_threads0  # the callers' part, and the SSH loop's
    if a.timeline:
        shift = started - counter.t0
        Path(a.timeline).write_text(json.dumps({"events": timeline, "requests": [
            (b - shift, e - shift, *rest) for b, e, *rest in counter.requests or []]}))
    if profiles is not None:
        threading.setprofile(None)  # type: ignore[arg-type]
        dump_profiles(profiles, Path(os.environ["LABCTL_BENCH_PROFILE"]) / "labctl-up.prof")
    up_requests = site_requests(world)
    by_label = counter.take()
    statuses = Counter(r.status for r in results)
    envs_by_site = Counter(r.site for r in results)
    errors = sorted({r.error for r in results if r.error})[:5]
    tm_peak = None
    if a.tracemalloc:
        import tracemalloc

        tm_peak = tracemalloc.get_traced_memory()[1] / 2**20
    rss = peak_rss_mib()

    say(f"labctl: class down {a.lab} ({a.students} environments)")
    world.clear_request_log()
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    down = classroom.class_down(ctx, a.lab, COURSE, concurrency=a.concurrency)
    down_wall = time.perf_counter() - started
    down_cpu = cpu_seconds() - cpu0
    down_requests = len(site_requests(world))
    solo = ssh_phase_alone(a, ctx, classroom, Path(a.roster))
    left = {site: leftovers(world, shape["real_site"], "labctl") for site, shape in shapes.items()}
    left = {k: v for k, v in left.items() if v}
    left_state = [d.id for d in classroom.class_deployments(ctx, COURSE, a.lab)]

    total = len(up_requests)
    per_site = Counter(r["site"] for r in up_requests)
    bound = lower_bound([add_delays(shape) for shape in shapes.values()], by_label, a.students,
                        max(per_site.values(), default=0), a.latency * scale, a.rate / scale,
                        envs_by_site=dict(envs_by_site), burst=BURST)
    write_result(a.result, {
        "who": "labctl", "students": a.students, "wall": wall, "cpu": cpu, "ssh_cpu": ssh_cpu_up,
        "machine_cpu": machine_cpu, "cores": os.cpu_count(),
        "requests": total,
        "requests_by_site": dict(per_site),
        "requests_counted": sum(by_label.values()), "by_label": by_label, "statuses": dict(statuses),
        "errors": errors, "peak_rss_mib": rss, "tracemalloc_peak_mib": tm_peak,
        "peak_rate": peak_rate(up_requests), "bound": bound, "shape": next(iter(shapes.values())),
        "ssh_phase": sorted(ssh_phase), "ssh_phase_alone": solo,
        "down_wall": down_wall, "down_cpu": down_cpu, "down_requests": down_requests,
        "down_statuses": dict(Counter(r.status for r in down)), "leftovers": left, "left_in_state": left_state,
    })
    return 0


# ================================================================================ the python-chi baseline
class ScaledTime:
    """Stands in for the `time` module inside python-chi's modules: sleeps are scaled, the rest is `time`."""

    def __init__(self, scale: float) -> None:
        self._scale = scale

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds * self._scale)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def run_baseline(a: argparse.Namespace) -> int:
    """Child: python-chi 1.2.10, one student after another, as a course notebook loop does."""
    loopback_only()
    if a.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    scale = a.time_scale
    shape = lab_shape(a.lab, a.sites[0], scale)
    if shape["nodes"] != 1 or shape["reservation"] not in ("flavor", "host"):
        raise SystemExit(f"the python-chi baseline supports single-node leased labs only ({a.lab} is not one)")
    tb = served_testbed(a)
    world = tb.world
    configure_world(world, shape, a.latency, a.baseline_students)
    real = shape["real_site"]

    os.environ["CHI_RESOURCE_API_URL"] = tb.refapi_url  # read when chi is first imported
    # python-chi makes a neutronclient per call, which logs a deprecation warning each time.
    logging.getLogger("neutronclient.v2_0.client").setLevel(logging.ERROR)
    import chi
    import chi.lease
    import chi.network
    import chi.server
    import chi.util

    # python-chi polls every 5 s of wall time (TimerProgressBar.wait, and a few fixed sleeps): scale them
    # like everything else by replacing only these modules' own `time` name. Their timeouts stay unscaled.
    for module in (chi.util, chi.lease, chi.server):
        if hasattr(module, "time"):
            module.time = ScaledTime(scale)

    counter = HttpCounter()
    counter.install()
    counter.wrap(chi.lease.Lease, "wait", WAIT)
    counter.wrap(chi.server.Server, "wait", WAIT)

    env = tb.os_env(real)
    chi.reset()
    chi.set("auth_type", "v3applicationcredential")  # use_site() is skipped: it would look the site up online
    chi.set("auth_url", env["OS_AUTH_URL"])
    chi.set("region_name", env["OS_REGION_NAME"])
    chi.set("application_credential_id", env["OS_APPLICATION_CREDENTIAL_ID"])
    chi.set("application_credential_secret", env["OS_APPLICATION_CREDENTIAL_SECRET"])

    with open(a.roster, newline="") as f:
        students = list(csv.DictReader(f))[: a.baseline_students]
    flavor_or_type = shape["candidates"][0]
    made: list[tuple[Any, Any, str]] = []
    connectivity = "checked"

    def one(student: dict[str, str]) -> None:
        nonlocal connectivity
        sid = student["student_id"]
        with counter.label("keypair"):
            chi.server.update_keypair(f"chi-{sid}", public_key=student["ssh_public_key"])
        with counter.label("reservation"):
            lease = chi.lease.Lease(f"chi-{sid}", duration=timedelta(hours=shape["lease_hours"]))
            if shape["reservation"] == "flavor":
                lease.add_flavor_reservation(name=flavor_or_type, amount=1)
            else:
                lease.add_node_reservation(amount=1, node_type=flavor_or_type)
            lease.submit(wait_for_active=True, idempotent=True)
        with counter.label("server"):
            if shape["reservation"] == "flavor":
                rid = lease.flavor_reservations[0]["id"]
                flavor = lease.get_reserved_flavors()[0].name  # python-chi's helper: "reservation:<id>"
            else:
                rid, flavor = lease.node_reservations[0]["id"], "baremetal"
            server = chi.server.Server(f"chi-{sid}-node", reservation_id=rid, image_name=shape["image"],
                                       key_name=f"chi-{sid}", flavor_name=flavor)
            server.submit(show=None, wait_for_active=True, idempotent=True)
        made.append((lease, server, sid))
        with counter.label("floating_ip"):
            server.associate_floating_ip()  # no argument: any unbound floating IP of the project, or a new one
        with counter.label("connectivity"):
            # The emulated node answers SSH on the testbed's port, not 22; python-chi can target it.
            try:
                server.check_connectivity(port=tb.ssh_port, show=None)
            except Exception as exc:  # noqa: BLE001 - reported, the loop goes on as a notebook would
                connectivity = f"failed: {exc}"

    say(f"python-chi: {len(students)} students one after another at {real} (emulated)")
    world.clear_request_log()
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    errors: list[str] = []
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # python-chi prints progress
        for i, student in enumerate(students, 1):
            try:
                one(student)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{student['student_id']}: {exc}")
            say(f"  python-chi: {i}/{len(students)} at {time.perf_counter() - started:.1f} s")
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu0
    up_requests = site_requests(world)
    by_label = counter.take()
    tm_peak = None
    if a.tracemalloc:
        import tracemalloc

        tm_peak = tracemalloc.get_traced_memory()[1] / 2**20
    rss = peak_rss_mib()

    # Clean up (not timed): servers, their floating IPs, leases, key pairs.
    conn = chi.server.connection(session=chi.server.session())
    from blazarclient import client as blazar_client

    bz = blazar_client.Client("1", session=conn.session, service_type="reservation", region_name=env["OS_REGION_NAME"])
    ids = set()
    for _, server, _ in made:
        with contextlib.suppress(Exception):
            s = conn.compute.find_server(server.name)
            if s:
                ids.add(s.id)
                conn.compute.delete_server(s.id)
    deadline = time.monotonic() + 60
    while ids and time.monotonic() < deadline:
        ids &= {s.id for s in conn.compute.servers()}
        time.sleep(0.05)
    for ip in conn.network.ips():
        conn.network.delete_ip(ip)
    for lease in bz.lease.list():
        bz.lease.delete(lease["id"])
    for kp in conn.compute.keypairs():
        conn.compute.delete_keypair(kp)
    left = leftovers(world, real, "chi-")
    tb.stop()

    n = len(students)
    total = len(up_requests)
    bound = lower_bound([add_delays(shape)], by_label, n, total / n * a.students, a.latency * scale, a.rate / scale)
    write_result(a.result, {
        "who": "python-chi", "students": n, "wall": wall, "cpu": cpu, "requests": total,
        "requests_counted": sum(by_label.values()), "by_label": by_label, "errors": errors,
        "peak_rss_mib": rss, "tracemalloc_peak_mib": tm_peak, "peak_rate": peak_rate(up_requests),
        "bound": bound, "shape": shape, "connectivity": connectivity, "leftovers": left,
    })
    return 0


# ================================================================================================ parent
def make_roster(path: Path, n: int) -> None:
    """n students with real ed25519 keys (as tests/e2e/test_class_sim.py makes them)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student_id", "name", "email", "ssh_public_key"])
        for i in range(n):
            public = Ed25519PrivateKey.generate().public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
            w.writerow([f"s{i:03d}", f"Student {i}", f"s{i:03d}@uni.edu", f"{public} s{i:03d}@laptop"])


def child_env(root: Path, name: str, scale: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OS_", "AWS_", "GOOGLE_", "CLOUDSDK_", "LABCTL_", "CHI_"))}
    home = root / name / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        LABCTL_TESTBED_DIR=str(root / name / "testbed"),
        LABCTL_STATE_DIR=str(root / name / "state"),
        LABCTL_CONFIG_DIR=str(root / name / "config"),
        LABCTL_TESTBED_TIME_SCALE=repr(scale),
        LABCTL_OWNER="bench",
        NO_COLOR="1",
    )
    if os.environ.get("LABCTL_BENCH_PROFILE"):
        env["LABCTL_BENCH_PROFILE"] = os.environ["LABCTL_BENCH_PROFILE"]  # run_emulator dumps its profile there
    return env


def run_child(role: str, a: argparse.Namespace, argv: list[str], root: Path, roster: Path) -> dict[str, Any]:
    """One client run in its own interpreter, against emulators in processes of their own (the same world)."""
    result = root / f"{role}.json"
    sites = a.sites if role == "labctl" else a.sites[:1]
    emulators = Emulators(root, role, sites, a.time_scale, a.ssh_processes)
    try:  # an emulator that failed to start stops the ones already started
        endpoints = emulators.start()
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--role", role, "--roster", str(roster),
               "--result", str(result), "--emulators", str(endpoints)]
        proc = subprocess.run(cmd, env=child_env(root, role, a.time_scale), cwd=root)
    finally:
        usage = emulators.stop()
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"the {role} run failed (exit {proc.returncode})")
    data = json.loads(result.read_text())
    data["emulators"] = usage
    return data


def summarize(a: argparse.Namespace, lab: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """The figures issue 14 asks for, as `--json` writes them."""
    n = a.students
    ssh = lab["ssh_phase"]

    def pct(q: float) -> float | None:
        return ssh[min(len(ssh) - 1, int(q * len(ssh)))] if ssh else None

    emulator_cpu = sum(u.get("cpu", 0.0) for u in lab["emulators"].values())
    nodes_cpu = sum(u.get("children_cpu", 0.0) for u in lab["emulators"].values())
    alone = lab.get("ssh_phase_alone") or 0.0
    # One environment cannot finish before its API path and then its SSH phase (timed alone); nor the class
    # before the busiest site's calls have passed its rate limit, nor before a site's last environment has had its
    # creates through the limiter behind the others' (`creates_path`), then its SSH phase.
    parts = lab["bound"]
    bound = max(parts["path"] + alone, parts["rate_term"], parts.get("creates_path", 0.0) + alone)
    earlier = max(parts["path"] + alone, parts["rate_term"])  # the bound of the figures before 2026-12-05
    return {
        "settings": {"students": n, "sites": a.sites, "lab": a.lab, "time_scale": a.time_scale,
                     "latency_s": a.latency, "rate_per_s": a.rate, "concurrency_per_site": a.concurrency,
                     "baseline_students": a.baseline_students, "commit": git_commit()},
        "wall_s": lab["wall"], "bound_s": bound, "wall_over_bound": lab["wall"] / bound,
        "bound_parts_s": {"api_path": parts["path"], "ssh_alone": alone, "rate_term": parts["rate_term"],
                          "creates_path": parts.get("creates_path", 0.0)},
        "wall_over_bound_without_creates_path": lab["wall"] / earlier,
        "speedup": (base["wall"] / base["students"] * n / lab["wall"]) if base else None,
        "calls_per_env_up": lab["requests"] / n, "calls_per_env_down": lab["down_requests"] / n,
        "client_cpu_s": lab["cpu"], "client_cpu_ms_per_call": lab["cpu"] / max(1, lab["requests"]) * 1000,
        "client_cpu_ms_per_env": lab["cpu"] / n * 1000,
        # The same without the SSH phase (waiting for the nodes, host keys, setup over SSH): the API path's CPU.
        "client_ssh_cpu_ms_per_env": lab["ssh_cpu"] / n * 1000,
        "client_api_cpu_ms_per_call": (lab["cpu"] - lab["ssh_cpu"]) / max(1, lab["requests"]) * 1000,
        "emulator_cpu_s": emulator_cpu, "nodes_cpu_s": nodes_cpu,
        # This machine during class up: every process's CPU (the emulated cloud and its nodes share these cores
        # with labctl). What the others used, spread over every core, is a floor no client beats here.
        "machine": machine_figures(lab, parts["first_path"], nodes_cpu),
        "emulator_cpu_ms_per_call": emulator_cpu / max(1, lab["requests"]) * 1000,
        "peak_rss_mib": lab["peak_rss_mib"],
        "emulator_peak_rss_mib": {k: u.get("peak_rss_mib") for k, u in lab["emulators"].items()},
        "ssh_phase_s": {"bound": lab.get("ssh_phase_alone"), "min": ssh[0] if ssh else None, "median": pct(0.5),
                        "p95": pct(0.95), "max": ssh[-1] if ssh else None,
                        "p95_over_bound": (pct(0.95) or 0) / alone if alone else None},
        "statuses": lab["statuses"], "errors": lab["errors"], "down_statuses": lab["down_statuses"],
        "down_wall_s": lab["down_wall"],
        "baseline": None if not base else {
            "students": base["students"], "wall_s": base["wall"], "wall_per_student_s": base["wall"] / base["students"],
            "calls_per_env": base["requests"] / base["students"],
            "cpu_ms_per_call": base["cpu"] / max(1, base["requests"]) * 1000, "peak_rss_mib": base["peak_rss_mib"]},
    }


def machine_figures(lab: dict[str, Any], first_path: float, nodes_cpu: float) -> dict[str, Any] | None:
    """Every process's CPU on this machine during class up, and two floors no client beats here: what the other
    processes used, spread over every core; and the nodes' own work (their machines, the setup steps' commands),
    which starts once the shortest API path (`first_path`, at the quickest site) has brought a node up, then
    spread over every core. The lower bound counts neither: on a real cloud the nodes have CPUs of their own."""
    machine_cpu, cores = lab.get("machine_cpu"), lab.get("cores") or 1
    if machine_cpu is None:
        return None
    others_floor = max(0.0, machine_cpu - lab["cpu"]) / cores
    nodes_floor = first_path + nodes_cpu / cores
    return {"cpu_s": machine_cpu, "cores": cores, "busy": machine_cpu / (lab["wall"] * cores),
            "others_floor_s": others_floor, "nodes_floor_s": nodes_floor,
            "wall_over_nodes_floor": lab["wall"] / nodes_floor if nodes_floor else None}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return done.stdout.strip() or None


def report(a: argparse.Namespace, lab: dict[str, Any], base: dict[str, Any] | None) -> None:
    scale = a.time_scale
    n = a.students
    shape = lab["shape"]
    rows = [("", "students", "wall s", "bound s", "wall/bound", "API calls/env", "peak RSS MiB", "CPU s")]
    sm = summarize(a, lab, base)
    rows.append(("labctl class up", f"{n}", f"{lab['wall']:.1f}", f"{sm['bound_s']:.2f}",
                 f"{sm['wall_over_bound']:.2f}", f"{lab['requests'] / n:.1f}", f"{lab['peak_rss_mib']:.0f}",
                 f"{lab['cpu']:.1f}"))
    if base:
        m = base["students"]
        bb = base["bound"]
        extra = base["wall"] / m * n
        rows.append((f"python-chi loop ({m} -> {n})", f"{n}", f"{extra:.1f}", f"{bb['bound']:.2f}",
                     f"{extra / bb['bound']:.1f}", f"{base['requests'] / m:.1f}", f"{base['peak_rss_mib']:.0f}",
                     f"{base['cpu'] / m * n:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print(f"class up of lab '{a.lab}' at {a.site}: {n} students, latency {a.latency:g} s/call, rate limit "
          f"{a.rate:g} calls/s, time scale {scale:g} (all times below are scaled wall times)")
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    if base:
        speedup = base["wall"] / base["students"] * n / lab["wall"]
        print(f"speed-up (python-chi extrapolated wall / labctl wall): {speedup:.1f}x")
        print(f"python-chi ran {base['students']} students one after another in {base['wall']:.1f} s "
              f"({base['wall'] / base['students']:.2f} s each); its wall, CPU and bound for {n} are extrapolated "
              "linearly (its calls per student grow with the class, see the README: this favours python-chi)")
    print()
    print("lower bound = max(critical path of one environment + its SSH phase alone, all API calls / rate,")
    print("                  creates' path of a site's last environment + its SSH phase alone)")
    print("  critical path = sum over the plan's dependency levels of max over the level's kinds of")
    print("                  (calls the client sent for that kind per env x latency + lifecycle delay of the kind)")
    for who, res, envs in (("labctl", lab, n), ("python-chi", base, n)):
        if not res:
            continue
        b = res["bound"]
        chain = " + ".join(f"{k} {c:g} calls" + (f" & {d:g} s" if d else "") for k, c, d in b["chain"])
        print(f"  {who}: path = {b['sequential_calls']:g} sequential calls x {a.latency * scale * 1000:g} ms + "
              f"{b['delays']:g} s of lease start & boot = {b['path']:.3f} s   [{chain}]")
        total = res["requests"] / res["students"] * envs
        print(f"  {who}: rate term = {total:.0f} calls / {a.rate / scale:g} per s = {b['rate_term']:.2f} s")
        if b.get("creates_path"):
            print(f"  {who}: creates' path = {b['creates_path']:.2f} s at {b['creates_path_site']}: one call per "
                  f"resource, the last {b['creates_path_kind']} create behind every environment's creates of its "
                  "kind and the levels before at the limit, then its delay and the later levels")
    print()
    labels = sorted(set(lab["by_label"]) | set(base["by_label"] if base else {}))
    print("API calls per environment by what they were for (client-side count; polls = status waits):")
    for who, res in (("labctl", lab), ("python-chi", base)):
        if res:
            parts = ", ".join(f"{k} {res['by_label'].get(k, 0) / res['students']:.2f}" for k in labels)
            print(f"  {who:10} {parts}  (server log: {res['requests']} requests, client count "
                  f"{res['requests_counted']})")
    print()
    print(f"labctl: {lab['statuses']}, CPU {lab['cpu']:.1f} s in {lab['wall']:.1f} s wall "
          f"({lab['cpu'] / lab['wall']:.0%} of one core; {sm['client_cpu_ms_per_call']:.1f} ms CPU per API call, "
          f"{sm['client_cpu_ms_per_env']:.0f} ms per environment, labctl's process alone, SSH and setup included; "
          f"without the SSH phase's {sm['client_ssh_cpu_ms_per_env']:.0f} ms per environment: "
          f"{sm['client_api_cpu_ms_per_call']:.1f} ms per API call); "
          f"peak API rate {lab['peak_rate'] * scale:.1f} realistic calls/s (limit {a.rate:g} per site), "
          f"average {lab['requests'] / lab['wall'] * scale:.2f}")
    print(f"emulators (their own processes): CPU {sm['emulator_cpu_s']:.1f} s, "
          f"{sm['emulator_cpu_ms_per_call']:.1f} ms per API call; peak RSS "
          + ", ".join(f"{k} {v:.0f} MiB" for k, v in sm["emulator_peak_rss_mib"].items() if v is not None)
          + f"; the nodes' own processes (machines, sessions' commands): CPU {sm['nodes_cpu_s']:.1f} s")
    if (mach := sm["machine"]) is not None:
        print(f"this machine during class up: {mach['cpu_s']:.1f} s of CPU by every process on {mach['cores']} "
              f"cores ({mach['busy']:.0%} busy); what the others (emulators, nodes, anything else) used, spread "
              f"over the cores: {mach['others_floor_s']:.1f} s; the nodes' own work after the shortest API path: "
              f"{mach['nodes_floor_s']:.1f} s (wall / that floor: {mach['wall_over_nodes_floor']:.2f})")
    ph = sm["ssh_phase_s"]
    if ph["min"] is not None:
        print(f"SSH phase per environment (first SSH wait to setup done: wait for the node, pin its host key, "
              f"{shape['setup_steps']} setup steps): alone {ph['bound'] or 0:.2f} s (its bound: one environment "
              f"provisioned alone on the idle world); in the class: min {ph['min']:.2f} s, median "
              f"{ph['median']:.2f} s, p95 {ph['p95']:.2f} s, max {ph['max']:.2f} s"
              + (f"; p95/bound {ph['p95_over_bound']:.1f}" if ph["p95_over_bound"] else ""))
    print(f"labctl class up: wall {sm['wall_s']:.1f} s against a bound of {sm['bound_s']:.2f} s = max(API path "
          f"{sm['bound_parts_s']['api_path']:.2f} s + SSH phase alone {sm['bound_parts_s']['ssh_alone']:.2f} s, "
          f"rate term {sm['bound_parts_s']['rate_term']:.2f} s, creates' path "
          f"{sm['bound_parts_s']['creates_path']:.2f} s + SSH phase alone): {sm['wall_over_bound']:.2f}x "
          f"({sm['wall_over_bound_without_creates_path']:.2f}x without the creates' path)")
    print(f"labctl setup over SSH per student: the student's key + {shape['setup_steps']} steps of '{a.lab}'"
          + (f", of which {', '.join(shape['skipped_steps'])} skipped on sim (would change the host)"
             if shape["skipped_steps"] else "") + "; SSH time is not in the lower bound")
    if base:
        print(f"python-chi per student: key pair, lease (wait ACTIVE), server (wait ACTIVE), floating IP, TCP "
              f"check of the emulated SSH port ({base['connectivity']}); no security group, no setup"
              + (f"; errors: {base['errors']}" if base["errors"] else ""))
        print("peak RSS is each client's process alone (the emulators run in their own processes)"
              + ("" if not a.tracemalloc else
                 f"; tracemalloc peak: labctl {lab['tracemalloc_peak_mib']:.0f} MiB, "
                 f"python-chi {base['tracemalloc_peak_mib']:.0f} MiB"))
    print(f"labctl class down: {lab['down_statuses']} in {lab['down_wall']:.1f} s, "
          f"{lab['down_requests'] / n:.1f} API calls per environment")
    print(f"left in the world after class down: {lab['leftovers'] or 'nothing of labctl'}; "
          f"in labctl's state: {lab['left_in_state'] or 'nothing'}")
    if base and base["leftovers"]:
        print(f"python-chi cleanup left: {base['leftovers']}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.role == "labctl":
        return run_labctl(a)
    if a.role == "baseline":
        return run_baseline(a)
    if a.role == "emulator":
        return run_emulator(a)
    passthrough = ["--ssh-processes", str(a.ssh_processes),
                   "--students", str(a.students), "--time-scale", repr(a.time_scale), "--latency", repr(a.latency),
                   "--rate", repr(a.rate), "--concurrency", str(a.concurrency), "--baseline-students",
                   str(a.baseline_students), "--lab", a.lab, "--site", a.site]
    if a.tracemalloc:
        passthrough.append("--tracemalloc")
    if a.timeline:
        passthrough += ["--timeline", str(Path(a.timeline).resolve())]
    root = Path(tempfile.mkdtemp(prefix="labctl-bench-"))
    try:
        roster = root / "roster.csv"
        make_roster(roster, max(a.students, a.baseline_students))
        started = time.perf_counter()
        lab = run_child("labctl", a, passthrough, root, roster)
        base = run_child("baseline", a, passthrough, root, roster) if a.baseline_students else None
        report(a, lab, base)
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(summarize(a, lab, base), indent=1) + "\n")
            print(f"summary written to {a.json_out}")
        print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    failed = lab["statuses"].get("up", 0) + lab["statuses"].get("already up", 0) != a.students
    if lab["leftovers"] or lab["left_in_state"] or failed:
        print("FAILED: labctl left resources behind or did not provision every student", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
