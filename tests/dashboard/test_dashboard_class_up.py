"""The dashboard follows a real `labctl class up` on the emulated testbed while it runs (another process writing
the same state store), answering every poll, and ends with every student up."""

from __future__ import annotations

import csv
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests.dashboard.conftest import COURSE, LAB
from tests.e2e.helpers import LABCTL, REPO

pytestmark = pytest.mark.slow
N = 4


def write_roster(path: Path, n: int) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student_id", "name", "email", "ssh_public_key"])
        for i in range(n):
            public = Ed25519PrivateKey.generate().public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
            w.writerow([f"s{i}", f"Student {i}", f"s{i}@uni.edu", f"{public} s{i}@laptop"])


def test_dashboard_follows_class_up_as_it_runs(labctl_env: dict[str, str], tmp_path: Path) -> None:
    from labctl.dashboard import Dashboard, Prices
    from labctl.pricing import load_prices
    from labctl.service import Context
    from labctl.state import StateStore

    roster = tmp_path / "roster.csv"
    write_roster(roster, N)
    store = StateStore(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db")
    board = Dashboard(Context(store, "staff"), LAB, COURSE, Prices(load_prices()))
    server = board.serve(0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = board.url(server.server_port) + "api/status"

    def poll() -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=30) as response:  # a 503 raises: the test fails on it
            return json.load(response)

    seen: list[dict[str, str]] = [{s["id"]: s["state"] for s in poll()["students"]}]
    proc = subprocess.Popen([*LABCTL, "class", "up", LAB, "--roster", str(roster), "--site", "sim", "--course",
                             COURSE, "--concurrency", "2"], env=labctl_env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            states = {s["id"]: s["state"] for s in poll()["students"]}
            if states != seen[-1]:
                seen.append(states)
            time.sleep(0.05)  # the poll interval of this watcher, as the page's 2 s: not a wait for an outcome
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        final = poll()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        store.close()
    assert seen[0] == {}  # before class up: no environment
    assert {s["id"]: s["state"] for s in final["students"]} == {f"s{i}": "up" for i in range(N)}
    assert final["failures"] == [] and final["counts"] == {"up": N}
    # While it ran, the dashboard showed the class part-way: some students not up yet (or not there yet).
    partway = [s for s in seen[1:] if s != {f"s{i}": "up" for i in range(N)}]
    assert partway, f"the dashboard saw only the start and the end: {seen}"
    assert any(state in ("planned", "applying") for s in partway for state in s.values())
