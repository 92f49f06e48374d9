"""Rendering: Rich tables for humans, a live stage table while `up`/`down` work, JSON helpers.

Everything shown here may carry text labctl did not write (step names and outputs from a profile, images,
errors and events from a cloud, names from a roster): every such value goes through `_t` / `_s`, which mask
known secrets, strip control characters (no escape sequences reach the terminal) and keep Rich from reading
`[...]` in it as markup.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from labctl.redact import clean, csv_cell, mask

# Off a terminal (piped, redirected) no value is cut or wrapped to fit: tables take their natural width.
OFF_TERMINAL_WIDTH = 100_000


class _Console(Console):
    """A Rich console as wide as its terminal, and unbounded off one (not COLUMNS, not 80, not the width of
    another stream's terminal): `labctl status | grep 127.10` finds whole addresses."""

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal:
            return ConsoleDimensions(OFF_TERMINAL_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


err_console = _Console(stderr=True)
out_console = _Console()

_active: list[Any] = []


def _t(value: object, style: str = "") -> Text:
    """A table cell: one line, secrets masked, no control characters, never markup."""
    return Text(clean("" if value is None else value, one_line=True), style=style)


def _s(value: object) -> str:
    """Text to interpolate into a markup string: cleaned (one line) and markup-escaped."""
    return escape(clean("" if value is None else value, one_line=True))


# Stages still under way; on success the final frame shows what each came to, on failure that it stopped.
_FINISHED = {"creating": "created", "deleting": "deleted", "checking": "ok", "waiting": "ready",
             "building": "built", "ssh-wait": "ssh-ready", "attaching": "attached", "pending": "ready",
             "lease pending": "lease active"}


def shown_stage(stage: str, detail: str) -> tuple[str, str]:
    """What a person reads for a progress event: waiting for SSH is waiting (a booting node refuses
    connections: that is no error)."""
    if stage == "ssh-wait":
        if "connection refused" in detail:
            detail = "the node is still booting: it refuses connections so far"
        return "waiting for SSH", detail
    return stage, detail


class LiveProgress:
    """A live table of what each node/resource is doing (lease pending, building, SSH, setup...); off a
    terminal, one line per change. `stop` ends on a final frame: nothing left "creating" or "waiting"."""

    def __init__(self, quiet: bool = False) -> None:
        self.rows: dict[str, tuple[str, str, float]] = {}
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.quiet = quiet
        self.live = None
        self.ssh_ready: set[str] = set()
        if not quiet and err_console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=err_console, refresh_per_second=4, transient=False)
            self.live.start()
        import logging  # here, not at the top: `status` and `--help` log nothing

        # What an adapter decides on its own (e.g. "zone a full, launched in zone b") reaches the user too.
        self.handler = _progress_log_handler(self)
        logging.getLogger("labctl.providers").addHandler(self.handler)
        logging.getLogger("labctl.providers").setLevel(logging.INFO)
        _active.append(self)

    def __call__(self, subject: str, stage: str, detail: str) -> None:
        with self.lock:
            self._set(subject, stage, detail)
            if stage == "ssh-ready":  # the "ssh" row counts the nodes that answer
                self.ssh_ready.add(subject)
                waiting = self.rows.get("ssh")
                if waiting is not None:
                    total = waiting[1].split(" ", 1)[0].split("/")[-1]
                    state = "ready" if total.isdigit() and len(self.ssh_ready) >= int(total) else "waiting"
                    self._set("ssh", state, f"{len(self.ssh_ready)}/{total} node(s)")
            if self.live is not None:
                self.live.update(self._table())

    def _set(self, subject: str, stage: str, detail: str) -> None:
        previous = self.rows.get(subject)
        self.rows[subject] = (stage, detail, time.monotonic())
        if self.live is None and not self.quiet and (previous is None or previous[:2] != (stage, detail)):
            elapsed = time.monotonic() - self.started
            stage, detail = shown_stage(stage, detail)
            err_console.print(f"[dim]{elapsed:6.1f}s[/dim] {_s(subject)}: {_s(stage)}"
                              + (f" ({_s(detail)})" if detail else ""), highlight=False)

    def _table(self) -> Table:
        table = Table(title=f"labctl ({time.monotonic() - self.started:.0f}s)", expand=False)
        table.add_column("what")
        table.add_column("stage")
        table.add_column("detail", overflow="fold")
        for subject, (stage, detail, _) in self.rows.items():
            style = "red" if "fail" in stage or "error" in stage else "yellow" if "fallback" in stage else ""
            table.add_row(_t(subject), *(_t(x, style if i == 0 else "")
                                         for i, x in enumerate(shown_stage(stage, detail))))
        return table

    def finish(self, ok: bool) -> None:
        """The final frame: each stage still under way becomes what it came to (ok) or says it stopped."""
        with self.lock:
            for subject, (stage, detail, at) in list(self.rows.items()):
                if stage in _FINISHED:
                    self.rows[subject] = (_FINISHED[stage] if ok else f"{stage}, stopped", detail, at)
            if self.live is not None:
                self.live.update(self._table(), refresh=True)

    def stop(self, ok: bool = True) -> None:
        import logging

        logging.getLogger("labctl.providers").removeHandler(self.handler)
        if self.live is not None:
            self.finish(ok)
            self.live.stop()
            self.live = None
        if self in _active:
            _active.remove(self)


def _progress_log_handler(progress: LiveProgress) -> Any:
    """A logging handler that shows what the adapters log (at INFO) as progress notes."""
    import logging

    class ProgressLogHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                progress(record.name.rsplit(".", 1)[-1], "note", record.getMessage())
            except Exception:  # noqa: BLE001 - a display problem must never break provisioning
                self.handleError(record)

    return ProgressLogHandler(logging.INFO)


def progress_reporter(quiet: bool = False) -> LiveProgress:
    return LiveProgress(quiet)


def stop_all() -> None:
    """After an error: every live display ends on a frame that says what stopped."""
    for live in list(_active):
        live.stop(ok=False)


def print_overview(view: Any) -> None:
    """`labctl status`: single labs (one row per node), then classes by course and lab with counts by state."""
    if view.labs or not view.classes:
        owners = {st.owner for st in view.labs}
        print_status(view.labs, owner_column=len(owners) > 1 or (bool(owners) and owners != {view.owner}))
    if view.others:
        out_console.print(f"{view.others} lab(s) of other owners in this state: labctl status --all",
                          highlight=False, markup=False)
    if view.classes:
        table = Table(title="classes")
        for col in ("course", "lab", "environments", "states", "sites", "first lease end"):
            table.add_column(col)
        for c in view.classes:
            table.add_row(*map(_t, (
                c.course, c.lab, str(c.environments), ", ".join(f"{n} {s}" for s, n in c.by_state.items()),
                ", ".join(f"{site} ({n})" for site, n in c.by_site.items()), c.first_lease_end or "-")))
        out_console.print(table)
        for c in view.classes:
            for dep_id in c.shared:  # whole ids: what `labctl status ID` takes
                out_console.print(clean(f"shared by {c.course}/{c.lab}: {dep_id} (class down deletes it after the "
                                        "last environment at its site)", one_line=True), highlight=False, markup=False)
        first = view.classes[0]
        out_console.print(f"per student: labctl class status {_s(first.lab)} --course {_s(first.course)}",
                          highlight=False)


def print_status(results: list[Any], detail: bool = False, owner_column: bool = False) -> None:
    if not results:
        # No highlighter: its regexes cost more than the rest of an empty status.
        out_console.print("No labs. Start one with [bold]labctl up hello --site sim[/bold].", highlight=False)
        return
    table = Table(title="labctl status")
    for col in ("lab", *(["owner"] if owner_column else []), "site", "status", "node", "type", "floating IP",
                "setup", "lease ends"):
        table.add_column(col)
    for st in results:
        for i, node in enumerate(st.nodes or [None]):
            table.add_row(*map(_t, (
                st.name if i == 0 else "", *([st.owner if i == 0 else ""] if owner_column else []),
                st.site if i == 0 else "", st.status if i == 0 else "",
                node.name if node else "-", (node.node_type or "-") if node else "-",
                (node.floating_ip or "-") if node else "-", node.setup if node else "-",
                (st.lease_end or "-") if i == 0 else "",
            )))
    out_console.print(table)
    for st in results:  # less than an hour of the lease left, or ended
        if getattr(st, "warning", None):
            err_console.print(f"warning: {_s(st.warning)}", highlight=False)
    if detail:
        for st in results:
            print_outputs(st)


def _ssh_hint(st: Any, value: str) -> str:
    """A profile's `labctl ssh <lab>` as it works for this deployment (`up hello --name h2`: `labctl ssh h2`)."""
    prefix = f"labctl ssh {st.lab}"
    if st.name != st.lab and (value == prefix or value.startswith(prefix + " ")):
        return f"labctl ssh {st.name}" + value[len(prefix):]
    return value


def print_outputs(st: Any) -> None:
    """The profile's outputs, then how to SSH in: once (a profile's own `ssh` output counts)."""
    hinted = False
    for key, value in st.outputs.items():
        value = _ssh_hint(st, str(value))
        hinted = hinted or value.startswith(f"labctl ssh {st.name}")
        out_console.print(f"[bold]{_s(key)}[/bold]: {_s(value)}", highlight=False)
    if not hinted and st.nodes and any(n.floating_ip for n in st.nodes):
        out_console.print(f"ssh: labctl ssh {_s(st.name)}", highlight=False)


def plan_json(plan: Any) -> dict[str, Any]:
    return {
        "deployment": plan.deployment,
        "lab": plan.lab,
        "site": plan.site.name,
        "lease_hours": plan.lease_hours,
        "lease_end": _planned_end(plan),
        "nodes": [{"name": n.name, "role": n.role, "types": list(n.candidates), "image": n.image,
                   "floating_ip": n.floating_ip} for n in plan.nodes],
        "resources": [{"key": r.key, "kind": r.kind, "name": r.name, "depends_on": list(r.depends_on),
                       "spec": {k: v for k, v in r.spec.items() if k != "public_key"}} for r in plan.resources],
    }


def _planned_end(plan: Any) -> str:
    from labctl.service import planned_end

    return planned_end(plan.lease_hours)


def _network_detail(site: Any, r: Any) -> str:
    """What a private network's resources are at this site (see the adapters' docstrings)."""
    if r.kind == "subnet":
        return r.spec["cidr"]
    if r.kind == "router":
        return {"aws": "the VPC's internet gateway", "gcp": "none needed (the network's default route)"}.get(
            site.family, f"to {site.public_network}")
    return {"aws": "a VPC with an internet gateway", "gcp": "a VPC network (custom subnets)"}.get(
        site.family, "Neutron network" + ("" if r.spec.get("port_security", True) else ", port security off"))


def print_plan(plan: Any, estimate: Any = None) -> None:
    table = Table(title=f"plan: {_s(plan.lab)} at {_s(plan.site.name)} ({plan.lease_hours:g} h lease)")
    for col in ("resource", "kind", "name", "details"):
        table.add_column(col)
    for r in plan.resources:
        if r.kind == "reservation":
            details = f"{r.spec['count']} × {' → '.join(r.spec['candidates'])} ({r.spec['kind']} lease)"
        elif r.kind == "server":
            noun = "flavor" if plan.site.family == "kvm" else "type"
            details = f"image {r.spec['image']}" + (f", on {r.spec['reservation']}" if r.spec["reservation"] else
                                                    f", {noun} {' → '.join(r.spec['candidates'])}")
        elif r.kind in ("network", "subnet", "router"):
            details = _network_detail(plan.site, r)
        elif r.kind == "secgroup":
            details = "ports " + ", ".join(f"{x['port']}/{x['protocol']}" for x in r.spec["rules"])
        elif r.kind == "volume":
            size = r.spec["size_gb"]
            details = (f"{size} GiB" if plan.site.family != "gcp" or size >= 10 else
                       f"{size} GiB asked, 10 GiB made (the smallest persistent disk)")
            details += ", kept on down" if r.spec["keep"] else ""
        elif r.kind == "volume_attachment":
            details = f"on {r.spec['node']} at {r.spec['mount']} ({r.spec['filesystem']}, formatted once)"
        elif r.kind == "bucket":
            noun = {"s3": "S3 bucket", "swift": "Swift container"}.get(plan.site.object_storage or "",
                                                                    "object-store container")
            details = noun + (", kept on down" if r.spec["keep"] else "")
        else:
            details = ""
        table.add_row(_t(r.key), _t(r.kind), _t(r.name), _t(details))
    out_console.print(table)
    out_console.print(f"Lease end: {_planned_end(plan)} if it starts now ({plan.lease_hours:g} h; the cloud deletes "
                      "the servers then; `labctl extend` moves it)", highlight=False, markup=False)
    if estimate is not None:
        print_estimate(estimate)
    out_console.print("Nothing was created. Run the same with [bold]labctl up[/bold] to create it.")


def _money(value: float | None, currency: str, precise: bool = False) -> str:
    if value is None:
        return "no price"
    symbol = "$" if currency == "USD" else f"{currency} "
    return f"{symbol}{value:,.4f}" if precise and value < 10 else f"{symbol}{value:,.2f}"


def print_estimate(est: Any) -> None:
    """Per node: type (and fallbacks), lease hours, then cost (AWS/GCP) or SUs (Chameleon); a total line."""
    what = {"cost": "on-demand cost", "sus": "Chameleon allocation (SUs)"}.get(est.kind, "lease hours")
    table = Table(title=f"estimate: {what} in {_s(est.region)}")
    for col in ("node", "type", "hours"):
        table.add_column(col)
    if est.kind == "cost":
        table.add_column("per hour", justify="right")
        table.add_column("cost", justify="right")
    elif est.kind == "sus":
        table.add_column("SUs", justify="right")
    table.add_column("note")
    for line in est.lines:
        kind = line.type + (f" (then {', '.join(line.types[1:])})" if len(line.types) > 1 else "")
        row = [line.node, kind, f"{line.hours:g}"]
        if est.kind == "cost":
            row += [_money(line.unit_price, est.currency, precise=True), _money(line.cost, est.currency)]
        elif est.kind == "sus":
            row += [f"{line.sus:g}"]
        table.add_row(*map(_t, (*row, line.note)))
    out_console.print(table)
    if est.kind == "cost":
        total = _money(est.total, est.currency) if est.total is not None else "no price"
        out_console.print(f"Total: {total} for the {est.lines[0].hours:g} h lease" if est.lines else
                          f"Total: {total}", ("" if est.complete else " (incomplete)"), sep="", highlight=False)
        out_console.print(f"Prices: on-demand, as of {est.as_of}; source: {est.source}", highlight=False,
                          markup=False)
    elif est.kind == "sus":
        bound = "" if est.complete else "at least "
        out_console.print(f"Total: {bound}{est.total:g} SUs", highlight=False)
    for note in est.notes:
        out_console.print(f"Note: {clean(note, one_line=True)}", highlight=False, markup=False)


def print_sites(rows: list[dict[str, str]]) -> None:
    table = Table(title="sites")
    for col in ("site", "provider", "region", "reservation", "credentials"):
        table.add_column(col)
    for row in rows:
        table.add_row(*map(_t, (row["site"], row["provider"], row["region"], row["reservation"],
                                row["credentials"])))
    out_console.print(table)


def flush() -> None:
    sys.stdout.flush()


class ClassProgress:
    """A progress bar for a whole class: done / failed / in progress, with an ETA."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.total = 0
        self.done = 0
        self.failed = 0
        self.started: set[str] = set()
        self.lock = threading.Lock()
        self.progress = None
        self.task = None

    def events(self) -> Any:
        from labctl.classroom import ClassEvents

        return ClassEvents(start=self._start, student=self._student, finished=self._finished,
                           warn=lambda message: err_console.print(f"warning: {_s(message)}", highlight=False))

    def _start(self, total: int) -> None:
        self.total = total
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]class[/bold]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=err_console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("class", total=total, counts=self._counts())

    def _counts(self) -> str:
        running = len(self.started) - self.done - self.failed
        return f"ok {self.done}  failed {self.failed}  in progress {max(running, 0)}"

    def _student(self, student_id: str, stage: str, detail: str) -> None:
        with self.lock:
            self.started.add(student_id)
            if self.progress is not None:
                self.progress.update(self.task, counts=self._counts())

    def _finished(self, result: Any) -> None:
        with self.lock:
            self.started.add(result.student_id)
            if result.status in ("failed",):
                self.failed += 1
            else:
                self.done += 1
            if self.progress is not None:
                self.progress.update(self.task, completed=self.done + self.failed, counts=self._counts())

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def class_progress(quiet: bool = False) -> ClassProgress:
    return ClassProgress(quiet)


def print_class_results(results: list[Any], what: str | None = None, next_steps: tuple[str, ...] = ()) -> None:
    """The summary of a class run: `what` (course/lab), counts by state and the sites, each student that did
    not make it, then `next_steps` (commands with a note each), so a run off a terminal says what to do next."""
    counts: dict[str, int] = {}
    sites: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
        sites[r.site] = sites.get(r.site, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do"
    if what is not None and results:
        where = ", ".join(f"{site} ({n})" if len(sites) > 1 else site for site, n in sorted(sites.items()))
        summary = f"{what}: {summary} at {where}"
    out_console.print(clean(summary, one_line=True), markup=False, highlight=False)
    for r in results:
        if r.status in ("failed", "busy", "interrupted"):
            out_console.print(f"  {_s(r.student_id)}: {_s(r.status)}" + (f": {_s(r.error)}" if r.error else ""),
                              highlight=False)
    if next_steps and results:
        out_console.print("next:", highlight=False)
        for step in next_steps:
            out_console.print(f"  {clean(step, one_line=True)}", markup=False, highlight=False)


def class_status_table(rows: list[Any], lab: str) -> Table:
    table = Table(title=f"class status: {_s(lab)} ({len(rows)} students)")
    for col in ("student", "site", "state", "IP", "setup", "lease ends", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        ips = ", ".join(n["ip"] for n in r.nodes if n.get("ip")) or "-"
        table.add_row(*map(_t, (r.student_id, r.site, r.status, ips, r.setup, r.lease_end or "-", r.error or "")))
    return table


REPORT_FIELDS = ("student_id", "name", "email", "site", "status", "ips", "ssh", "lease_end", "setup", "error")


def class_report_text(rows: list[Any], fmt: str) -> str:
    import csv
    import io
    import json

    records = [{"student_id": r.student_id, "name": r.name, "email": r.email, "site": r.site, "status": r.status,
                "ips": " ".join(n["ip"] for n in r.nodes if n.get("ip")), "ssh": r.ssh or "",
                "lease_end": r.lease_end or "", "setup": r.setup, "error": r.error or ""} for r in rows]
    if fmt == "json":
        return mask(json.dumps(records, indent=2)) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_FIELDS) if records else ["student_id"])
    writer.writeheader()
    # A spreadsheet runs a cell starting with = + - @ as a formula (a roster name "=HYPERLINK(...)"): neutralised.
    writer.writerows({k: csv_cell(v) for k, v in rec.items()} for rec in records)
    return buf.getvalue()
