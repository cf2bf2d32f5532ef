"""A control plane that cannot start stops whatever it had started before it says why: the real
control plane with its embedded broker, real sockets, this process's own listening sockets and
threads looked at before and after."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgefleet.controlplane.app.lifetime import ListenError, ServeError
from edgefleet.controlplane.app.server import start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.trust.keys import KeyDir

pytestmark = pytest.mark.integration

# Threads the parts of a control plane run: the ingestor's writer and paho network thread, the
# embedded broker, the exporter's HTTP server. Not theirs: the idle workers asyncio's default
# executor keeps for the loop's life ("asyncio_N"), and grpc.aio's one completion-queue poller
# for the process, started by the first gRPC object made.
EXECUTOR_WORKER = "asyncio_"
GRPC_POLLER = "(_poll_wrapper)"  # its target, in the name threading gives it


def listening() -> set[tuple[str, int]]:
    """The TCP addresses this process listens on, the gRPC core's sockets included."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if not t.name.startswith(EXECUTOR_WORKER) and not t.name.endswith(GRPC_POLLER)
    }


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on (without SO_REUSEPORT: nobody can share it)."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        yield int(blocker.getsockname()[1])


def settings(tmp_path: Path, keys: KeyDir, *, device_listen: str = "127.0.0.1:0") -> Settings:
    """The embedded broker (no MQTT URL), so the broker is one of the parts that must stop."""
    return Settings(
        data_dir=tmp_path / "cp", listen="127.0.0.1:0", device_listen=device_listen, keys_dir=keys.path
    )


async def test_a_taken_device_port_fails_start_up_with_one_error_and_leaves_nothing_running(
    tmp_path: Path, keys: KeyDir, taken_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgefleet")
    sockets_before, threads_before = listening(), threads()
    device_listen = f"127.0.0.1:{taken_port}"

    with pytest.raises(ListenError) as failed:
        await start_control_plane(
            settings(tmp_path, keys, device_listen=device_listen), metrics_listen="127.0.0.1:0"
        )

    assert failed.value.address == device_listen
    assert listening() == sockets_before, "the operator port, the exporter or the broker still listens"
    assert threads() == threads_before, "the ingestor, the broker or the exporter still runs"
    started = {r.name for r in caplog.records if r.name.startswith("edgefleet.")}
    assert "edgefleet.controlplane.telemetry.broker" in started, "the broker had started before the failure"
    errors = [r for r in caplog.records if r.name.startswith("edgefleet.") and r.levelno >= logging.ERROR]
    assert not errors, "stopping went wrong"


async def test_a_taken_metrics_port_fails_start_up_and_stops_the_broker(
    tmp_path: Path, keys: KeyDir, taken_port: int
) -> None:
    sockets_before, threads_before = listening(), threads()

    with pytest.raises(ServeError) as failed:
        await start_control_plane(settings(tmp_path, keys), metrics_listen=f"127.0.0.1:{taken_port}")

    assert not isinstance(failed.value, ListenError)  # the exporter's port, not a gRPC one
    assert listening() == sockets_before
    assert threads() == threads_before
