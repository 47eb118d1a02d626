"""A throw-away PostgreSQL cluster for the record tests: initdb + pg_ctl from Debian's postgresql package (found in
/usr/lib/postgresql/*/bin or on PATH), run as an unprivileged user (`nobody` when the tests run as root, as PostgreSQL
refuses to run as root), data and socket in a temporary folder, listening on a free port of 127.0.0.1 only, trust
authentication for the local user `spade`. `.ci/run` installs the package when it is missing."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _binaries() -> Path | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "initdb").is_file() and Path(folder, "pg_ctl").is_file():
            return Path(folder)
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    bin_dir: Path
    folder: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://spade@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout, check=True,
                              cwd=self.folder)

    def start(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"),
                  "-w", "-t", "60", "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off", "start")

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data"), "-w", "-m", "fast", "stop")

    def database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=spade dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://spade@127.0.0.1:{self.port}/{name}"


def start_cluster() -> Cluster | str:
    """A started cluster, or the reason there is none."""
    bin_dir = _binaries()
    if bin_dir is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'spade-ad[record]')"
    folder = Path(tempfile.mkdtemp(prefix="spade-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            return "running as root without runuser: cannot start PostgreSQL as an unprivileged user"
        as_user = [runuser, "-u", "nobody", "--"]
        os.chmod(folder, 0o700)
        os.chown(folder, *_nobody())
    cluster = Cluster(bin_dir, folder, _free_port(), as_user)
    try:
        cluster._run(str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "spade", "--auth=trust",
                     "-E", "UTF8", "--no-sync")
        cluster.start()
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        shutil.rmtree(folder, ignore_errors=True)
        return f"could not start a PostgreSQL cluster: {' '.join(str(detail).split())[:300]}"
    return cluster


def _nobody() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def remove(cluster: Cluster) -> None:
    try:
        cluster.stop()
    except (subprocess.SubprocessError, OSError):
        pass
    shutil.rmtree(cluster.folder, ignore_errors=True)
