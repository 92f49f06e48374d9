"""Helpers for end-to-end tests: run the real `labctl` CLI as a subprocess against the emulated testbed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LABCTL = [sys.executable, "-m", "labctl"]
REPO = Path(__file__).resolve().parents[2]


def run(env: dict[str, str], *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LABCTL, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"labctl {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def run_json(env: dict[str, str], *args: str, timeout: float = 180) -> object:
    return json.loads(run(env, *args, "--json", timeout=timeout).stdout)


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([*LABCTL, *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL the process (and its group) as soon as `condition()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"labctl ended (rc {proc.returncode}) before the kill point\n{out}\n{err}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("kill point never reached")


def labctl_leftovers(world, site: str | None = None) -> dict[str, list]:
    """Everything in the emulated cloud that labctl made (name prefix 'labctl-'), by kind."""
    inv = world.inventory(site) if site else world.inventory()
    left = {}
    for kind, items in inv.items():
        mine = [i for i in items if "labctl" in (str(i.get("name") or "") + str(i.get("description") or ""))]
        if mine:
            left[kind] = mine
    return left
