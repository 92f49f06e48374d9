"""One operator, as a separate process, for the two-process lock tests (run by tests/state/test_store.py).

    lock_worker.py URL up|down COUNT [--no-lock] [--wait]
        opens the store, prints "ready", waits for a line on stdin ("go"), then for env-000..env-<COUNT-1>:
        under `store.lock("env:<name>")` checks whether the environment exists, "calls the cloud" (sleeps
        20 ms: the race window) and records the creation / deletion with an INSERT into events. Prints a
        JSON summary. --no-lock skips the lock (the control: then both processes do the same work).
    lock_worker.py URL hold NAME
        takes the lock NAME, prints "held" (or "busy"), then holds it until a line arrives on stdin
        (prints "released") or until it is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from labctl.state import DeploymentRecord, StateStore

RACE_WINDOW = 0.02


def main(argv: list[str]) -> int:
    url, mode = argv[0], argv[1]
    store = StateStore.open(url)
    if mode == "hold":
        with store.lock(argv[2]) as held:
            print("held" if held else "busy", flush=True)
            if held:
                sys.stdin.readline()
        print("released", flush=True)
        return 0
    count = int(argv[2])
    use_lock, wait = "--no-lock" not in argv, "--wait" in argv
    print("ready", flush=True)
    sys.stdin.readline()
    done, skipped = [], []
    for i in range(count):
        name = f"env-{i:03d}"
        guard = store.lock(f"env:{name}", wait=wait, timeout=30) if use_lock else contextlib.nullcontext(True)
        with guard as held:
            if not held:
                skipped.append(name)
                continue
            dep = store.get_deployment(name)
            if mode == "up" and dep is None:
                time.sleep(RACE_WINDOW)  # the cloud call
                store.save_deployment(DeploymentRecord(name, name, "lab", "op", None, "sim", "up", None))
                store.event(name, f"created by {os.getpid()}")
                done.append(name)
            elif mode == "down" and dep is not None and dep.status != "destroyed":
                time.sleep(RACE_WINDOW)
                store.forget_deployment(name)
                store.event(name, f"deleted by {os.getpid()}")
                done.append(name)
    print(json.dumps({"pid": os.getpid(), "done": done, "skipped": skipped}), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
