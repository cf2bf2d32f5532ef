"""What one idle device connection costs a grpc.aio server, with and without TLS.

    python -m bench.connection_memory [--quick] [--connections N]

A bare grpc.aio server with the control plane's own channel options (SERVER_OPTIONS) and one
server-streaming method that answers once and then holds the stream open, as the desired-state
stream does. Client processes (500 connections each, so the clients are never what is
measured) each open their connections, start one stream per connection and read its first
message. The server's RSS growth over N, in KiB, is the cost of an idle device: measured for
plaintext HTTP/2 (the baseline) and for mutual TLS with ECDSA P-256 certificates (what devices
use), each on a fresh server process. ``ratio`` is TLS over plaintext; the target is the fan-out
issue's 64 KiB per connected device, judged on the TLS figure.

Why it exists: it separates what gRPC's TLS stack holds per connection (its BIO pair and frame
protector buffers, the TLS session, the peer's certificate), none of which a channel argument
sets, from what the control plane's own code adds (bench.fanout measures the whole).
Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event

import grpc
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.controlplane.app.server import SERVER_OPTIONS

TARGET_KIB = 64.0
PER_CLIENT_PROCESS = 500
SETTLE_S = 3.0
METHOD = "/edgefleet.bench.Hold/Watch"


@dataclass(frozen=True)
class Pki:
    """PEM bytes: the CA, the server's key and certificate (localhost), a client's."""

    ca: bytes
    server: tuple[bytes, bytes]
    client: tuple[bytes, bytes]


def make_pki() -> Pki:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return pem_key, cert.public_bytes(serialization.Encoding.PEM)

    return Pki(ca.public_bytes(serialization.Encoding.PEM), leaf("localhost"), leaf("device-0"))


async def _hold(port: int, count: int, pki: Pki | None, ready: Event) -> None:
    if pki is None:
        channels = [grpc.aio.insecure_channel(f"localhost:{port}") for _ in range(count)]
    else:
        credentials = grpc.ssl_channel_credentials(pki.ca, *pki.client)
        # A subchannel pool of its own per channel: one connection per simulated device.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.secure_channel(f"localhost:{port}", credentials, options) for _ in range(count)]
    calls: list[grpc.aio.UnaryStreamCall[bytes, bytes]] = [
        channel.unary_stream(METHOD)(b"")  # type: ignore[arg-type]  # untyped generic method
        for channel in channels
    ]
    for call in calls:
        await call.read()
    ready.set()
    await asyncio.Event().wait()


def hold_connections(port: int, count: int, pki: Pki | None, ready: Event) -> None:
    """A client process: ``count`` connections, a stream each, first message read, then idle."""
    asyncio.run(_hold(port, count, pki, ready))


def serve_and_measure(connections: int, tls: bool, result: multiprocessing.SimpleQueue[float]) -> None:
    """A server process: puts its RSS growth per connection (KiB) into ``result``."""
    asyncio.run(_serve_and_measure(connections, tls, result))


async def _serve_and_measure(connections: int, tls: bool, result: multiprocessing.SimpleQueue[float]) -> None:
    pki = make_pki() if tls else None

    async def watch(_request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> object:
        yield b"state"
        await asyncio.Event().wait()

    service, method = METHOD.strip("/").split("/")
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        method: grpc.unary_stream_rpc_method_handler(watch)
    }
    handler = grpc.method_handlers_generic_handler(service, handlers)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    if pki is None:
        port = server.add_insecure_port("localhost:0")
    else:
        credentials = grpc.ssl_server_credentials([pki.server], pki.ca, require_client_auth=True)
        port = server.add_secure_port("localhost:0", credentials)
    await server.start()
    await asyncio.sleep(SETTLE_S)
    before = psutil.Process().memory_info().rss
    context = multiprocessing.get_context("spawn")
    clients = []
    try:
        for first in range(0, connections, PER_CLIENT_PROCESS):
            ready = context.Event()
            count = min(PER_CLIENT_PROCESS, connections - first)
            process = context.Process(target=hold_connections, args=(port, count, pki, ready), daemon=True)
            process.start()
            clients.append((process, ready))
        for process, ready in clients:
            while not ready.is_set():
                if not process.is_alive():
                    raise RuntimeError(f"a client process exited with {process.exitcode}")
                await asyncio.sleep(0.1)
        await asyncio.sleep(SETTLE_S)
        result.put((psutil.Process().memory_info().rss - before) / connections / 1024)
    finally:
        for process, _ready in clients:
            process.kill()
        await server.stop(0)


def measure(connections: int, *, tls: bool) -> float:
    context = multiprocessing.get_context("spawn")
    result: multiprocessing.SimpleQueue[float] = context.SimpleQueue()
    server = context.Process(target=serve_and_measure, args=(connections, tls, result))
    server.start()
    server.join()
    if server.exitcode != 0 or result.empty():
        raise RuntimeError(f"the {'TLS' if tls else 'plaintext'} server exited with {server.exitcode}")
    return float(result.get())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.connection_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="500 connections instead of 2,000")
    parser.add_argument("--connections", type=int, help="connections per server (default 2000)")
    args = parser.parse_args(argv)
    connections = args.connections or (500 if args.quick else 2000)
    if connections <= 0:
        parser.error("--connections must be positive")
    plain = measure(connections, tls=False)
    print(f"plaintext: {plain:.1f} KiB per connection", file=sys.stderr, flush=True)
    tls = measure(connections, tls=True)
    print(f"mutual TLS: {tls:.1f} KiB per connection", file=sys.stderr, flush=True)
    line = {
        "benchmark": "connection_memory",
        "figures": {"connections": connections, "tls_kib_per_connection": round(tls, 1)},
        "baseline": {"plaintext_kib_per_connection": round(plain, 1)},
        "ratio": round(tls / plain, 3) if plain > 0 else None,
        "target": TARGET_KIB,
        "met": tls <= TARGET_KIB,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
