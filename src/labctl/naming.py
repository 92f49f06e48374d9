"""Deterministic resource names and the tags labctl puts on everything it creates.

Names make lookups cheap (a rerun finds what a crashed run made); tags make `down` and the leak audit exact.
"""

from __future__ import annotations

import getpass
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
    import hashlib  # only long names need it; `labctl status` should not pay for the import

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


CLASS_SHARED_OWNER = "class-"  # + the site: the owner part of what a class shares there (no student's id may start so)


def class_shared_owner(site_name: str) -> str:
    """The owner part of the deployment id of what a class shares at a site (`plan.class_shared_plan`)."""
    return CLASS_SHARED_OWNER + sanitise(site_name)


def class_deployments_glob(name: str, course: str) -> str:
    """Every student's deployment of lab `name` in `course`, as a glob: `deployment_id` with `*` for the owner."""
    return "-".join([PREFIX, sanitise(course, 16), "*", sanitise(name)])


def resource_name(deployment: str, suffix: str | None = None) -> str:
    return f"{deployment}-{sanitise(suffix, 40)}" if suffix else deployment


def require_canonical(text: str | None, option: str, max_len: int = 24) -> str:
    """`text` itself if it is already a resource-name part (what `sanitise` would leave unchanged), else a
    one-line UserError saying what is allowed.

    Names given by the user (--name, --owner, --course) enter resource names and the deployment id; since
    `sanitise` collapses every unsafe character to '-', two different names (`a/b`, `a.b`) would otherwise map
    to the same resources and the second `up` would silently adopt the first one's environment.
    """
    from labctl.errors import UserError
    from labctl.redact import clean

    shown = clean(text if text is not None else "", one_line=True)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if text is None or not text.strip():
        raise UserError(f"{option} must not be empty: use lowercase letters, digits and '-' "
                        f"(at most {max_len} characters)")
    if _UNSAFE.sub("-", text.lower()).strip("-") != text or len(text) > max_len:
        suggestion = sanitise(text, max_len)
        raise UserError(
            f"{option} '{shown}' is not allowed: use lowercase letters a-z, digits and '-', starting and ending "
            f"with a letter or digit, at most {max_len} characters (e.g. '{suggestion}')"
        )
    return text
