"""Reading a YAML file safely: labctl's loader (YAML 1.2 booleans, no timestamps, no duplicate keys), a regular
file of bounded size only (`labctl.inputs`), collections nested at most `MAX_YAML_DEPTH` deep and at most
`MAX_YAML_NODES` values once aliases are expanded. Whatever the file holds, what comes out is data or a one-line
`ProfileError` with line:column.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from labctl import inputs
from labctl.errors import ProfileError
from labctl.profile_errors import display_path, profile_error

MAX_PROFILE_BYTES = inputs.MAX_PROFILE_BYTES  # 1 MiB
MAX_YAML_DEPTH = 32  # nesting of YAML collections
MAX_YAML_NODES = 1_000_000  # values visited, aliases counted each time they are used
# What PyYAML's constructors raise on a value that is not what its tag says (`!!int` alone: an IndexError)
CONSTRUCTOR_ERRORS = (ArithmeticError, LookupError, ValueError, TypeError, AttributeError)


class YAMLValueError(yaml.constructor.ConstructorError):
    """A value with an explicit tag that PyYAML's constructors cannot make: `!!int` with no digits, a
    `!!timestamp` that is no date, a `!!bool` that is no boolean."""


class GuardedSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader whose every failure on a hostile file is a `yaml.YAMLError` with a mark: collections
    nested more than `MAX_YAML_DEPTH` deep are refused (not a RecursionError), and a value its constructors fail on
    (with an IndexError, a KeyError, an AttributeError...) is a `YAMLValueError`. For files read as other tools read
    them (clouds.yaml); labctl's own files get `ProfileLoader`."""

    _depth = 0

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except CONSTRUCTOR_ERRORS as exc:
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            value = "value"
            if isinstance(node, yaml.ScalarNode):
                text = str(node.value)
                value = f"{text[:20]!r}{'...' if len(text) > 20 else ''}"
            # a lookup's or an attribute's error says nothing more; the int digit limit's ends with Python's advice
            why = "" if isinstance(exc, (LookupError, AttributeError)) else f" ({str(exc).split(';')[0]})"
            raise YAMLValueError(None, None, f"{value} is not a valid {tag}{why}", node.start_mark) from None

    def construct_document(self, node: yaml.Node) -> Any:
        # a collection's constructors run to their end here, after `construct_object` returned
        try:
            return super().construct_document(node)
        except yaml.YAMLError:
            raise
        except CONSTRUCTOR_ERRORS as exc:
            problem = f"a value that is not what its tag says ({exc})"
            raise YAMLValueError(None, None, problem, node.start_mark) from None

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.CollectionStartEvent):
            if self._depth >= MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark)
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        # An explicit !!timestamp that is no date at all: PyYAML's own fails with an AttributeError on it.
        if not self.timestamp_regexp.match(str(node.value)):
            raise YAMLValueError(None, None, f"not a timestamp: {node.value!r}", node.start_mark)
        return super().construct_yaml_timestamp(node)


GuardedSafeLoader.add_constructor("tag:yaml.org,2002:timestamp", GuardedSafeLoader.construct_yaml_timestamp)


class ProfileLoader(GuardedSafeLoader):
    """labctl's loader: YAML 1.2 booleans (so `on:` stays a key), no timestamps (dates stay strings), and duplicate
    keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # `!!set [a]`: the base class says what it expected
            return super().construct_mapping(node, deep=deep)
        self.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


ProfileLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ProfileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def yaml_error_parts(shown: str, exc: yaml.YAMLError, fallback: str) -> tuple[str, str]:
    """(`shown` with the error's line:column, "YAML syntax|value error: <problem>"); `fallback` stands for a problem
    PyYAML did not name (its str() quotes the file's line, which a credentials file must not show)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
    kind = "value" if isinstance(exc, YAMLValueError) else "syntax"
    return where, f"YAML {kind} error: {getattr(exc, 'problem', None) or fallback}"


def _check_shape(shown: str, data: Any) -> None:
    """Refuse data nested too deep (or containing itself, through YAML aliases) or too big once aliases are
    expanded ("billion laughs"), before anything walks it recursively."""
    budget = MAX_YAML_NODES
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise profile_error(shown, f"too many values once YAML aliases are expanded (more than {MAX_YAML_NODES:,})")
        if isinstance(item, dict):
            children: Iterable[Any] = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_YAML_DEPTH:
            raise profile_error(shown, f"nested more than {MAX_YAML_DEPTH} levels deep (or a YAML alias inside itself)")
        stack.extend((child, depth + 1) for child in children)


def read_yaml(path: Path | str, what: str = "a profile mapping", shown: str | None = None) -> Any:
    """Parse a YAML file with labctl's loader; errors are one-line `ProfileError`s with line:column.

    Only a regular file of at most `MAX_PROFILE_BYTES` is read (see `labctl.inputs`), collections may nest at
    most `MAX_YAML_DEPTH` deep, and nothing but a `ProfileError` comes out of a hostile file."""
    shown = shown or display_path(path)
    data_bytes = inputs.read_regular_file(path, MAX_PROFILE_BYTES, "YAML file", shown=shown, error=ProfileError)
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data_bytes.count(b"\n", 0, exc.start) + 1
        raise profile_error(shown, f"not UTF-8 text (byte 0x{data_bytes[exc.start]:02x} on line {line})") from None
    if not text.strip():
        raise profile_error(shown, f"empty file (expected {what})")
    try:
        data = yaml.load(text, Loader=ProfileLoader)  # noqa: S506 - ProfileLoader is a SafeLoader
    except yaml.YAMLError as exc:  # a value not what its tag says too (the loader's YAMLValueError)
        raise profile_error(*yaml_error_parts(shown, exc, str(exc))) from None
    except RecursionError:
        raise profile_error(shown, f"nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None
    if data is None:
        raise profile_error(shown, f"empty file (only comments; expected {what})")
    _check_shape(shown, data)
    return data
