"""Property tests: mutations of every shipped profile load, or fail with a one-line `ProfileError` -- never any
other exception (RecursionError, MemoryError, ValueError, TypeError, ...). The CLI (`labctl validate FILE`) exits
0 or 2 without a traceback. Example counts follow the Hypothesis profile (tests/conftest.py: "ci" by default,
HYPOTHESIS_PROFILE=long for many more)."""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from labctl.errors import ProfileError  # noqa: E402
from labctl.profile import load_profile, read_yaml, shipped_profiles_dir  # noqa: E402

SHIPPED = sorted(shipped_profiles_dir().glob("*.yaml"))
LABS = shipped_profiles_dir().parent / "labs"
ORIGINALS = {p.stem: read_yaml(p) for p in SHIPPED}
_N = settings.default.max_examples  # 100 with the "ci" profile, more with "long"
FUZZ = settings(max_examples=3 * _N, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# What may not reach a terminal in an error line: C0/C1 controls, DEL, and text-direction overrides.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
CONTROL = "".join(chr(c) for c in [*range(0, 32), 127, *range(0x80, 0xA0)]) + "\u202e\u200b\ufeff"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**300, 65535, 65536, 168, 169, 32, 33, 64, 65]),
    st.floats(),  # NaN, inf, -0.0, subnormals (1e-300 ...)
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-300, 1e300, 0.0, -0.0, 0.25, 168.0000001]),
    st.text(max_size=30),
    st.text(alphabet=CONTROL, max_size=10),
    st.sampled_from(["", " ", "all", "../../etc/passwd", "/etc/shadow", "node-1", "chi@tacc", "A100",
                     "/mnt/a;touch${IFS}/tmp/x", "{node-1.floating_ip}", "{", "}", "{{", "x" * 5000,
                     "\x1b[2J\x1b]8;;http://x\x07", "\u202eevil", "~", "*", "&a", "!!python/object"]),
)


def _nest(depth: int, leaf: Any, kind: str) -> Any:
    for _ in range(depth):
        leaf = [leaf] if kind == "list" else {"k": leaf}
    return leaf


values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), children, max_size=5)),
    max_leaves=12,
) | st.builds(_nest, st.integers(1, 60), scalars, st.sampled_from(["list", "dict"]))


def _containers(data: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, container) for every dict/list in data, the root first."""
    yield path, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, child in items:
        if isinstance(child, dict | list):
            yield from _containers(child, (*path, key))


def _copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, Any]:
    """(profile name, its data with 1..4 random mutations)."""
    name = draw(st.sampled_from(sorted(ORIGINALS)))
    data = _copy(ORIGINALS[name])
    for _ in range(draw(st.integers(1, 4))):
        spots = list(_containers(data))
        _, box = draw(st.sampled_from(spots))
        keys = list(box) if isinstance(box, dict) else list(range(len(box)))
        op = draw(st.sampled_from(["drop", "replace", "replace", "replace", "add", "repeat"]))
        if op == "drop" and keys:
            del box[draw(st.sampled_from(keys))]
        elif op == "replace" and keys:
            box[draw(st.sampled_from(keys))] = draw(values)
        elif op == "repeat" and keys:
            key = draw(st.sampled_from(keys))
            box[key] = [box[key]] * draw(st.integers(0, 200))
        elif isinstance(box, dict):
            field = draw(st.one_of(st.sampled_from(["nodes", "count", "lease_hours", "timeout", "mount", "bogus",
                                                    "upload", "src", "ports", "volumes"]), st.text(max_size=12)))
            box[field] = draw(values)
        else:
            box.append(draw(values))
    return name, data


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A directory with profiles/ (the file under test) and labs/ (the shipped labs, linked)."""
    with tempfile.TemporaryDirectory(prefix="labctl-fuzz-") as tmp:
        root = Path(tmp)
        (root / "profiles").mkdir()
        (root / "labs").symlink_to(LABS.resolve(), target_is_directory=True)
        yield root


