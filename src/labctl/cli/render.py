"""Rendering: Rich tables for humans, a live stage table while `up`/`down` work, JSON helpers."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True)
out_console = Console()

_active: list[Any] = []


class LiveProgress:
    """A live table of what each node/resource is doing (lease pending, building, SSH, setup...)."""

    def __init__(self, quiet: bool = False) -> None:
        self.rows: dict[str, tuple[str, str, float]] = {}
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.quiet = quiet
        self.live = None
        if not quiet and err_console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=err_console, refresh_per_second=4, transient=False)
            self.live.start()
        _active.append(self)

    def __call__(self, subject: str, stage: str, detail: str) -> None:
        with self.lock:
            previous = self.rows.get(subject)
            self.rows[subject] = (stage, detail, time.monotonic())
            if self.live is not None:
                self.live.update(self._table())
            elif not self.quiet and (previous is None or previous[:2] != (stage, detail)):
                elapsed = time.monotonic() - self.started
                err_console.print(f"[dim]{elapsed:6.1f}s[/dim] {subject}: {stage}" + (f" ({detail})" if detail
                                                                                       else ""),
                                  highlight=False)

    def _table(self) -> Table:
        table = Table(title=f"labctl ({time.monotonic() - self.started:.0f}s)", expand=False)
        table.add_column("what")
        table.add_column("stage")
        table.add_column("detail", overflow="fold")
        for subject, (stage, detail, _) in self.rows.items():
            style = "red" if "fail" in stage or "error" in stage else "yellow" if "fallback" in stage else ""
            table.add_row(subject, f"[{style}]{stage}[/{style}]" if style else stage, detail)
        return table

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self in _active:
            _active.remove(self)


def progress_reporter(quiet: bool = False) -> LiveProgress:
    return LiveProgress(quiet)


def stop_all() -> None:
    for live in list(_active):
        live.stop()


def print_status(results: list[Any], detail: bool = False) -> None:
    if not results:
        out_console.print("No labs. Start one with [bold]labctl up hello --site sim[/bold].")
        return
    table = Table(title="labctl status")
    for col in ("lab", "site", "status", "node", "type", "floating IP", "setup", "lease ends"):
        table.add_column(col)
    for st in results:
        for i, node in enumerate(st.nodes or [None]):
            table.add_row(
                st.name if i == 0 else "", st.site if i == 0 else "", st.status if i == 0 else "",
                node.name if node else "-", (node.node_type or "-") if node else "-",
                (node.floating_ip or "-") if node else "-", node.setup if node else "-",
                (st.lease_end or "-") if i == 0 else "",
            )
    out_console.print(table)
    if detail:
        for st in results:
            for key, value in st.outputs.items():
                out_console.print(f"[bold]{key}[/bold]: {value}", highlight=False)
            if st.nodes and any(n.floating_ip for n in st.nodes):
                out_console.print(f"ssh: labctl ssh {st.name}", highlight=False)


def plan_json(plan: Any) -> dict[str, Any]:
    return {
        "deployment": plan.deployment,
        "lab": plan.lab,
        "site": plan.site.name,
        "lease_hours": plan.lease_hours,
        "nodes": [{"name": n.name, "role": n.role, "types": list(n.candidates), "image": n.image,
                   "floating_ip": n.floating_ip} for n in plan.nodes],
        "resources": [{"key": r.key, "kind": r.kind, "name": r.name, "depends_on": list(r.depends_on),
                       "spec": {k: v for k, v in r.spec.items() if k != "public_key"}} for r in plan.resources],
    }


def print_plan(plan: Any) -> None:
    table = Table(title=f"plan: {plan.lab} at {plan.site.name} ({plan.lease_hours:g} h lease)")
    for col in ("resource", "kind", "name", "details"):
        table.add_column(col)
    for r in plan.resources:
        if r.kind == "reservation":
            details = f"{r.spec['count']} × {' → '.join(r.spec['candidates'])} ({r.spec['kind']} lease)"
        elif r.kind == "server":
            details = f"image {r.spec['image']}" + (f", on {r.spec['reservation']}" if r.spec["reservation"] else
                                                    f", flavor {r.spec['candidates'][0]}")
        elif r.kind == "secgroup":
            details = "ports " + ", ".join(f"{x['port']}/{x['protocol']}" for x in r.spec["rules"])
        else:
            details = ""
        table.add_row(r.key, r.kind, r.name, details)
    out_console.print(table)
    out_console.print("Nothing was created. Run the same with [bold]labctl up[/bold] to create it.")


def print_sites(rows: list[dict[str, str]]) -> None:
    table = Table(title="sites")
    for col in ("site", "provider", "region", "reservation", "credentials"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["site"], row["provider"], row["region"], row["reservation"], row["credentials"])
    out_console.print(table)


def flush() -> None:
    sys.stdout.flush()
