"""Careless and hostile input files (issue 9): regular files only, under a size cap, bounded numbers, no deep YAML,
clean mount paths, degenerate keys. Each case is one line naming file and field, and nothing else escapes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.profile_text import error, load, write

from labctl import inputs, pricing
from labctl.errors import ProfileError, UserError
from labctl.profile import MAX_NODES, MAX_YAML_DEPTH, Volume, check_mount, load_profile
from labctl.profile_yaml import GuardedSafeLoader, ProfileLoader
from labctl.roster import load_roster, parse_public_key

BASE = """\
name: lab
sites: [chi@tacc]
lease_hours: 3
image: ubuntu-24.04
nodes:
  node: {count: 1, floating_ip: true, types: {chi@tacc: [compute_skylake]}}
setup:
  - name: hello
    run: echo hi
    timeout: 60
"""
NODES = "nodes:\n  node: {count: 1, floating_ip: true, types: {chi@tacc: [compute_skylake]}}\n"


def _fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


def _in_thread(fn, timeout: float = 10.0):
    """Run fn() in a thread; fail the test (instead of hanging it) if it blocks."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked reading the file"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


# ------------------------------------------------------------------------------------ read_regular_file


def test_read_regular_file_reads_a_small_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"x" * 100)
    assert inputs.read_regular_file(path, 100, "test file") == b"x" * 100


