"""Profile problems as one line a student can act on: `profiles/gpu.yaml: nodes.gpu.count: Input should be ...`.

A pydantic `ValidationError` becomes one line listing every problem with the field's path, a hint for
unknown fields and the offending value; every message is stripped of control and bidi characters and capped.
Shared by the profile model, the YAML reader and `labctl.sites` (user sites) so they all speak the same way.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from labctl.errors import ProfileError
from labctl.redact import strip_control

# The tags of labctl.profile_parts' discriminated unions (ports: int | Port; networks: str | NodeNetwork):
# pydantic puts them in an error's location, where the user never wrote them.
UNION_TAGS = frozenset({"int", "Port", "str", "NodeNetwork"})


def first_of(problems: list[str]) -> str:
    """Every problem on one line (issue 13: never "(+N more)": the user fixes them all in one go)."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(problems)


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean ...?)': names that extend the word (gpu_a100 -> gpu_a100_pcie), else the closest."""
    options = list(choices)
    longer = [c for c in options if c.startswith(word) and c != word][:3]
    match = longer or difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not match:
        return ""
    return " (did you mean " + " or ".join(f"'{m}'" for m in match) + "?)"


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        text = str(part)
        if len(text) > 40:
            text = text[:37] + "..."
        out += f"[{text}]" if isinstance(part, int) else (f".{text}" if out else text)
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop discriminated-union tags ('ports', 0, 'Port', 'cidr') -> ('ports', 0, 'cidr')."""
    out: list[Any] = []
    for part in loc:
        if part in UNION_TAGS and out and isinstance(out[-1], int):
            continue
        out.append(part)
    return tuple(out)


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _descend(tp: Any, key: Any) -> Any:
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(key) if isinstance(key, str) else None
        return field.annotation if field else None
    if origin is list:
        return get_args(tp)[0] if isinstance(key, int) else None
    if origin is dict:
        return get_args(tp)[1]
    if origin in (Union, types.UnionType):
        for member in get_args(tp):
            found = _descend(member, key)
            if found is not None:
                return found
    return None


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    tp: Any = root
    for part in loc:
        tp = _descend(tp, part)
        if tp is None:
            return None
    tp = _unwrap(tp)
    candidates = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    for c in candidates:
        c = _unwrap(c)
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _describe_error(err: Mapping[str, Any], root: type[BaseModel]) -> str:
    loc = _clean_loc(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if "[key]" in loc:
        where = _loc(p for p in loc if p != "[key]")
        if kind == "string_pattern_mismatch":
            what = {"networks": "network", "volumes": "volume", "object_stores": "object store"}.get(
                str(loc[0]) if loc else "", "role")
            msg = (
                f"{what} names are lower-case letters, digits and '-', start with a letter, "
                "at most 16 characters"
            )
        return f"{where}: {msg}"
    where = _loc(loc)
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], root)
        known = list(model.model_fields) if model else []
        hint = suggest(str(loc[-1]), known) if known else ""
        if known and not hint:
            hint = f" (known fields: {', '.join(known)})"
        return f"{where}: unknown field{hint}"
    value = err.get("input")
    if (
        kind not in ("missing",)
        and not kind.startswith("value_error")
        and isinstance(value, (str, int, float, bool))
    ):
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        msg = f"{msg} (got {shown})"
    return f"{where}: {msg}" if where else msg


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """A pydantic error of `model` as one line: every problem (first_of)."""
    root = model
    errors = exc.errors(include_url=False)
    if not errors:
        return _one_line(str(exc))
    return first_of([_one_line(_describe_error(e, root)) for e in errors])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def display_path(path: Path | str) -> str:
    """The path as the user will recognise it: relative to the current directory when under it."""
    absolute = os.path.abspath(path)
    try:
        rel = os.path.relpath(absolute)
    except ValueError:
        return str(path)
    return absolute if rel.startswith("..") else rel


MAX_MESSAGE = 2000
# Invisible characters that reorder text ("Trojan Source"): never in an error line.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def profile_error(shown: str, message: str, field: str | None = None) -> ProfileError:
    text = _one_line(_BIDI.sub("", strip_control(f"{shown}: {message}", one_line=True)))
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    err = ProfileError(text)
    err.path = shown  # type: ignore[attr-defined]
    err.field = field  # type: ignore[attr-defined]
    return err
