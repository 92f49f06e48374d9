"""The cyclic garbage collector's settings for class mode.

When a class starts, labctl has imported its SDKs: over a hundred thousand objects that live as long as the
process, which every full collection walked again. And with hundreds of threads decoding list bodies, the young
generation filled every 700 allocations. At 500 students, the collections took about 1.4 s of labctl's CPU in
`class up`, a tenth of it, and 0.3 s with these settings (benchmarks/README.md). `gc.freeze()` takes what exists
at the start out of the collector's sight, and a young generation of 20,000 objects is collected about seventy
times less often; cycles made later are still collected.
"""

from __future__ import annotations

import functools
import gc

YOUNG_GENERATION = 20_000  # objects allocated (less those freed) between young collections; CPython's is 700


@functools.cache
def tune_gc() -> None:
    """Once per process, before a class's threads start."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION, middle, old)
