"""Who may use an emulated cloud: the world's own random credentials, and files only its owner can read.

Every world directory holds `credentials.json` (mode 0600, in a 0700 directory), created on first use with
`secrets`: an OpenStack application credential (id + secret) and the emulated user's password, an AWS access
key pair, a Compute Engine bearer token, and the key that the EC2 front layer shows the moto daemon. Every
process that serves or uses the same world reads the same file, so `labctl status`, `ssh` and `down` in later
commands authenticate as `up` did, while another local user (who cannot read the file) gets a 401 from every
API. Each value is registered with `labctl.redact` when it is read, so labctl never prints it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CREDENTIALS_FILE = "credentials.json"
_LOCK_FILE = ".credentials.lock"
_cache: dict[tuple[str, int, int], WorldCredentials] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class WorldCredentials:
    app_cred_id: str
    app_cred_secret: str
    password: str
    aws_access_key_id: str
    aws_secret_access_key: str
    gce_token: str
    moto_key: str

    def secrets(self) -> tuple[str, ...]:
        return (self.app_cred_secret, self.password, self.aws_secret_access_key, self.gce_token, self.moto_key)


def _new() -> dict[str, str]:
    upper = string.ascii_uppercase + string.digits
    return {
        "app_cred_id": secrets.token_hex(16),
        "app_cred_secret": secrets.token_urlsafe(32),
        "password": secrets.token_urlsafe(24),
        "aws_access_key_id": "AKIA" + "".join(secrets.choice(upper) for _ in range(16)),
        "aws_secret_access_key": secrets.token_urlsafe(30),
        "gce_token": "ya29." + secrets.token_urlsafe(48),
        "moto_key": secrets.token_urlsafe(32),
    }


def private_dir(path: Path) -> Path:
    """`path` created if missing and made 0700 (only its owner may list or enter it)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) != 0o700:
            path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """`path` created (empty) if missing and made 0600 (before anything is written to it).

    An existing file is only chmodded by path, never opened: it may be a SQLite database that a connection of
    this process holds POSIX locks on, and closing any descriptor of the file drops them all (SQLite's own
    warning), after which this process's connections read a stale snapshot."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) != 0o600:
            path.chmod(0o600)
        return path
    os.close(fd)  # new: nothing of this process had it open
    return path


def private_files(directory: Path, names: tuple[str, ...]) -> None:
    """Make those of `names` in `directory` that exist 0600 (an older world's files, SQLite's -wal / -shm)."""
    for name in names:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if stat.S_IMODE((Path(directory) / name).stat().st_mode) != 0o600:
                (Path(directory) / name).chmod(0o600)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def world_credentials(state_dir: str | os.PathLike) -> WorldCredentials:
    """The credentials of the world in `state_dir`, created (0600, the directory 0700) if it has none."""
    directory = private_dir(Path(state_dir).expanduser())
    path = directory / CREDENTIALS_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    key = (str(directory.resolve()), st.st_ino, st.st_mtime_ns) if st else None
    if key is not None:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
    fields = set(WorldCredentials.__dataclass_fields__)
    data = _read(path)
    if data is None or not fields <= set(data):
        with _locked(directory):
            data = _read(path)
            if data is None or not fields <= set(data):
                data = {**_new(), **{k: v for k, v in (data or {}).items() if k in fields and isinstance(v, str)}}
                tmp = directory / f".{CREDENTIALS_FILE}.{os.getpid()}.{threading.get_ident()}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
    private_files(directory, (CREDENTIALS_FILE,))
    creds = WorldCredentials(**{k: str(data[k]) for k in fields})
    from labctl.redact import register_secret

    for value in creds.secrets():
        register_secret(value)
    st = path.stat()
    with _cache_lock:
        _cache[(str(directory.resolve()), st.st_ino, st.st_mtime_ns)] = creds
    return creds


def same_secret(given: object, expected: str) -> bool:
    """`given == expected` in constant time (False for anything but a string)."""
    return isinstance(given, str) and secrets.compare_digest(given.encode(), expected.encode())
