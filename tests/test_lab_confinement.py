"""Nothing outside labs/<lab>/ (and labs/_common/) reaches a node: `validate` resolves every symbolic link."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.errors import ProfileError
from labctl.profile import load_profile, shipped_profiles_dir

PROFILE = """\
name: lab
sites: [chi@tacc]
lease_hours: 3
image: ubuntu-24.04
nodes:
  node: {count: 1, floating_ip: true, types: {chi@tacc: [compute_skylake]}}
setup:
  - name: step
    on: all
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/profiles/lab.yaml's directories: tmp/labs/lab/, tmp/labs/_common/, and a 'private key' outside."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "labs" / "lab").mkdir(parents=True)
    (tmp_path / "labs" / "_common").mkdir()
    (tmp_path / "labs" / "_common" / "shared.sh").write_text("echo shared\n")
    (tmp_path / "labs" / "lab" / "own.sh").write_text("echo own\n")
    secret = tmp_path / "outside" / ".local" / "state" / "labctl" / "keys"
    secret.mkdir(parents=True)
    (secret / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n")
    return tmp_path


def _profile(tree: Path, step: str) -> Path:
    path = tree / "profiles" / "lab.yaml"
    path.write_text(PROFILE + step)
    return path


def _error(path: Path) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message
    return message


KEY = "outside/.local/state/labctl/keys/id_ed25519"


def test_symlink_to_a_file_outside_is_refused_for_script_and_upload(tree: Path) -> None:
    lab = tree / "labs" / "lab"
    (lab / "key.sh").symlink_to(tree / KEY)
    message = _error(_profile(tree, "    script: key.sh\n"))
    assert "profiles/lab.yaml: setup[0].script: 'key.sh' leads outside the lab directory" in message
    assert "only links into" in message and "_common/ are allowed" in message
    message = _error(_profile(tree, "    run: 'true'\n    upload: [{src: key.sh, dest: k}]\n"))
    assert "setup[0].upload[0].src: 'key.sh' leads outside the lab directory" in message


def test_relative_symlink_climbing_out_is_refused(tree: Path) -> None:
    (tree / "labs" / "lab" / "up").symlink_to("../../" + KEY)
    assert "leads outside the lab directory" in _error(
        _profile(tree, "    run: 'true'\n    upload: [{src: up, dest: k}]\n"))


def test_symlinked_directory_outside_is_refused(tree: Path) -> None:
    (tree / "labs" / "lab" / "keys").symlink_to(tree / KEY.rsplit("/", 1)[0], target_is_directory=True)
    for src in ("keys", "keys/id_ed25519"):
        message = _error(_profile(tree, f"    run: 'true'\n    upload: [{{src: {src}, dest: k}}]\n"))
        assert f"setup[0].upload[0].src: '{src}' leads outside the lab directory" in message


def test_a_link_inside_an_uploaded_directory_is_refused(tree: Path) -> None:
    files = tree / "labs" / "lab" / "files" / "deeper"
    files.mkdir(parents=True)
    (files / "ok.txt").write_text("fine")
    (files / "stolen").symlink_to(tree / KEY)
    message = _error(_profile(tree, "    run: 'true'\n    upload: [{src: files, dest: files}]\n"))
    assert "setup[0].upload[0].src:" in message and "deeper/stolen" in message
    assert "leads outside the lab directory" in message
    (files / "stolen").unlink()
    (files / "loop").symlink_to("..", target_is_directory=True)
    assert "contains itself" in _error(_profile(tree, "    run: 'true'\n    upload: [{src: files, dest: f}]\n"))
    (files / "loop").unlink()
    os.mkfifo(files / "pipe")
    assert "is not a regular file" in _error(_profile(tree, "    run: 'true'\n    upload: [{src: files, dest: f}]\n"))


def test_links_into_common_keep_working(tree: Path) -> None:
    lab = tree / "labs" / "lab"
    (lab / "shared.sh").symlink_to("../_common/shared.sh")
    files = lab / "files"
    files.mkdir()
    (files / "shared.sh").symlink_to("../../_common/shared.sh")
    (files / "common").symlink_to("../../_common", target_is_directory=True)
    prof = load_profile(_profile(tree, "    script: shared.sh\n    upload: [{src: files, dest: f}, "
                                       "{src: own.sh, dest: own.sh}]\n"))
    assert prof.read_script("shared.sh") == "echo shared\n"
    assert prof.lab_file("files/shared.sh") == (tree / "labs" / "_common" / "shared.sh").resolve()
    assert set(prof.lab_roots()) == {lab.resolve(), (tree / "labs" / "_common").resolve()}


def test_a_file_swapped_after_loading_is_caught_when_read(tree: Path) -> None:
    prof = load_profile(_profile(tree, "    script: own.sh\n"))
    assert prof.read_script("own.sh", "setup[0].script") == "echo own\n"
    own = tree / "labs" / "lab" / "own.sh"
    own.unlink()
    own.symlink_to(tree / KEY)
    with pytest.raises(ProfileError, match=r"lab\.yaml: setup\[0\]\.script: 'own\.sh' leads outside"):
        prof.read_script("own.sh", "setup[0].script")
    own.unlink()
    own.symlink_to("/dev/zero")
    with pytest.raises(ProfileError, match="leads outside"):
        prof.read_script("own.sh")


def test_absolute_and_dotdot_paths_stay_refused(tree: Path) -> None:
    assert "must be a path relative to" in _error(_profile(tree, f"    script: {tree / KEY}\n"))
    assert "is outside the lab directory" in _error(_profile(tree, "    script: ../_common/shared.sh\n"))


def test_shipped_profiles_with_common_links_still_validate() -> None:
    linked = [p for p in sorted(shipped_profiles_dir().glob("*.yaml"))
              if any((p.parent.parent / "labs" / p.stem / n).is_symlink() for n in ("node-info.sh",))]
    assert linked, "the shipped labs share scripts from labs/_common/ through links"
    for path in linked:
        load_profile(path)


@pytest.mark.slow
def test_labctl_validate_reports_the_link_with_exit_2(tree: Path, labctl_env: dict[str, str]) -> None:
    (tree / "labs" / "lab" / "key.sh").symlink_to(tree / KEY)
    path = _profile(tree, "    run: 'true'\n    upload: [{src: key.sh, dest: k}]\n")
    r = subprocess.run([sys.executable, "-m", "labctl", "validate", str(path)], capture_output=True, text=True,
                       env=labctl_env, timeout=60, cwd=tree)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "ok:" not in r.stdout
    assert "setup[0].upload[0].src: 'key.sh' leads outside the lab directory" in r.stderr
