"""Profiles written from YAML text in a test's tmp_path: one place for the tests of the profile model."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from labctl.errors import ProfileError
from labctl.profile import Profile, load_profile


def write(tmp_path: Path, text: str, file: str = "lab", /, **replace: str) -> Path:
    """`text` (each `old=new` of `replace` applied, every `old` present) as tmp_path/profiles/<file>.yaml."""
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "profiles" / f"{file}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str, file: str = "lab", /, **replace: str) -> Profile:
    return load_profile(write(tmp_path, text, file, **replace))


def error(tmp_path: Path, text: str, file: str = "lab", /, **replace: str) -> str:
    """The one-line ProfileError loading it gives, without the 'profiles/<file>.yaml: ' prefix."""
    with pytest.raises(ProfileError) as exc:
        load(tmp_path, text, file, **replace)
    message = str(exc.value)
    assert "\n" not in message and f"profiles/{file}.yaml: " in message
    return message.split(f"{file}.yaml: ", 1)[1]
