"""fleetctl's side of the operator API: a channel, and streaming a bundle up."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from controlplane.bundles import open_bundle
from protos.fleet.v1 import operator_pb2, operator_pb2_grpc

PUSH_CHUNK = 1 << 20
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "fleet.v1.OperatorService", "method": m}
                for m in ("ListBundles", "ListDevices", "QueryTelemetry")
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def operator_stub(target: str) -> tuple[grpc.Channel, operator_pb2_grpc.OperatorServiceStub]:
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
    return channel, operator_pb2_grpc.OperatorServiceStub(channel)


def push_requests(
    bundle_dir: Path, *, on_bytes: Callable[[int], None] | None = None
) -> Iterator[operator_pb2.PushBundleRequest]:
    """The metadata first, then every artifact in order, in 1 MiB chunks."""
    bundle = open_bundle(bundle_dir)
    yield operator_pb2.PushBundleRequest(release_metadata=bundle.release.metadata)
    for target in bundle.release.artifacts:
        with bundle.artifact_path(target).open("rb") as f:
            while chunk := f.read(PUSH_CHUNK):
                yield operator_pb2.PushBundleRequest(
                    artifact=operator_pb2.ArtifactData(path=target, data=chunk)
                )
                if on_bytes is not None:
                    on_bytes(len(chunk))


def bundle_size(bundle_dir: Path) -> int:
    return sum(a.length for a in open_bundle(bundle_dir).release.artifacts.values())
