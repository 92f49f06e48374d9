"""Where a lab's files may come from: `labs/<lab>/` and, through symbolic links, `labs/_common/`, nowhere else.

`confined_path` resolves every link and checks the target (and, for a directory, every file in it) before a
script is read or a file uploaded, so that a profile cannot make labctl send `~/.ssh` or `/etc` to a node.
"""

from __future__ import annotations

import os
from pathlib import Path

from labctl import inputs
from labctl.profile_errors import display_path

COMMON_LAB = "_common"  # labs/_common/: scripts the labs share through symbolic links


def lab_roots(lab_dir: Path | str) -> tuple[Path, ...]:
    """The directories a lab's scripts and uploads may come from, symbolic links resolved: `labs/<lab>/` and
    `labs/_common/` (the one that exists of the latter)."""
    lab = Path(os.path.abspath(lab_dir))
    roots = [lab.resolve(), (lab.parent / COMMON_LAB).resolve()]
    return tuple(dict.fromkeys(roots))


def confined_path(lab_dir: Path | str, rel: str, *, want_file: bool = False) -> Path:
    """`labs/<lab>/<rel>` with every symbolic link resolved, checked to lie under `lab_roots(lab_dir)`; for a
    directory every file in it (recursively, links resolved) is checked too. Raises `ValueError` saying why."""
    shown = display_path(lab_dir)
    text = _clip(rel)
    if "\x00" in rel:
        raise ValueError(f"{text} is not a file name")
    if os.path.isabs(rel):
        raise ValueError(f"{text} must be a path relative to {shown}/")
    root = Path(os.path.abspath(lab_dir))
    candidate = Path(os.path.abspath(root / rel))
    if not candidate.is_relative_to(root):
        raise ValueError(f"{text} is outside the lab directory {shown}/")
    roots = lab_roots(root)
    try:
        target = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ValueError(f"{text} not found under {shown}/") from None
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop, a path too long, ...
        raise ValueError(f"{text}: cannot resolve it ({getattr(exc, 'strerror', None) or exc})") from None
    if not inputs.under(target, roots):
        raise ValueError(f"{text} leads outside the lab directory {shown}/ (to {target}) through a symbolic link; "
                         f"only links into {display_path(root.parent / COMMON_LAB)}/ are allowed")
    if want_file and not target.is_file():
        raise ValueError(f"{text} is not a file under {shown}/")
    if target.is_dir():
        for inner in inputs.walk_confined(target, roots):
            del inner  # walk_confined raises on the first file that is not allowed
    elif not target.is_file():
        raise ValueError(f"{text} is not a regular file or directory")
    return target


def _clip(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")



def lab_dir_for(path: Path | str) -> Path:
    """`X/labs/<lab>/` for a profile at `X/profiles/<lab>.yaml` (else `<dir>/labs/<lab>/`)."""
    p = Path(os.path.abspath(path))
    base = p.parent.parent if p.parent.name == "profiles" else p.parent
    return base / "labs" / p.stem
