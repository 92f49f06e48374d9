"""Class mode's collector settings, observed in a fresh interpreter (they last for the process)."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import gc
keep = [[i] for i in range(5000)]  # made before the class starts: frozen with the rest
before = (gc.get_freeze_count(), gc.get_threshold())
from labctl.collector_tuning import YOUNG_GENERATION, tune_gc
tune_gc()
after = (gc.get_freeze_count(), gc.get_threshold())
tune_gc()  # once per process: a second class in the process freezes nothing more
again = gc.get_freeze_count()
cycle = []; cycle.append(cycle); del cycle  # a cycle made later is still collected
print(before[0], before[1][0], after[0] >= len(keep), after[1][0] == YOUNG_GENERATION, after[1][1:] == before[1][1:],
      again == after[0], gc.collect() >= 1)
"""


def test_class_start_freezes_what_exists_and_collects_the_young_less_often():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["0", "700", "True", "True", "True", "True", "True"]
