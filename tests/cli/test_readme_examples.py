"""The README's console examples (`$ labctl ...` followed by what it prints) match what labctl prints: each block
is run in order in a fresh home on the emulated clouds, and compared line by line, with addresses, times and
column widths (which follow them) made neutral; `...` in the README stands for any number of lines."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from tests.cli.helpers import write_roster
from tests.e2e.helpers import LABCTL, REPO

pytestmark = pytest.mark.slow


def console_blocks(text: str) -> list[list[tuple[str, list[str]]]]:
    """Every ``` block whose lines start with `$ labctl`: [(command, expected output lines)]."""
    bodies, body, inside = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                bodies.append(body)
            body, inside = [], not inside
        elif inside:
            body.append(line)
    blocks = []
    for lines in bodies:
        if not lines or not lines[0].startswith("$ labctl "):
            continue
        steps: list[tuple[str, list[str]]] = []
        for line in lines:
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        blocks.append(steps)
    return blocks


def neutral(line: str) -> str:
    line = re.sub(r"127\.1[0-3]\.\d+\.\d+", "IP", line)
    line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|\+00:00)", "TIME", line)
    line = re.sub(r"labctl-\w+-hello-node-1", "HOST", line)
    line = re.sub(r"([━─])\1+", r"\1", line)
    return " ".join(line.split())


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line after `neutral`; a `...` line matches any run of lines (lazily)."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and neutral(expected[0]) == neutral(actual[0]) and matches(expected[1:], actual[1:])


def test_the_readme_console_examples_print_what_the_readme_shows(labctl_env, tmp_path):
    env = {**labctl_env, "LABCTL_OWNER": "alex", "COLUMNS": "80"}
    write_roster(tmp_path, ("alice", "bob"))  # roster.csv in the directory the examples run in
    blocks = console_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 3  # up/ssh/down, plan, class up + status
    for steps in blocks:
        for command, expected in steps:
            argv = shlex.split(command.split("  #")[0])
            proc = subprocess.run([*LABCTL, *argv[1:]], env=env, cwd=Path(tmp_path), capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, f"{command}\n{proc.stderr}"
            actual = proc.stdout.splitlines()
            assert matches(expected, actual), f"$ {command}\nREADME:\n" + "\n".join(expected) + \
                "\nlabctl:\n" + "\n".join(actual)
