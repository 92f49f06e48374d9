"""Many first opens of one new state database at once (the first `labctl up`s of a class, two terminals)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPEN = "import sys; from pathlib import Path; from labctl.state import StateStore; StateStore(Path(sys.argv[1]))"


def test_concurrent_first_opens_of_a_new_database_all_succeed(tmp_path: Path) -> None:
    failures = []
    for round_ in range(5):
        path = tmp_path / f"round{round_}" / "state.db"
        path.parent.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, str(path)], stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            if p.returncode != 0:
                failures.append(err.strip().splitlines()[-1])
    assert failures == []
