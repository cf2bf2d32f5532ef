"""fleetctl serve, retire-replica and demo: the commands that run processes on this machine.

They work on the database, the broker or child processes directly instead of calling a running
control plane's RPCs: starting a control plane (``serve``), taking a stopped replica out of
service for good (``retire-replica``), running a whole fleet here (``demo``). The server and the
demo are imported when their command runs, so every other command starts without them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.controlplane.app.settings import DEFAULT_DEVICE_LISTEN, DEFAULT_LISTEN, Settings
from edgefleet.controlplane.cli.common import DURATION_UNITS, fail
from edgefleet.controlplane.cli.keys import PASSPHRASE_ENV, open_keys
from edgefleet.controlplane.telemetry.retention import RetentionPolicy
from edgefleet.controlplane.trust.keys import default_home

DEFAULTS = Settings(data_dir=Path())  # the defaults serve shows for the Settings it passes on


def parse_duration(text: str, option: str) -> timedelta:
    """'7d', '12h', '30m' or '45s' as a timedelta."""
    number, unit = text[:-1], text[-1:]
    if unit not in DURATION_UNITS or not number.isdigit() or int(number) == 0:
        raise typer.BadParameter(
            f"expected a positive duration like 7d, 12h, 30m or 45s, got {text!r}", param_hint=option
        )
    return timedelta(seconds=int(number) * DURATION_UNITS[unit])


DatabaseOpt = Annotated[
    str | None,
    typer.Option(envvar="EDGEFLEET_DB", help="SQLAlchemy URL (default: SQLite under the data dir)"),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(envvar="EDGEFLEET_DATA_DIR", help="state directory (default: $EDGEFLEET_HOME/controlplane)"),
]


def retention_policy(raw: str, rollups: str) -> RetentionPolicy:
    try:
        return RetentionPolicy(
            raw_for=parse_duration(raw, "--telemetry-retention"),
            rollups_for=parse_duration(rollups, "--rollup-retention"),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rollup-retention") from exc


def serve(
    listen: Annotated[
        str, typer.Option(envvar="EDGEFLEET_LISTEN", help="gRPC listen address HOST:PORT")
    ] = DEFAULT_LISTEN,
    db: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_MQTT",
            help="broker URL, e.g. mqtt://127.0.0.1:1883 (default: embedded broker)",
        ),
    ] = None,
    mqtt_advertise: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_MQTT_ADVERTISE",
            help="broker URL devices are told, e.g. mqtts://broker.example.com:8883 (default: --mqtt "
            "without its credentials)",
        ),
    ] = None,
    keys_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFLEET_KEYS_DIR",
            help="roots, online keys and fleet CA, the same for every replica (default: "
            f"$EDGEFLEET_HOME/keys; passphrase from ${PASSPHRASE_ENV})",
        ),
    ] = None,
    device_listen: Annotated[
        str,
        typer.Option(envvar="EDGEFLEET_DEVICE_LISTEN", help="mutual-TLS address for device calls HOST:PORT"),
    ] = DEFAULT_DEVICE_LISTEN,
    device_advertise: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_DEVICE_ADVERTISE",
            help="device endpoint told to devices (default ':PORT', the host they enrolled via); for "
            "agents that know several replicas, their device addresses IP:PORT,IP:PORT or "
            "dns:///NAME:PORT",
        ),
    ] = None,
    tls_san: Annotated[
        list[str] | None,
        typer.Option(
            envvar="EDGEFLEET_TLS_SAN",
            help="extra DNS name or IP for the server certificate (repeatable; env: space-separated)",
        ),
    ] = None,
    device_cert_validity: Annotated[
        str,
        typer.Option(
            envvar="EDGEFLEET_DEVICE_CERT_VALIDITY",
            help="lifetime of device certificates, e.g. 7d, 12h, 30m; renewed at 2/3",
        ),
    ] = "7d",
    crl_file: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFLEET_CRL_FILE", help="where to keep the device CRL (default: DATA_DIR/tls)"
        ),
    ] = None,
    telemetry_retention: Annotated[
        str,
        typer.Option(
            envvar="EDGEFLEET_TELEMETRY_RETENTION",
            help="keep raw telemetry this long (e.g. 7d), then fold it into hourly rollups",
        ),
    ] = "7d",
    rollup_retention: Annotated[
        str,
        typer.Option(envvar="EDGEFLEET_ROLLUP_RETENTION", help="keep hourly telemetry rollups this long"),
    ] = "365d",
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_METRICS_LISTEN",
            help="serve Prometheus metrics (GET /metrics, no auth) on HOST:PORT (default: off)",
        ),
    ] = None,
    replica_id: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_REPLICA_ID",
            help="this replica's name: unique among control planes sharing a broker and the same "
            "across restarts (its broker session, and the telemetry queued in it, go by "
            "edgefleet-controlplane-REPLICA_ID; default: the host name)",
        ),
    ] = None,
    artifact_chunk_bytes: Annotated[
        int,
        typer.Option(
            envvar="EDGEFLEET_ARTIFACT_CHUNK_BYTES",
            min=4096,
            max=4 * 2**20,
            help="bytes per artifact chunk sent to devices (agents accept messages up to 8 MiB)",
        ),
    ] = DEFAULTS.chunk_size_bytes,
    desired_state_recheck_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_DESIRED_STATE_RECHECK_SECONDS",
            min=1.0,
            help="safety-net re-check of every open desired-state stream against the database",
        ),
    ] = DEFAULTS.desired_state_recheck_seconds,
    metadata_refresh_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_METADATA_REFRESH_SECONDS",
            min=10.0,
            help="how often expiring TUF metadata (timestamp, snapshot, director) is re-signed",
        ),
    ] = DEFAULTS.metadata_refresh_seconds,
    rollout_tick_seconds: Annotated[
        float,
        typer.Option(envvar="EDGEFLEET_ROLLOUT_TICK_SECONDS", min=0.1, help="how often rollouts step"),
    ] = DEFAULTS.rollout_tick_seconds,
    crl_refresh_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_CRL_REFRESH_SECONDS",
            min=0.1,
            help="how often the CRL file is compared with the database and rewritten when another "
            "replica revoked (the bound on how stale this replica's CRL file can be)",
        ),
    ] = DEFAULTS.crl_refresh_seconds,
    db_probe_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_DB_PROBE_SECONDS",
            min=0.1,
            help="how often the database is probed; health is NOT_SERVING while it does not answer",
        ),
    ] = DEFAULTS.db_probe_seconds,
    db_probe_timeout_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_DB_PROBE_TIMEOUT_SECONDS", min=0.1, help="how long one probe may take"
        ),
    ] = DEFAULTS.db_probe_timeout_seconds,
    max_connection_age_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_MAX_CONNECTION_AGE_SECONDS",
            min=1.0,
            help="connections older than this are asked to reconnect (GOAWAY), so devices spread "
            "over replicas added later",
        ),
    ] = DEFAULTS.max_connection_age_seconds,
    max_connection_age_grace_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_MAX_CONNECTION_AGE_GRACE_SECONDS",
            min=0.0,
            help="how long calls on such a connection get to finish",
        ),
    ] = DEFAULTS.max_connection_age_grace_seconds,
    max_connection_idle_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_MAX_CONNECTION_IDLE_SECONDS",
            min=1.0,
            help="connections without a call this long are closed, so idle devices cost nothing "
            "(agents let theirs go after 300 s themselves)",
        ),
    ] = DEFAULTS.max_connection_idle_seconds,
    shutdown_grace_seconds: Annotated[
        float,
        typer.Option(
            envvar="EDGEFLEET_SHUTDOWN_GRACE_SECONDS",
            min=0.0,
            help="on SIGTERM, how long unary calls in flight get (device streams end at once)",
        ),
    ] = DEFAULTS.shutdown_grace_seconds,
    log_level: Annotated[str, typer.Option(envvar="EDGEFLEET_LOG_LEVEL", help="logging level")] = "INFO",
) -> None:
    """Start the control plane: gRPC (TLS) + health service, store, blobs, telemetry ingestion.

    Every option can also come from the environment variable shown beside it (a command-line
    flag wins), so container images and Kubernetes manifests configure replicas without a
    command line of their own.
    """
    from edgefleet.controlplane.app.server import ServeError, serve_forever

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = default_home()
    settings = Settings(
        data_dir=data_dir or home / "controlplane",
        listen=listen,
        db_url=db,
        mqtt_url=mqtt or None,
        mqtt_advertise_url=mqtt_advertise or None,
        keys_dir=keys_dir or home / "keys",
        key_passphrase=open_keys(keys_dir).passphrase,
        device_listen=device_listen,
        device_advertise=device_advertise,
        tls_hostnames=tuple(tls_san or ()),
        device_cert_validity=parse_duration(device_cert_validity, "--device-cert-validity"),
        crl_file=crl_file,
        retention=retention_policy(telemetry_retention, rollup_retention),
        chunk_size_bytes=artifact_chunk_bytes,
        desired_state_recheck_seconds=desired_state_recheck_seconds,
        metadata_refresh_seconds=metadata_refresh_seconds,
        rollout_tick_seconds=rollout_tick_seconds,
        crl_refresh_seconds=crl_refresh_seconds,
        db_probe_seconds=db_probe_seconds,
        db_probe_timeout_seconds=db_probe_timeout_seconds,
        max_connection_age_seconds=max_connection_age_seconds,
        max_connection_age_grace_seconds=max_connection_age_grace_seconds,
        max_connection_idle_seconds=max_connection_idle_seconds,
        shutdown_grace_seconds=shutdown_grace_seconds,
    )
    try:
        asyncio.run(
            serve_forever(settings, metrics_listen=metrics_listen or None, replica_id=replica_id or None)
        )
    except ServeError as exc:
        raise fail(str(exc)) from exc


def retire_replica(
    replica_id: Annotated[str, typer.Argument(help="the --replica-id the retired control plane ran with")],
    mqtt: Annotated[
        str, typer.Option(envvar="EDGEFLEET_MQTT", help="broker URL, e.g. mqtt://user:pass@broker:1883")
    ],
    db: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    quiet: Annotated[
        float, typer.Option(help="seconds without a message that mean its session is drained")
    ] = 5.0,
) -> None:
    """Take a control-plane replica out of service for good: store the telemetry its broker
    session still holds and end the session, so the broker stops keeping a share for it.
    Run it once the replica has stopped, against the same database and broker."""
    from edgefleet.controlplane.store.engine import make_engine
    from edgefleet.controlplane.telemetry.ingest import replica_client_id
    from edgefleet.controlplane.telemetry.retire import RetireError, retire_replica

    try:
        replica_client_id(replica_id)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(data_dir=data_dir or default_home() / "controlplane", db_url=db)
    engine = make_engine(settings.effective_db_url)
    try:
        retired = retire_replica(engine, mqtt, replica_id, quiet_s=quiet)
    except (RetireError, ValueError) as exc:
        raise fail(str(exc)) from exc
    finally:
        engine.dispose()
    typer.echo(
        f"retired {retired.client_id}: stored {retired.stats.rows} records from "
        f"{retired.stats.stored} messages; its session is gone"
    )


def demo(
    keep_running: Annotated[bool, typer.Option(help="leave the fleet up after the demo")] = False,
    agents: Annotated[int, typer.Option(help="how many device agents")] = 3,
    workdir: Annotated[Path | None, typer.Option(help="where to put state (default: a temp dir)")] = None,
) -> None:
    """Run a whole fleet on this machine: control plane, SmolLM2 bundle, agents, chat, telemetry."""
    from edgefleet.controlplane.cli.demo import DemoError, run_demo

    try:
        ok = run_demo(agents=agents, keep_running=keep_running, workdir=workdir)
    except DemoError as exc:
        raise fail(str(exc)) from exc
    sys.exit(0 if ok else 1)
