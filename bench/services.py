"""Real services of our own for benchmarks and tests: a Mosquitto and a PostgreSQL on free
loopback ports under temp dirs, so neither depends on what the machine happens to run."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgefleet.controlplane.trust.keys import KeyDir, init_keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    """A Mosquitto process of the tests' own, which a test may stop and start again."""

    work: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        assert Path(binary).exists(), "mosquitto is not installed: run dev/setup"
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "mosquitto.conf"
        # "user" keeps a root-run broker from dropping to an account that cannot write here.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.work}/\nmax_queued_messages 100000\nuser {getpass.getuser()}\n"
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            assert self.proc.poll() is None, "mosquitto exited at start"
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def start_broker(work: Path) -> Broker:
    broker = Broker(work=work, port=free_port())
    broker.start()
    return broker


@dataclass
class OwnPostgres:
    """A PostgreSQL cluster of the tests' own (initdb + pg_ctl under a temp dir, free port)."""

    data: Path
    port: int
    run_as: list[str]  # initdb refuses root: run the server as the postgres account then

    def start(self) -> None:
        initdb = shutil.which("initdb")
        assert initdb is not None, "PostgreSQL is not installed: run dev/setup"
        self.data.mkdir(parents=True)
        if self.run_as:
            shutil.chown(self.data.parent, "postgres")
            shutil.chown(self.data, "postgres")
        subprocess.run(
            [*self.run_as, initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [
                *self.run_as,
                "pg_ctl",
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.data / "log"),
                "-w",
                "start",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, "pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"], check=False
        )


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server to create throwaway databases on, as a libpq DSN: the machine's own
    at 127.0.0.1:5432 when it answers (or EDGEFLEET_TEST_POSTGRES_ADMIN), else one started here
    (EDGEFLEET_TEST_OWN_POSTGRES=1 forces that)."""
    configured = os.environ.get("EDGEFLEET_TEST_POSTGRES_ADMIN")
    if configured:
        yield configured
        return
    if port_open("127.0.0.1", 5432) and not os.environ.get("EDGEFLEET_TEST_OWN_POSTGRES"):
        yield "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
        return
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    server = OwnPostgres(data=base / "data", port=free_port(), run_as=run_as)
    server.start()
    try:
        yield f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def throwaway_database(admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database on that server (a SQLAlchemy URL), dropped afterwards."""
    import psycopg

    name = f"edgefleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        host, port = admin.info.host, admin.info.port
        try:
            yield f"postgresql+psycopg://{admin.info.user}@{host}:{port}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class ReplicaServices:
    """What a multi-replica bench's control planes share: a work dir, fleet keys, a broker and
    a database."""

    work: Path
    keys: KeyDir
    mqtt_url: str
    db_url: str


@contextlib.contextmanager
def replica_services(prefix: str) -> Iterator[ReplicaServices]:
    """A temp work dir (``prefix``), keys from ``init_keys``, a Mosquitto of our own and a
    throwaway PostgreSQL database, all removed at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, postgres_server() as admin:
        work = Path(tmp)
        keys = init_keys(work / "keys")
        broker = start_broker(work / "mosquitto")
        try:
            with throwaway_database(admin) as db_url:
                yield ReplicaServices(work, keys, broker.url, db_url)
        finally:
            broker.stop()
