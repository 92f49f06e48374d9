"""How much `labctl --help` and `labctl status` cost next to a bare Typer app with the same commands.

Runs each command N times in fresh interpreters, in one run, and prints the medians and their ratio.
Usage: python benchmarks/cli_startup.py [N]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = '''
import typer
app = typer.Typer(add_completion=False)
testbed = typer.Typer()
app.add_typer(testbed, name="testbed")
for name in ("up", "down", "status", "ssh", "plan", "validate", "schema", "sites", "extend"):
    app.command(name)(lambda: None)
testbed.command("serve")(lambda: None)
app()
'''


def median_seconds(argv: list[str], env: dict[str, str], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LABCTL_STATE_DIR": str(Path(tmp) / "state"), "NO_COLOR": "1"}
        bare = Path(tmp) / "bare.py"
        bare.write_text(BARE)
        py = sys.executable
        base_help = median_seconds([py, str(bare), "--help"], env, n)
        help_ = median_seconds([py, "-m", "labctl", "--help"], env, n)
        status = median_seconds([py, "-m", "labctl", "status"], env, n)
        interp = median_seconds([py, "-c", "pass"], env, n)
    print(f"runs per command: {n}")
    print(f"python -c pass          {interp * 1000:7.1f} ms")
    print(f"bare typer --help       {base_help * 1000:7.1f} ms  (baseline)")
    print(f"labctl --help           {help_ * 1000:7.1f} ms  ratio {help_ / base_help:.2f}")
    print(f"labctl status (empty)   {status * 1000:7.1f} ms  ratio {status / base_help:.2f}")


if __name__ == "__main__":
    main()