@pytest.mark.parametrize(("make", "expected"), [
    (lambda tmp: tmp, "is a directory, not a test file"),
    (lambda tmp: Path("/dev/zero"), "is a character device, not a test file"),
    (lambda tmp: Path("/dev/null"), "is a character device, not a test file"),
    (lambda tmp: _fifo(tmp, "pipe"), "is a named pipe (FIFO), not a test file"),
    (lambda tmp: tmp / "missing", "no such file (test file not found)"),
    (lambda tmp: tmp / "missing" / "below", "no such file (test file not found)"),
])
def test_read_regular_file_refuses_what_is_not_a_regular_file(tmp_path: Path, make, expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(UserError) as info:
        _in_thread(lambda: inputs.read_regular_file(path, 1024, "test file"))
    assert str(info.value) == f"{path}: {expected}"


def test_read_regular_file_caps_the_size_and_names_the_error_class(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"y" * 101)
    with pytest.raises(ProfileError, match=r"big: 101 bytes is too large for a test file \(limit 100 bytes\)"):
        inputs.read_regular_file(path, 100, "test file", error=ProfileError)


def test_a_file_behind_a_symlink_is_read_but_not_a_device_behind_one(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("ok")
    (tmp_path / "link").symlink_to("real")
    assert inputs.read_regular_file(tmp_path / "link", 10, "test file") == b"ok"
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(UserError, match="is a character device"):
        inputs.read_regular_file(tmp_path / "zero", 10, "test file")


# ------------------------------------------------------------------------------------ the three loaders


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_profile_roster_and_prices_refuse_special_files_without_blocking(tmp_path: Path, special: str) -> None:
    if special == "fifo":
        path = _fifo(tmp_path, "lab.yaml")
    elif special == "dir":
        path = tmp_path / "lab.yaml"
        path.mkdir()
    else:
        path = Path(special)
    started = time.monotonic()
    with pytest.raises(ProfileError, match="not a YAML file"):
        _in_thread(lambda: load_profile(path))
    with pytest.raises(UserError, match="not a roster file"):
        _in_thread(lambda: load_roster(path))
    with pytest.raises(UserError, match="not a price file"):
        _in_thread(lambda: pricing.load_prices(path))
    assert time.monotonic() - started < 5


def test_size_caps(tmp_path: Path) -> None:
    big = tmp_path / "profiles" / "lab.yaml"
    big.parent.mkdir()
    big.write_text("description: '" + "x" * (1024 * 1024) + "'\n")
    with pytest.raises(ProfileError, match=r"too large for a YAML file \(limit 1 MiB\)"):
        load_profile(big)
    roster = tmp_path / "roster.csv"
    with roster.open("wb") as f:
        f.truncate(10 * 1024 * 1024 + 1)  # sparse: costs no disk
    with pytest.raises(UserError, match=r"too large for a roster file \(limit 10 MiB\)"):
        load_roster(roster)
    with pytest.raises(UserError, match=r"too large for a price file \(limit 10 MiB\)"):
        pricing.load_prices(roster)


# ------------------------------------------------------------------------------------ YAML shape


def _yaml_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


def test_deep_yaml_is_one_line_not_a_recursion_error(tmp_path: Path) -> None:
    for text in ("a: " + "[" * 500 + "]" * 500 + "\n",
                 "".join("  " * i + f"k{i}:\n" for i in range(500)) + "  " * 500 + "v: 1\n",
                 "a: " + "{x: " * 5000 + "1" + "}" * 5000 + "\n"):
        message = _yaml_error(tmp_path, text)
        assert "lab.yaml:" in message and f"nested more than {MAX_YAML_DEPTH} levels deep" in message


def test_yaml_at_the_depth_limit_still_parses_to_a_field_error(tmp_path: Path) -> None:
    depth = MAX_YAML_DEPTH - 1  # the top-level mapping is one level
    message = error(tmp_path, BASE + "description: " + "[" * depth + "]" * depth + "\n")
    assert message.startswith("description: Input should be a valid string")


def test_yaml_alias_bomb_and_self_reference(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\n"
    started = time.monotonic()
    assert "too many values once YAML aliases are expanded" in _yaml_error(tmp_path, bomb)
    assert time.monotonic() - started < 10
    assert "a YAML alias inside itself" in _yaml_error(tmp_path, "a: &a [*a]\n")


def test_yaml_value_errors_are_profile_errors(tmp_path: Path) -> None:
    assert "YAML value error" in _yaml_error(tmp_path, "a: !!timestamp 2001-02-30\n")
    # no date at all (PyYAML's own constructor failed with an AttributeError; found by test_profile_fuzz)
    assert "not a timestamp: '2001-13-45# x'" in _yaml_error(tmp_path, "!!timestamp 2001-13-45# x\n")
    assert "YAML value error" in _yaml_error(tmp_path, "a: " + "1" * 5000 + "\n")
    # an explicit tag on an empty value: PyYAML's constructors fail with an IndexError or a KeyError
    message = _yaml_error(tmp_path, "a: !!int\n")
    assert message.endswith(":1:4: YAML value error: '' is not a valid !!int")
    assert _yaml_error(tmp_path, "a: {b: !!float }\n").endswith(":1:8: YAML value error: '' is not a valid !!float")
    message = _yaml_error(tmp_path, "a: 1\nb: [!!bool maybe]\n")
    assert message.endswith(":2:5: YAML value error: 'maybe' is not a valid !!bool")
    # dates are plain strings in a profile (no timestamp resolution)
    assert load(tmp_path, BASE + "description: 2001-02-30\n").description == "2001-02-30"
    path = write(tmp_path, BASE)
    path.write_bytes(b"name: \xff\n")
    with pytest.raises(ProfileError, match=r"not UTF-8 text \(byte 0xff on line 1\)"):
        load_profile(path)


YAML_PIECES = ["a", "1", "0x", "-", ":", ": ", "- ", "[", "]", "{", "}", ",", "? ", "\n", "\n  ", "#", "'", '"', "&a ",
               "*a", "<<: ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!str ", "!!binary ", "!!timestamp ",
               "!!set ", "!!omap ", "!!pairs ", "!!map ", "!!seq ", "!!merge ", "!!python/name:os.system ",
               "2001-02-30", "2001-13-45", ".nan", "1e999", "=", "~"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=24).map("".join))
def test_the_guarded_loader_gives_data_or_a_yaml_error(text: str) -> None:
    """What clouds.yaml and labctl's own files are read with: any text is data or a `yaml.YAMLError` (which the
    callers turn into one line with line:column), never PyYAML's IndexError, KeyError, TypeError..."""
    for loader in (GuardedSafeLoader, ProfileLoader):
        with contextlib.suppress(yaml.YAMLError):
            yaml.load(text, Loader=loader)  # noqa: S506 - both are SafeLoaders


# ------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("lease_hours: 3", "lease_hours: 1e-300", "lease_hours: Input should be greater than or equal to 1"),
    ("lease_hours: 3", "lease_hours: 0.5", "lease_hours: Input should be greater than or equal to 1"),
    ("lease_hours: 3", "lease_hours: 169", "lease_hours: Input should be less than or equal to 168"),
    ("lease_hours: 3", "lease_hours: .nan", "lease_hours: Input should be a finite number"),
    ("lease_hours: 3", "lease_hours: .inf", "lease_hours: Input should be a finite number"),
    ("lease_hours: 3", "lease_hours: -3", "lease_hours: Input should be greater than or equal to 1"),
    ("timeout: 60", "timeout: 0", "setup[0].timeout: Input should be greater than 0"),
    ("timeout: 60", "timeout: -1", "setup[0].timeout: Input should be greater than 0"),
    ("timeout: 60", "timeout: 86401", "setup[0].timeout: Input should be less than or equal to 86400"),
    ("timeout: 60", "timeout: .nan", "setup[0].timeout: Input should be a finite number"),
    ("timeout: 60", "timeout: -.inf", "setup[0].timeout: Input should be a finite number"),
    ("count: 1", "count: 0", "nodes.node.count: Input should be greater than or equal to 1"),
    ("count: 1", "count: 33", "nodes.node.count: Input should be less than or equal to 32"),
    ("count: 1", "count: 1e300", "nodes.node.count: Input should be a valid integer"),
    ("count: 1,", "count: 1, gpu: {model: A100, count: 17},", "nodes.node.gpu.count: Input should be less than"),
])
def test_numbers_are_finite_and_bounded(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert error(tmp_path, BASE, **{old: new}).startswith(expected)


def test_one_line_per_bad_number_and_lease_hours_bounds_accepted(tmp_path: Path) -> None:
    assert load(tmp_path, BASE, **{"lease_hours: 3": "lease_hours: 1"}).lease_hours == 1
    assert load(tmp_path, BASE, **{"lease_hours: 3": "lease_hours: 168"}).lease_hours == 168
    assert load(tmp_path, BASE, **{"timeout: 60": "timeout: 86400"}).setup[0].timeout == 86400


def test_total_nodes_are_capped_quickly(tmp_path: Path) -> None:
    roles = "".join(f"  r{i}: {{count: 32, types: {{chi@tacc: [compute_skylake]}}}}\n" for i in range(3))
    text = BASE.replace(NODES, "nodes:\n" + roles)
    started = time.monotonic()
    assert error(tmp_path, text).startswith(f"nodes: 96 nodes in all; a deployment has at most {MAX_NODES}")
    many = "".join(f"  r{i}: {{count: 32, types: {{chi@tacc: [compute_skylake]}}}}\n" for i in range(1000))
    text = BASE.replace(NODES, "nodes:\n" + many)
    assert error(tmp_path, text).startswith("nodes: Dictionary should have at most 32 items")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("ports", "[0]", "ports[0]: Input should be greater than or equal to 1"),
    ("ports", "[65536]", "ports[0]: Input should be less than or equal to 65535"),
    ("ports", "[{port: 70000}]", "ports[0].port: Input should be less than or equal to 65535"),
    ("ports", "[" + ", ".join(["80"] * 101) + "]", "ports: List should have at most 100 items"),
    ("volumes", "{v: {size_gb: 2001, node: node-1}}", "volumes.v.size_gb: Input should be less than or equal to 2000"),
    ("volumes", "{v: {size_gb: 0, node: node-1}}", "volumes.v.size_gb: Input should be greater than or equal to 1"),
    ("volumes", "{v: {size_gb: .nan, node: node-1}}", "volumes.v.size_gb: Input should be a finite number"),
    ("outputs", "[{name: o, value: x, forward: 0}]", "outputs[0].forward: Input should be greater than or equal"),
    ("description", "'" + "d" * 1001 + "'", "description: String should have at most 1000 characters"),
    ("description", '"a\\x1b[2Jb"', "description: Value error, must not contain control characters"),
    ("image", "'" + "i" * 65 + "'", "image: String should have at most 64 characters"),
])
def test_other_fields_are_bounded(tmp_path: Path, field: str, value: str, expected: str) -> None:
    text = BASE.replace("image: ubuntu-24.04\n", "") + f"{field}: {value}\n"
    if field != "image":
        text += "image: ubuntu-24.04\n"
    message = error(tmp_path, text)
    assert message.startswith(expected.replace("Value error, ", "")), message


