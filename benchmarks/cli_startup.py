"""How much `labctl --help` and `labctl status` cost next to a bare Typer app that does the same work.

The baseline is a minimal Typer app with labctl's commands whose `status` opens a SQLite database and prints a
Rich table: what `labctl status` must do at least. Runs each command N times in fresh interpreters, in one
run, and prints the medians and their ratios; the target (issue 10) is a ratio of at most 1.2 for both.
Usage: python benchmarks/cli_startup.py [N] [--check]   (--check: exit 1 when a ratio is over the target)
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
import os
import typer
app = typer.Typer(add_completion=False)
testbed = typer.Typer()
klass = typer.Typer()
app.add_typer(testbed, name="testbed")
app.add_typer(klass, name="class")
for name in ("up", "down", "ssh", "plan", "validate", "schema", "sites", "extend"):
    app.command(name)(lambda: None)
for name in ("up", "retry", "status", "report", "down", "extend"):
    klass.command(name)(lambda: None)
testbed.command("serve")(lambda: None)


@app.command()
def status() -> None:
    import sqlite3

    from rich.console import Console
    from rich.table import Table

    os.makedirs(os.environ["LABCTL_STATE_DIR"], exist_ok=True)
    db = sqlite3.connect(os.path.join(os.environ["LABCTL_STATE_DIR"], "bare.db"))
    db.execute("CREATE TABLE IF NOT EXISTS deployments (id TEXT PRIMARY KEY, site TEXT, status TEXT)")
    table = Table(title="status")
    for col in ("lab", "site", "status"):
        table.add_column(col)
    for row in db.execute("SELECT id, site, status FROM deployments"):
        table.add_row(*row)
    Console().print(table)


app()
'''
TARGET = 1.2


def median_seconds(argv: list[str], env: dict[str, str], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--check"]
    n = int(args[0]) if args else 15
    with tempfile.TemporaryDirectory() as tmp:
        # Bytecode is cached as after any install: with PYTHONDONTWRITEBYTECODE set, every run would compile
        # labctl's sources while the baseline's (site-packages) come precompiled.
        env = {**os.environ, "LABCTL_STATE_DIR": str(Path(tmp) / "state"), "NO_COLOR": "1"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        bare = Path(tmp) / "bare.py"
        bare.write_text(BARE)
        py = sys.executable
        # Interleaved rounds, so that load from elsewhere on the machine hits every command alike.
        runs: dict[str, list[float]] = {k: [] for k in ("interp", "base_help", "help", "base_status", "status")}
        argvs = {"interp": [py, "-c", "pass"], "base_help": [py, str(bare), "--help"],
                 "help": [py, "-m", "labctl", "--help"], "base_status": [py, str(bare), "status"],
                 "status": [py, "-m", "labctl", "status"]}
        for argv in argvs.values():  # warm-up: writes the bytecode caches
            median_seconds(argv, env, 1)
        for _ in range(n):
            for key, argv in argvs.items():
                runs[key].append(median_seconds(argv, env, 1))
        med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {"help": med["help"] / med["base_help"], "status": med["status"] / med["base_status"]}
    print(f"runs per command: {n} (interleaved)")
    print(f"python -c pass            {med['interp'] * 1000:7.1f} ms")
    print(f"bare typer --help         {med['base_help'] * 1000:7.1f} ms  (baseline for --help)")
    print(f"labctl --help             {med['help'] * 1000:7.1f} ms  ratio {ratios['help']:.2f}  (target <= {TARGET})")
    print(f"bare typer status         {med['base_status'] * 1000:7.1f} ms  (baseline: SQLite + a Rich table)")
    print(f"labctl status (empty)     {med['status'] * 1000:7.1f} ms  ratio {ratios['status']:.2f}"
          f"  (target <= {TARGET})")
    if "--check" in sys.argv and max(ratios.values()) > TARGET:
        sys.exit(1)


if __name__ == "__main__":
    main()