def _write(workdir: Path, name: str, text: str | bytes) -> Path:
    path = workdir / "profiles" / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _check_loads_or_profile_error(path: Path) -> None:
    try:
        load_profile(path)
    except ProfileError as exc:
        message = str(exc)
        assert "\n" not in message and not _UNSAFE.search(message), repr(message)
        assert len(message) <= 2000
        # What kind of problem it was (see --hypothesis-show-statistics): the mutations reach many checks.
        event(message.split(": ", 2)[1][:30] if message.count(": ") >= 2 else "other error")
    else:
        event("loaded")


def test_shipped_profiles_load(workdir: Path) -> None:
    for name, data in ORIGINALS.items():
        load_profile(_write(workdir, name, _dump(data)))


@FUZZ
@given(case=mutated())
def test_mutated_profiles_load_or_give_one_profile_error(workdir: Path, case: tuple[str, Any]) -> None:
    name, data = case
    _check_loads_or_profile_error(_write(workdir, name, _dump(data)))


@st.composite
def text_mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    """(profile name, its file text with random bytes or YAML syntax inserted / cut out)."""
    name = draw(st.sampled_from(sorted(ORIGINALS)))
    text = (shipped_profiles_dir() / f"{name}.yaml").read_bytes()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "insert", "cut", "deep"]))
        if op == "insert":
            piece = draw(st.one_of(
                st.binary(max_size=20),
                st.sampled_from([b"[", b"]", b"{", b"}", b": ", b"- ", b"&a ", b"*a", b"!!binary x", b"\t", b"\n",
                                 b"<<: *a", b"? ", b"!!timestamp 2001-13-45", b"\xff\xfe", b"%YAML 1.1\n---\n",
                                 b".nan", b".inf", b"1e-300", b"'", b'"', b"\\", b"#", b"\x00",
                                 # explicit tags, on whatever value follows (PyYAML fails on `!!int` alone)
                                 b"!!int ", b"!!float ", b"!!bool ", b"!!set ", b"!!omap ", b"!!pairs ", b"!!str "]),
            ))
            text = text[:at] + piece + text[at:]
        elif op == "cut":
            end = draw(st.integers(at, min(len(text), at + 40)))
            text = text[:at] + text[end:]
        else:
            depth = draw(st.integers(30, 3000))
            text = text[:at] + b"[" * depth + b"]" * depth + text[at:]
    return name, text


@FUZZ
@given(case=text_mutations())
def test_mangled_profile_text_loads_or_gives_one_profile_error(workdir: Path, case: tuple[str, bytes]) -> None:
    name, text = case
    _check_loads_or_profile_error(_write(workdir, name, text))


def _validate_in_process(path: Path) -> tuple[int, str, str]:
    from labctl.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["labctl", "validate", str(path)]
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


@settings(FUZZ, max_examples=max(10, _N // 2))
@given(case=mutated())
def test_labctl_validate_exits_0_or_2_without_traceback(workdir: Path, case: tuple[str, Any]) -> None:
    name, data = case
    code, out, err = _validate_in_process(_write(workdir, name, _dump(data)))
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in out + err
    if code == 2:
        assert err.startswith("error: ") and all(line.startswith("error: ") for line in err.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("content", [
    b"a: " + b"[" * 500 + b"]" * 500 + b"\n",
    b"name: x\nlease_hours: .nan\n",
    b"a: &a [*a]\n",
    b"\xff\xfe\x00\x00",
    None,  # /dev/zero
])
def test_labctl_validate_subprocess_on_hostile_files(tmp_path: Path, labctl_env: dict[str, str],
                                                     content: bytes | None) -> None:
    if content is None:
        path = Path("/dev/zero")
    else:
        path = tmp_path / "x.yaml"
        path.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "labctl", "validate", str(path)], capture_output=True, text=True,
                       env=labctl_env, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    if content is None:
        assert "is a character device, not a YAML file" in r.stderr
