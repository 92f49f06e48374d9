"""Deterministic resource names and the tags labctl puts on everything it creates.

Names make lookups cheap (a rerun finds what a crashed run made); tags make `down` and the leak audit exact.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re

PREFIX = "labctl"
TAG_DEPLOYMENT = "labctl:deployment"
TAG_LAB = "labctl:lab"
TAG_OWNER = "labctl:owner"
TAG_COURSE = "labctl:course"
TAG_NODE = "labctl:node"

_UNSAFE = re.compile(r"[^a-z0-9-]+")


def sanitise(text: str, max_len: int = 24) -> str:
    """Lower-case, keep [a-z0-9-], collapse the rest to '-'; long names keep a short hash suffix."""
    clean = _UNSAFE.sub("-", text.lower()).strip("-") or "x"
    if len(clean) <= max_len:
        return clean
    digest = hashlib.sha1(clean.encode()).hexdigest()[:6]
    return f"{clean[: max_len - 7].rstrip('-')}-{digest}"


def default_owner() -> str:
    """Who owns a deployment: LABCTL_OWNER, else the local user name."""
    return sanitise(os.environ.get("LABCTL_OWNER") or getpass.getuser())


def deployment_id(name: str, owner: str, course: str | None = None) -> str:
    """The prefix of every resource name of one deployment, e.g. labctl-alice-hello."""
    parts = [PREFIX]
    if course:
        parts.append(sanitise(course, 16))
    parts += [sanitise(owner), sanitise(name)]
    return "-".join(parts)


def resource_name(deployment: str, suffix: str | None = None) -> str:
    return f"{deployment}-{sanitise(suffix, 40)}" if suffix else deployment
