"""How much `labctl --help` and `labctl status` cost next to a bare Typer app that does the same work.

The baseline is a minimal Typer app with labctl's commands whose `status` opens a SQLite database and prints a
Rich table: what `labctl status` must do at least. Runs each command N times in fresh interpreters, in one
run, and prints the medians and their ratios; the target (issue 10) is a ratio of at most 1.2 for both. Besides
wall time it prints CPU time (user + system of the child): on a shared, loaded machine wall time swings with the
load, CPU time much less.
Usage: python benchmarks/cli_startup.py [N] [--check]   (--check: exit 1 when a ratio is over the target)
"""

from __future__ import annotations

import os
import resource
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
    return statistics.median(timed(argv, env)[0] for _ in range(n))


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        argvs = {"interp": [py, "-c", "pass"], "base_help": [py, str(bare), "--help"],
                 "help": [py, "-m", "labctl", "--help"], "base_status": [py, str(bare), "status"],
                 "status": [py, "-m", "labctl", "status"]}
        for argv in argvs.values():  # warm-up: writes the bytecode caches
            median_seconds(argv, env, 1)
        for _ in range(n):
            for key, argv in argvs.items():
                wall, used = timed(argv, env)
                runs[key].append(wall)
                cpu[key].append(used)
        med = {k: statistics.median(v) for k, v in runs.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratios = {"help": med["help"] / med["base_help"], "status": med["status"] / med["base_status"]}
    print(f"runs per command: {n} (interleaved)")
    print(f"python -c pass            {med['interp'] * 1000:7.1f} ms")
    print(f"bare typer --help         {med['base_help'] * 1000:7.1f} ms  (baseline for --help)")
    print(f"labctl --help             {med['help'] * 1000:7.1f} ms  ratio {ratios['help']:.2f}  (target <= {TARGET})")
    print(f"bare typer status         {med['base_status'] * 1000:7.1f} ms  (baseline: SQLite + a Rich table)")
    print(f"labctl status (empty)     {med['status'] * 1000:7.1f} ms  ratio {ratios['status']:.2f}"
          f"  (target <= {TARGET})")
    print(f"CPU (user+sys): --help {med_cpu['help'] * 1000:.1f} ms vs bare {med_cpu['base_help'] * 1000:.1f} ms "
          f"(ratio {med_cpu['help'] / med_cpu['base_help']:.2f}); status {med_cpu['status'] * 1000:.1f} ms vs bare "
          f"{med_cpu['base_status'] * 1000:.1f} ms (ratio {med_cpu['status'] / med_cpu['base_status']:.2f})")
    least = {k: min(v) for k, v in cpu.items()}  # noise only adds: the least CPU time is the steadiest measure
    print(f"least CPU of {n}: --help {least['help'] * 1000:.1f} ms vs bare {least['base_help'] * 1000:.1f} ms "
          f"(ratio {least['help'] / least['base_help']:.2f}); status {least['status'] * 1000:.1f} ms vs bare "
          f"{least['base_status'] * 1000:.1f} ms (ratio {least['status'] / least['base_status']:.2f})")
    if "--check" in sys.argv and max(ratios.values()) > TARGET:
        sys.exit(1)


if __name__ == "__main__":
    main()
