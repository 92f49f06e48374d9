"""The user's SSH key pair: one ed25519 key that labctl registers as the Nova keypair and uses for SSH.

`ensure_keypair(directory)` creates `<directory>/id_ed25519` (0600, directory 0700) plus the matching
`id_ed25519.pub` on first use and reuses them afterwards. Creation is race-safe: the key is written to a
temporary file and hard-linked into place, so when two labctl processes start at once exactly one key wins
and both use it. The private key never leaves the file; only its public half and fingerprint are returned.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

KEY_NAME = "id_ed25519"
COMMENT = "labctl"


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_key: str  # "ssh-ed25519 AAAA... labctl"
    fingerprint: str  # "SHA256:..." as `ssh-keygen -l` prints it

    @property
    def public_path(self) -> Path:
        return self.private_path.with_name(self.private_path.name + ".pub")


def fingerprint(public_key_line: str) -> str:
    """OpenSSH SHA256 fingerprint of a public key line ("ssh-ed25519 AAAA... [comment]")."""
    parts = public_key_line.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line")
    blob = base64.b64decode(parts[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create `path` with `data` atomically unless it exists. True if this call created it.

    The data goes to a temporary file in the same directory (created with `mode`, fsynced) that is then
    hard-linked to `path`: `os.link` fails when `path` exists, so concurrent writers cannot overwrite each
    other and a reader never sees a partial file.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_keypair(directory: Path) -> KeyPair:
    """Return labctl's key pair in `directory`, creating it on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    private_path = directory / KEY_NAME

    if not private_path.exists():
        new_key = Ed25519PrivateKey.generate()
        pem = new_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        write_private_file(private_path, pem)  # loses harmlessly to a concurrent writer

    os.chmod(private_path, 0o600)  # ssh refuses private keys that others can read
    try:
        key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        from labctl.errors import UserError

        raise UserError(
            f"{private_path} is not a usable unencrypted OpenSSH private key ({exc}); "
            "move it away and labctl will create a new one"
        ) from None
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_line = f"{public.decode()} {COMMENT}"

    pub_path = private_path.with_name(KEY_NAME + ".pub")
    current = pub_path.read_text().strip() if pub_path.exists() else None
    if current != public_line:
        # 0600 like every file of the state dir: the key is public, but which key reaches the class is not.
        tmp = pub_path.with_name(f".{pub_path.name}.{os.getpid()}.tmp")
        write_private_file(tmp, (public_line + "\n").encode())
        os.replace(tmp, pub_path)

    return KeyPair(private_path=private_path, public_key=public_line, fingerprint=fingerprint(public_line))
