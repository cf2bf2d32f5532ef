"""fleet-agent: the device-side command line."""

from __future__ import annotations

import json
import logging
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.agent.config import AgentConfig


class DesiredVia(StrEnum):
    """How the agent learns of desired-state changes (AgentConfig.desired_via)."""

    BROKER = "broker"
    STREAM = "stream"


app = typer.Typer(help="The edgefleet device agent.", no_args_is_help=True)


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise typer.BadParameter(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@app.command()
def run(
    controlplane: Annotated[
        str,
        typer.Option(
            envvar="EDGEFLEET_CONTROLPLANE",
            help="control plane HOST:PORT; several replicas as IP:PORT,IP:PORT or one DNS name that "
            "resolves to all of them (dns:///NAME:PORT): the agent spreads over them and moves on "
            "when one dies",
        ),
    ],
    trust: Annotated[
        Path, typer.Option(help="trust file from `fleetctl keys trust`: TUF roots and the fleet TLS CA")
    ],
    state_dir: Annotated[Path, typer.Option(help="persistent state: identity, models, outbox")],
    token: Annotated[
        str | None, typer.Option(envvar="EDGEFLEET_TOKEN", help="bootstrap token, first start only")
    ] = None,
    listen: Annotated[str, typer.Option(help="local OpenAI-compatible API address")] = "127.0.0.1:8080",
    mqtt: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_MQTT", help="broker URL (default: the one the control plane advertises)"
        ),
    ] = None,
    mqtt_ca: Annotated[
        Path | None, typer.Option(help="CA of an mqtts:// broker (default: the fleet CA in --trust)")
    ] = None,
    heartbeat_seconds: Annotated[float, typer.Option(help="heartbeat interval")] = 15.0,
    telemetry_interval: Annotated[
        float,
        typer.Option(
            min=0.1, help="seconds per inference summary: requests are reported per model and interval"
        ),
    ] = 15.0,
    n_ctx: Annotated[int, typer.Option(help="context window per loaded model")] = 2048,
    threads: Annotated[int | None, typer.Option(help="inference threads (default: all cores)")] = None,
    disk_budget_mb: Annotated[
        int | None, typer.Option(help="disk for model files; the rollback copy goes first")
    ] = None,
    hardware_profile: Annotated[
        Path | None,
        typer.Option(
            help="JSON hardware profile (`fleet-agent hardware --json` format) used instead of detection "
            "when choosing a model variant"
        ),
    ] = None,
    keep_alive: Annotated[
        float | None,
        typer.Option(min=1, help="seconds idle before a model is unloaded (reloaded on the next request)"),
    ] = None,
    memory_budget_mb: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="memory the loaded models may hold together (estimated weights + KV cache); to load "
            "another, the least recently used idle model is unloaded. Default: 3/4 of RAM; 0: no limit",
        ),
    ] = None,
    max_running: Annotated[int, typer.Option(min=1, help="API requests generating at once")] = 1,
    max_waiting: Annotated[int, typer.Option(min=0, help="API requests queued; beyond: HTTP 429")] = 16,
    max_request_kb: Annotated[
        int, typer.Option(min=1, help="API request body size; larger is refused (HTTP 413) before it is read")
    ] = 4096,
    max_prompt_chars: Annotated[
        int,
        typer.Option(
            min=1,
            help="characters of text one API request may send (messages, prompt or embedding inputs "
            "together); more is refused (HTTP 400) before tokenizing",
        ),
    ] = 256 * 1024,
    max_messages: Annotated[
        int, typer.Option(min=1, help="messages per chat request; more: HTTP 400")
    ] = 1024,
    max_embedding_inputs: Annotated[
        int, typer.Option(min=1, max=2048, help="texts per embeddings request; more: HTTP 400")
    ] = 2048,
    request_body_timeout: Annotated[
        float, typer.Option(min=0.1, help="seconds to receive an API request body; slower: HTTP 408")
    ] = 60.0,
    desired_via: Annotated[
        DesiredVia,
        typer.Option(
            help="learn of desired-state changes from notices on the broker connection (polling "
            "slowly while the broker is away; no idle connection to the control plane), or over "
            "a gRPC stream held open"
        ),
    ] = DesiredVia.BROKER,
    desired_poll_seconds: Annotated[
        float, typer.Option(min=5.0, help="with broker notices: ask the control plane this often anyway")
    ] = 900.0,
    desired_poll_without_broker_seconds: Annotated[
        float, typer.Option(min=1.0, help="with broker notices: ask this often while the broker is away")
    ] = 60.0,
    controlplane_idle_seconds: Annotated[
        float,
        typer.Option(
            min=1.0, help="with broker notices: close the control-plane connection after this long unused"
        ),
    ] = 300.0,
    log_level: Annotated[str, typer.Option(help="logging level")] = "INFO",
) -> None:
    """Enroll (once), serve the installed model, and follow the control plane's desired state."""
    from edgefleet.agent.tasks.signals import block_stop_signals

    block_stop_signals()  # before the imports below start any thread (see the function)
    from edgefleet.agent.api.auth import is_loopback, load_or_create_api_key
    from edgefleet.agent.device.channel import ChannelTargetError, channel_target, tls_server_name
    from edgefleet.agent.device.hardware import HardwareProfileError, load_profile_override, usable_cpus
    from edgefleet.agent.device.identity import IdentityError
    from edgefleet.agent.errors import AgentError
    from edgefleet.agent.service import run_agent
    from edgefleet.agent.tasks.control import DeviceRevoked
    from edgefleet.agent.update.state import StateError
    from edgefleet.protos.fleet.release import ReleaseError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = split_listen(listen)
    try:
        channel_target(controlplane)
        tls_server_name(controlplane)
    except ChannelTargetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--controlplane") from exc
    if not trust.is_file():
        raise typer.BadParameter(f"trust file {trust} does not exist", param_hint="--trust")
    if hardware_profile is not None:
        try:
            load_profile_override(hardware_profile)  # a bad file stops here, not at the first update
        except HardwareProfileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--hardware-profile") from exc
    api_key = os.environ.get("EDGEFLEET_API_KEY") or None
    if api_key is None and not is_loopback(host):
        state_dir.mkdir(parents=True, exist_ok=True)
        key_path = state_dir / "api.key"
        api_key = load_or_create_api_key(key_path)
        logging.getLogger(__name__).warning("API on %s requires the key in %s", host, key_path)
    config = AgentConfig(
        controlplane=controlplane,
        state_dir=state_dir,
        trust_path=trust,
        token=token,
        listen_host=host,
        listen_port=port,
        mqtt_url=mqtt or None,
        mqtt_ca_path=mqtt_ca,
        heartbeat_interval_seconds=heartbeat_seconds,
        telemetry_interval_seconds=telemetry_interval,
        n_ctx=n_ctx,
        n_threads=threads or usable_cpus(),
        api_key=api_key,
        keep_alive_seconds=keep_alive,
        memory_budget_bytes=memory_budget(memory_budget_mb),
        max_running_requests=max_running,
        max_waiting_requests=max_waiting,
        max_request_bytes=max_request_kb * 2**10,
        max_prompt_chars=max_prompt_chars,
        max_messages=max_messages,
        max_embedding_inputs=max_embedding_inputs,
        request_body_timeout_seconds=request_body_timeout,
        artifact_budget_bytes=disk_budget_mb * 2**20 if disk_budget_mb else None,
        hardware_profile_path=hardware_profile,
        desired_via=desired_via.value,
        desired_poll_seconds=desired_poll_seconds,
        desired_poll_without_broker_seconds=desired_poll_without_broker_seconds,
        controlplane_idle_seconds=controlplane_idle_seconds,
    )
    try:
        run_agent(config)
    except (AgentError, DeviceRevoked, IdentityError, StateError, ReleaseError, OSError) as exc:
        typer.echo(f"fleet-agent: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc


def memory_budget(megabytes: int | None) -> int | None:
    """The models' memory budget in bytes: the operator's figure, or 3/4 of physical RAM."""
    if megabytes == 0:
        return None
    if megabytes is not None:
        return megabytes * 2**20
    import psutil

    return psutil.virtual_memory().total * 3 // 4


@app.command()
def hardware(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    disk_path: Annotated[Path, typer.Option(help="where free disk is measured")] = Path("."),
) -> None:
    """Print what this device's hardware detection found."""
    from edgefleet.agent.device.hardware import detect_hardware

    profile = detect_hardware(disk_path=disk_path).to_dict()
    if as_json:
        typer.echo(json.dumps(profile, indent=2, sort_keys=True))
    else:
        for key, value in sorted(profile.items()):
            typer.echo(f"{key}: {value}")


if __name__ == "__main__":
    app()
