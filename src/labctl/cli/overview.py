"""`labctl status` without a name: every deployment in the state at a glance. Single labs one row per node (yours,
or everyone's with --all), class environments grouped by course and lab with counts by state; and which course
`labctl class status LAB` means when --course is not given."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.errors import UserError


@dataclass
class ClassGroup:
    """The environments of one lab in one course: how many, in which states, where, the first lease end."""

    course: str
    lab: str
    environments: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_site: dict[str, int] = field(default_factory=dict)
    first_lease_end: str | None = None
    shared: list[str] = field(default_factory=list)  # ids of what the class shares (a deployment per site)

    def to_json(self) -> dict[str, Any]:
        return {"course": self.course, "lab": self.lab, "environments": self.environments,
                "by_state": self.by_state, "by_site": self.by_site, "first_lease_end": self.first_lease_end,
                "shared": self.shared}


@dataclass
class Overview:
    labs: list[Any]  # service.Status of single labs
    classes: list[ClassGroup]
    owner: str = ""  # who asked
    others: int = 0  # single labs of other owners, not shown (without --all)

    def to_json(self) -> dict[str, Any]:
        return {"labs": [s.to_json() for s in self.labs], "classes": [c.to_json() for c in self.classes]}


def class_groups(deployments: list[Any]) -> list[ClassGroup]:
    """Class environments (deployments with a course) grouped by (course, lab), sorted."""
    groups: dict[tuple[str, str], ClassGroup] = {}
    states: dict[tuple[str, str], Counter] = {}
    sites: dict[tuple[str, str], Counter] = {}
    for dep in deployments:
        if not dep.course:
            continue
        key = (dep.course, dep.lab)
        group = groups.setdefault(key, ClassGroup(dep.course, dep.lab))
        if dep.class_shared:  # what a class shares at a site is none of its environments, but is shown
            group.shared.append(dep.id)
            continue
        group.environments += 1
        states.setdefault(key, Counter())[dep.status] += 1
        sites.setdefault(key, Counter())[dep.site] += 1
        end = dep.data.get("lease_end")
        if end and (group.first_lease_end is None or str(end) < group.first_lease_end):
            group.first_lease_end = str(end)
    for key, group in groups.items():
        group.by_state = dict(sorted(states.get(key, Counter()).items()))
        group.by_site = dict(sorted(sites.get(key, Counter()).items()))
        group.shared.sort()
    return [groups[k] for k in sorted(groups)]


def overview(ctx: Any, everyone: bool = False) -> Overview:
    """Every deployment of the state: single labs (the owner's, or all with `everyone`) and every class."""
    from labctl import service

    deployments = ctx.store.deployments()
    singles = [d for d in deployments if not d.course]
    shown = [d for d in singles if everyone or d.owner == ctx.owner]
    return Overview([service.status(ctx, d.id) for d in shown], class_groups(deployments),
                    owner=ctx.owner, others=len(singles) - len(shown))


def lab_name(ref: str) -> str:
    """A lab as `class up` records it: a profile path's file name without .yaml, else the name itself."""
    return Path(ref).stem if ref.endswith((".yaml", ".yml")) else ref


def course_for(ctx: Any, lab: str, course: str | None, command: str) -> str:
    """The course `class status LAB` means: --course when given, else the only course with environments of that
    lab; a one-line error listing the courses when there are several (or none)."""
    if course is not None:
        return course
    name = lab_name(lab)
    of_lab = [d for d in ctx.store.deployments() if d.course and d.lab == name]
    # What a class shares counts only where no environment is left (its `class down` deletes it).
    counts = Counter(d.course for d in of_lab if not d.class_shared) or Counter(d.course for d in of_lab)
    if len(counts) == 1:
        return next(iter(counts))
    from labctl.redact import clean

    shown = clean(name, one_line=True)
    if not counts:
        courses = sorted({d.course for d in ctx.store.deployments() if d.course})
        known = f" (courses in this state: {', '.join(courses)})" if courses else ""
        raise UserError(f"no class has environments of lab '{shown}'{known}; "
                        f"'labctl class up {shown} --course COURSE ...' makes some")
    listed = ", ".join(f"{c} ({n} environment{'s' if n != 1 else ''})" for c, n in sorted(counts.items()))
    raise UserError(f"lab '{shown}' is in {len(counts)} courses: {listed}; "
                    f"pass --course (e.g. labctl class {command} {shown} --course {min(counts)})")
