"""The runner checks uploads again at upload time: a file swapped for a link after `validate` never reaches a
node; setup logs are private (0700 / 0600) and masked."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from labctl import redact
from labctl.runner import HostKeyChanged, SetupStep, Upload, run_setup

SECRET = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-not-a-real-key\n"


@pytest.fixture
def labs(tmp_path: Path) -> Path:
    """tmp/labs/lab/ with its own file, tmp/labs/_common/, and a stand-in private key outside both."""
    lab = tmp_path / "labs" / "lab"
    lab.mkdir(parents=True)
    (tmp_path / "labs" / "_common").mkdir()
    (tmp_path / "labs" / "_common" / "shared.sh").write_text("echo shared\n")
    (lab / "own.txt").write_text("own\n")
    (tmp_path / "secret-keys").mkdir()
    (tmp_path / "secret-keys" / "id_ed25519").write_text(SECRET)
    return tmp_path


def _roots(labs: Path) -> tuple[Path, ...]:
    return (labs / "labs" / "lab", labs / "labs" / "_common")


def _run(lab, labs: Path, uploads: list[Upload]):
    step = SetupStep(0, "upload", ["n1"], "ls -R . > /dev/null", uploads, 20)
    return run_setup(lab.targets[:1], [step], lab.key.private_path, lab.store, lab.store, labs / "state" / "logs" / "d")


def _home_files(lab) -> dict[str, str]:
    home = lab.node_dir("n1") / "home"
    return {str(p.relative_to(home)): p.read_text(errors="replace") for p in home.rglob("*") if p.is_file()}


def test_symlink_to_the_private_key_is_refused_at_upload_time(lab, labs: Path) -> None:
    own = labs / "labs" / "lab" / "own.txt"
    own.unlink()
    own.symlink_to(labs / "secret-keys" / "id_ed25519")  # swapped after the profile was validated
    results = _run(lab, labs, [Upload(own, "own.txt", _roots(labs))])
    assert not results["n1"].ok and results["n1"].failed_step == "upload"
    status, detail = lab.store.status[("n1", 0)]
    assert status == "failed" and "upload refused" in detail and "leads outside the lab directory" in detail
    assert not any("PRIVATE KEY" in text for text in _home_files(lab).values())


def test_symlinked_directory_and_a_link_inside_a_directory_are_refused(lab, labs: Path) -> None:
    lab_dir = labs / "labs" / "lab"
    (lab_dir / "keys").symlink_to(labs / "secret-keys", target_is_directory=True)
    results = _run(lab, labs, [Upload(lab_dir / "keys", "keys", _roots(labs))])
    assert not results["n1"].ok and "upload refused" in lab.store.status[("n1", 0)][1]
    files = lab_dir / "files" / "sub"
    files.mkdir(parents=True)
    (files / "fine.txt").write_text("fine\n")
    (files / "stolen").symlink_to(labs / "secret-keys" / "id_ed25519")
    lab.store.status.clear()
    results = _run(lab, labs, [Upload(lab_dir / "files", "files", _roots(labs))])
    assert not results["n1"].ok
    assert "sub/stolen" in lab.store.status[("n1", 0)][1]
    assert not any("PRIVATE KEY" in text for text in _home_files(lab).values())
    assert "files/sub/fine.txt" not in _home_files(lab)  # refused before anything of it was sent


def test_default_roots_are_the_directory_of_the_upload(lab, labs: Path) -> None:
    link = labs / "labs" / "lab" / "k"
    link.symlink_to(labs / "secret-keys" / "id_ed25519")
    results = _run(lab, labs, [Upload(link, "k")])
    assert not results["n1"].ok and "upload refused" in lab.store.status[("n1", 0)][1]


def test_directory_upload_with_common_links_lands_file_by_file(lab, labs: Path) -> None:
    lab_dir = labs / "labs" / "lab"
    files = lab_dir / "files"
    (files / "sub").mkdir(parents=True)
    (files / "sub" / "a.txt").write_text("a\n")
    (files / "run.sh").write_text("#!/bin/sh\necho run\n")
    (files / "run.sh").chmod(0o755)
    (files / "shared.sh").symlink_to("../../_common/shared.sh")
    (files / "common").symlink_to("../../_common", target_is_directory=True)
    (lab_dir / "shared.sh").symlink_to("../_common/shared.sh")
    results = _run(lab, labs, [Upload(files, "dest/files", _roots(labs)),
                               Upload(lab_dir / "shared.sh", "s.sh", _roots(labs))])
    assert results["n1"].ok, results["n1"].log_tail
    home = lab.node_dir("n1") / "home"
    assert (home / "dest/files/sub/a.txt").read_text() == "a\n"
    assert (home / "dest/files/shared.sh").read_text() == "echo shared\n"
    assert (home / "dest/files/common/shared.sh").read_text() == "echo shared\n"
    assert not (home / "dest/files/shared.sh").is_symlink() and (home / "s.sh").read_text() == "echo shared\n"
    assert (home / "dest/files/run.sh").stat().st_mode & 0o777 == 0o755
    # into an existing directory, as `cp -r` does
    results = _run(lab, labs, [Upload(files, "dest", _roots(labs))])
    assert (home / "dest/files/sub/a.txt").exists()


def test_logs_are_private_and_masked(lab, labs: Path) -> None:
    logs = labs / "state" / "logs"
    logs.mkdir(parents=True, mode=0o755)
    logs.chmod(0o755)  # as older labctl versions left it
    token = "tok-9f8e7d6c5b4a"
    redact.register_secret(token)
    try:
        step = SetupStep(0, "echo", ["n1"], f"echo 'the token is {token}'; echo other-secret-xyz; exit 3", [], 20)
        results = run_setup(lab.targets[:1], [step], lab.key.private_path, lab.store, lab.store, logs / "dep",
                            redact=["other-secret-xyz"])
    finally:
        redact._reset_for_tests()
    result = results["n1"]
    assert not result.ok
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    assert stat.S_IMODE((logs / "dep").stat().st_mode) == 0o700
    assert stat.S_IMODE(result.log_path.stat().st_mode) == 0o600
    text = result.log_path.read_text()
    assert "the token is ***" in text and token not in text
    assert "other-secret-xyz" not in text and "********" in text
    assert token not in result.log_tail and "the token is ***" in result.log_tail


def test_log_tail_is_masked_for_a_secret_registered_later(tmp_path: Path) -> None:
    from labctl.runner.setup import NodeLog

    (tmp_path / "logs").mkdir()
    log = NodeLog(tmp_path / "logs" / "n.log", [])
    log.line("password=hunter2-long \x1b[2Jdone")
    redact.register_secret("hunter2-long")
    try:
        assert log.tail() == "password=*** [2Jdone"
    finally:
        redact._reset_for_tests()


def test_host_key_changed_names_the_forget_command() -> None:
    message = str(HostKeyChanged("gpu-1", "127.10.0.5", 2222))
    assert "labctl ssh LAB gpu-1 --forget-host-key" in message
