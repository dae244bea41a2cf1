"""A throwaway PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a temporary folder, on
a free loopback port (as root, the server runs as the ``postgres`` user, which PostgreSQL
insists on). scripts/install.sh installs the distribution's package where the binaries are
missing, so these tests run everywhere CI does; they never skip."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run scripts/install.sh (it installs the "
                           "distribution's postgresql package)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        # Its own folder under the system's temporary folder: pytest's are private to the user
        # running the tests, and the server may run as another.
        folder = Path(tempfile.mkdtemp(prefix="caprouter-pg-"))
        self.folder = folder
        self.data = folder / "data"
        self.sock = folder / "sock"
        self.log = folder / "server.log"
        self.as_user: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in (folder, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run([_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "caprouter", "-E", "UTF8",
                   "--no-instructions"])
        self.port = _free_port()
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=50"
        self._run([_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", "60", "start"])
        self.url = f"postgresql://caprouter@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(self.as_user + cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({out.returncode}): {out.stderr.strip()}\n{tail}")

    def database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://caprouter@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run([_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
