"""A real PostgreSQL server for the tests (shared by tests/state and the class-mode e2e tests).

Started once per session in a temp dir (initdb + pg_ctl, trust auth, listening on 127.0.0.1 only, on a free
port) and stopped at the end; each test asks it for a fresh database. Without PostgreSQL binaries the
PostgreSQL cases are skipped -- except on CI (CI=true), where they must run.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.state.helpers import free_port


def _find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH, then Debian's /usr/lib/postgresql/<ver>/bin."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
        return Path(initdb).parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb") + glob.glob("/usr/pgsql-*/bin/initdb")

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)

    for path in sorted(candidates, key=version, reverse=True):
        if (Path(path).parent / "pg_ctl").exists():
            return Path(path).parent
    return None


@dataclass
class PgServer:
    bindir: Path
    root: Path  # temp dir: data/, sockets, log
    port: int
    run_as: list[str]  # command prefix running a program as the server's (non-root) user
    _dbs = itertools.count(1)

    def url(self, db: str = "postgres", password: str | None = None) -> str:
        auth = f"labctl:{password}" if password else "labctl"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def admin(self):
        import psycopg

        return psycopg.connect(self.url(), autocommit=True)

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t{os.getpid()}_{next(self._dbs)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _start_server() -> Iterator[PgServer]:
    bindir = _find_pg_bin()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    pytest.importorskip("psycopg", reason="psycopg not installed: pip install 'psycopg[binary]'")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no 'postgres' user to run the test server as", pytrace=False)
        runuser = shutil.which("runuser")
        run_as = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
    root = Path(tempfile.mkdtemp(prefix="labctl-pg-"))  # short: the socket path must fit 107 bytes
    if owner:
        os.chown(root, owner.pw_uid, owner.pw_gid)

    def run(*argv: str, **kw) -> subprocess.CompletedProcess:
        cmd = [*run_as, *argv] if run_as[:1] != ["su"] else [*run_as, " ".join(map(_sh_quote, argv))]
        return subprocess.run(cmd, capture_output=True, text=True, **kw)

    data, log = root / "data", root / "server.log"
    proc = run(str(bindir / "initdb"), "-D", str(data), "-U", "labctl", "--auth=trust", "-E", "UTF8",
               "--no-sync", "--no-instructions", timeout=120)
    if proc.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {proc.stderr.strip()}", pytrace=False)
    options = (f"-c listen_addresses=127.0.0.1 -c unix_socket_directories={root} -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    for _attempt in range(5):
        port = free_port()
        proc = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                   "-o", f"{options} -p {port}", "start", timeout=120)
        if proc.returncode == 0:
            break
    else:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {proc.stderr.strip()} {text[-2000:]}", pytrace=False)
    server = PgServer(bindir, root, port, run_as)
    try:
        yield server
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _sh_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    yield from _start_server()


