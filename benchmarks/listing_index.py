"""What a class's teardown costs labctl to pick each deployment's items out of a shared list, with and without
`ByDeployment` (the list grouped by deployment once per fetch), in one run.

Each of N deployments asks for its own items of one fetched list of N items (one per deployment: a class's
security groups, key pairs, servers...), as `Listed.owned` does for every kind in `class down`. The scan is what
`owned` did before: every item's tags parsed for every deployment, O(N²). Prints the CPU time of each and their
ratio. Usage: python benchmarks/listing_index.py [N ...]   (default: 100 250 500)
"""

from __future__ import annotations

import sys
import time

from labctl.providers.chameleon.session import ByDeployment, Item, tags_of


def listing(n: int) -> list[Item]:
    return [Item({"id": f"id-{i}", "name": f"labctl-d{i}-sg", "status": "ACTIVE",
                  "description": f"labctl:deployment=d{i} labctl:owner=student{i}"}) for i in range(n)]


def scan(items: list[Item], deployment: str) -> list[Item]:
    return [i for i in items if tags_of(i).get("labctl:deployment") == deployment]


def cpu(fn: object, items: list[Item], n: int) -> float:
    started = time.process_time()
    for d in range(n):
        fn(items, f"d{d}")  # type: ignore[operator]
    return time.process_time() - started


def main(sizes: list[int]) -> None:
    print(f"{'items':>6} {'scan, all deployments':>22} {'index, all':>11} {'scan / index':>13}")
    for n in sizes:
        items = listing(n)
        assert all(ByDeployment(tags_of)(items, f"d{d}") == scan(items, f"d{d}") for d in range(0, n, 7))
        slow, fast = cpu(scan, items, n), cpu(ByDeployment(tags_of), items, n)
        print(f"{n:>6} {slow * 1000:>19.1f} ms {fast * 1000:>8.2f} ms {slow / fast:>12.0f}x")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 250, 500])