def test_too_many_setup_steps(tmp_path: Path) -> None:
    steps = "".join(f"  - {{name: s{i}, run: 'true'}}\n" for i in range(101))
    text = BASE.split("setup:")[0] + "setup:\n" + steps
    assert error(tmp_path, text).startswith("setup: List should have at most 100 items")


def test_control_characters_never_reach_the_error_line(tmp_path: Path) -> None:
    for extra in ('"bogus\\e[2J": 1\n', 'setup: [{name: s, run: x, "on": "\\e]8;;x\\a"}]\n',
                  'outputs: [{name: o, value: "{\\e[2J.floating_ip}"}]\n'):
        path = write(tmp_path, BASE.split("setup:")[0] + extra)
        with pytest.raises(ProfileError) as info:
            load_profile(path)
        assert "\x1b" not in str(info.value) and "\x07" not in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------ mount paths


@pytest.mark.parametrize("mount", [
    "/mnt/a;touch${IFS}/tmp/x", "/mnt/$(id)", "/mnt/a b", "/mnt/a\tb", "/mnt/`id`", "/mnt/a|b", "/mnt/a&b",
    "/mnt/'a'", '/mnt/"a"', "/mnt/a\\b", "/mnt/a*", "/mnt/\u00e9", "relative/path", "mnt", "", "/", "//",
    "/mnt//a", "/mnt/./a", "/mnt/../etc", "/mnt/..", "/etc", "/etc/x", "/usr/local/data", "/boot/x", "/proc",
    "/sys/x", "/dev/sdb", "/bin", "/home", "/tmp", "/var", "/mnt", "/root/data", "/run/x", "/var/lib/dpkg/x",
    "/mnt/a\n", "/mnt/" + "a" * 300,
])
def test_bad_mount_paths_are_refused(mount: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic wraps it; the messages are checked below
        check_mount(mount)
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Volume(size_gb=1, node="node-1", mount=mount)


@pytest.mark.parametrize(("mount", "clean"), [
    ("/mnt/data", "/mnt/data"), ("/mnt/data/", "/mnt/data"), ("/data", "/data"), ("/home/cc/data", "/home/cc/data"),
    ("/var/lib/docker", "/var/lib/docker"), ("/srv/x.y_z-1", "/srv/x.y_z-1"), ("/mnt/..a", "/mnt/..a"),
])
def test_clean_mount_paths_are_kept(mount: str, clean: str) -> None:
    assert check_mount(mount) == clean


def test_mount_error_in_a_profile_names_the_field(tmp_path: Path) -> None:
    text = BASE + "volumes: {v: {size_gb: 1, node: node-1, mount: '/mnt/a;touch${IFS}/tmp/x'}}\n"
    message = error(tmp_path, text)
    assert message.startswith("volumes.v.mount: '/mnt/a;touch${IFS}/tmp/x': a mount point may only contain")


# ------------------------------------------------------------------------------------ prices


def _prices(tmp_path: Path, data: object, raw: str | None = None) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(raw if raw is not None else json.dumps(data))
    return path


PRICES = {"as_of": "2026-01-01", "source": "test", "currency": "USD", "aws": {"us-east-1": {"t3.micro": 0.01}}}


@pytest.mark.parametrize(("raw", "expected"), [
    ('{"as_of": "x", "source": "s", "currency": "USD", "aws": {"r": {"t": NaN}}}', "NaN is not a price"),
    ('{"as_of": "x", "source": "s", "currency": "USD", "aws": {"r": {"t": Infinity}}}', "Infinity is not a price"),
    ('{"as_of": "x", "source": "s", "currency": "USD", "aws": {"r": {"t": 1e999}}}', "price must be a number >= 0"),
    ('{"as_of": "x", "source": "s", "currency": "USD", "aws": {"r": {"t": ' + "9" * 5000 + "}}}",
     "not a usable price table"),
    ("[" * 100_000 + "]" * 100_000, "nested far too deeply"),
])
def test_price_tables_refuse_non_finite_and_deep_json(tmp_path: Path, raw: str, expected: str) -> None:
    with pytest.raises(UserError) as info:
        pricing.load_prices(_prices(tmp_path, None, raw))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_price_table_factors_must_be_finite(tmp_path: Path) -> None:
    data = dict(PRICES, chameleon={"su_factors": {"x": -1}})
    with pytest.raises(UserError, match="su_factors must map node type -> a number >= 0"):
        pricing.load_prices(_prices(tmp_path, data))
    assert math.isfinite(pricing.load_prices(_prices(tmp_path, PRICES))["aws"]["us-east-1"]["t3.micro"])


# ------------------------------------------------------------------------------------ degenerate keys


def _ed25519_line(raw: bytes) -> str:
    import base64
    import struct

    def s(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    return "ssh-ed25519 " + base64.b64encode(s(b"ssh-ed25519") + s(raw)).decode()


@pytest.mark.parametrize(("raw", "why"), [
    (bytes(32), "all zero bytes"),
    (bytes(31) + b"\x80", "all zero bytes"),  # with the sign bit set
    (b"\x01" + bytes(31), "a point of small order"),
    (bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "a point of small order"),
    (bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"), "a point of small order"),
    (bytes.fromhex("ec" + "ff" * 30 + "7f"), "a point of small order"),
    (b"\x41" * 32, "one byte repeated"),
    (b"\x01\x02" * 16, "almost no variety"),
])
def test_degenerate_ed25519_keys_are_refused(raw: bytes, why: str) -> None:
    line, blob, problem = parse_public_key(_ed25519_line(raw))
    assert (line, blob) == ("", b"")
    assert problem is not None and "not a real key" in problem and why in problem


def test_degenerate_key_is_reported_with_its_roster_line(tmp_path: Path) -> None:
    from labctl.keys import ensure_keypair

    good = ensure_keypair(tmp_path / "k").public_key
    roster = tmp_path / "roster.csv"
    roster.write_text(f"student_id,name,email,ssh_public_key\nalice,Alice,a@x.edu,{good}\n"
                      f"bob,Bob,b@x.edu,{_ed25519_line(bytes(32))}\n")
    result = load_roster(roster)
    assert [s.student_id for s in result.students] == ["alice"]
    assert [(e.line, e.field) for e in result.errors] == [(3, "ssh_public_key")]
    assert "all zero bytes" in str(result.errors[0])
    assert parse_public_key(good)[2] is None


def test_hostile_names_and_headers_do_not_break_roster_parsing(tmp_path: Path) -> None:
    from labctl.keys import ensure_keypair

    good = ensure_keypair(tmp_path / "k").public_key
    roster = tmp_path / "roster.csv"
    roster.write_text("student_id,name,email,ssh_public_key,\u202eevil\x1b[2J\n"
                      f"alice,\"=HYPERLINK(\"\"http://x\"\")\",a@x.edu,{good},\n")
    result = load_roster(roster)
    assert [s.name for s in result.students] == ['=HYPERLINK("http://x")']  # the CSV export neutralises it
    bad = tmp_path / "bad.csv"
    bad.write_text("id\x1b]8;;http://x\x07\n")
    with pytest.raises(UserError) as info:
        load_roster(bad)
    assert "\x1b" not in str(info.value) and "\x07" not in str(info.value)
