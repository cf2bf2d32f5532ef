"""fleetctl's side of the operator API: a channel, and streaming a bundle up."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from edgefleet.controlplane.build.bundles import BundleOnDisk, open_bundle
from edgefleet.controlplane.trust.keys import default_home
from edgefleet.controlplane.trust.tls import channel_credentials, resolve_tls_ca
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.v1 import operator_pb2, operator_pb2_grpc

PUSH_CHUNK = 1 << 20
IMAGE_TARGETS_EXPIRY = timedelta(days=90)
# Every device reads the whole image targets (python-tuf's default limit is 5 MB, the agent's
# gRPC messages 8 MiB), and they list every release ever pushed. Chunk lists (~23 KB for a
# 98 MB GGUF) are what could make them grow past that, so a release whose lists would take the
# targets past this budget is published without them: its devices fetch it whole.
IMAGE_TARGETS_CHUNK_BUDGET_BYTES = 2 * 1024 * 1024
log = logging.getLogger(__name__)
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


class PagedRequest(Protocol):
    page_size: int
    page_token: str


class PagedResponse(Protocol):
    next_page_token: str


Req = TypeVar("Req", bound=PagedRequest)


def all_pages(
    call: Callable[[Req], PagedResponse], request: Req, field: str, *, limit: int | None = None
) -> Iterator[Any]:
    """Every entry of a paged list RPC (``field`` of each reply), following next_page_token:
    the control plane answers a page at a time so no reply passes the message limit. With
    ``limit``, stops after that many entries and asks for no more than it still needs."""
    wanted = limit
    while True:
        if wanted is not None:
            request.page_size = min(wanted, 1000)
        response = call(request)
        entries = getattr(response, field)
        yield from (entries if wanted is None else entries[:wanted])
        if wanted is not None:
            wanted -= min(wanted, len(entries))
        if not response.next_page_token or wanted == 0:
            return
        request.page_token = response.next_page_token


def message_copy(message: Message) -> Any:
    """A copy to page with, leaving the caller's request as it was."""
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


TOKEN_ENV = "EDGEFLEET_OPERATOR_TOKEN"
TOKEN_FILE_ENV = "EDGEFLEET_OPERATOR_TOKEN_FILE"


def resolve_operator_token(home: Path | None = None) -> str | None:
    """The operator token: $EDGEFLEET_OPERATOR_TOKEN, the file $EDGEFLEET_OPERATOR_TOKEN_FILE,
    $EDGEFLEET_HOME/operator.token, or the admin token a local `fleetctl serve` wrote."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    home = home or default_home()
    candidates = [Path(p) for p in [os.environ.get(TOKEN_FILE_ENV, "")] if p]
    candidates += [home / "operator.token", home / "controlplane" / "admin.token"]
    for path in candidates:
        try:
            return path.read_text().strip() or None
        except OSError:
            continue
    return None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Adds the operator's token to every call."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)


def operator_stub(
    target: str, token: str | None = None, *, ca_pem: bytes | None = None
) -> tuple[grpc.Channel, operator_pb2_grpc.OperatorServiceStub]:
    """A TLS channel to the control plane verified against the fleet CA (``resolve_tls_ca``
    when not given) and a stub that authenticates as the operator (token resolved if not given).

    Raises TlsConfigError when no CA certificate can be found.
    """
    token = token or resolve_operator_token()
    credentials = channel_credentials(ca_pem or resolve_tls_ca())
    channel = grpc.secure_channel(
        target,
        credentials,
        options=[
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel, operator_pb2_grpc.OperatorServiceStub(channel)


def extend_image_targets(
    current: bytes | None,
    bundle: BundleOnDisk,
    signers: Sequence[Signer],
    *,
    expires_in: timedelta = IMAGE_TARGETS_EXPIRY,
    chunk_budget_bytes: int = IMAGE_TARGETS_CHUNK_BUDGET_BYTES,
) -> bytes:
    """The image repository's next targets: everything it lists plus this release, signed.

    This is where the release keys sign: on the operator's machine, never on the control plane.
    The release's chunk lists go in unless they would take the targets past
    ``chunk_budget_bytes`` (see :data:`IMAGE_TARGETS_CHUNK_BUDGET_BYTES`).
    """
    targets: dict[str, TargetFile] = {}
    version = 1
    if current:
        previous = Metadata[Targets].from_bytes(current).signed
        targets = dict(previous.targets)
        version = previous.version + 1
    expires = datetime.now(UTC) + expires_in
    release_targets = _release_targets(bundle, chunk_lists=True)
    listed = Targets(version=version, expires=expires, targets={**targets, **release_targets})
    size = len(Metadata(listed).to_bytes(JSONSerializer(compact=True)))
    has_lists = any(info.chunks is not None for info in bundle.release.artifacts.values())
    if size > chunk_budget_bytes and has_lists:
        log.warning(
            "%s@%s is published without chunk lists: the image targets would be %d bytes, over %d",
            bundle.release.name,
            bundle.release.version,
            size,
            chunk_budget_bytes,
        )
        release_targets = _release_targets(bundle, chunk_lists=False)
    metadata = Metadata(Targets(version=version, expires=expires, targets={**targets, **release_targets}))
    for signer in signers:
        metadata.sign(signer, append=True)
    return metadata.to_bytes(JSONSerializer(compact=True))


def _release_targets(bundle: BundleOnDisk, *, chunk_lists: bool) -> dict[str, TargetFile]:
    """The image targets of one release's artifacts, with their signed chunk lists or without."""
    rel = bundle.release
    targets: dict[str, TargetFile] = {}
    for variant in rel.manifest.variants:
        info = rel.artifacts[variant.artifact]
        path = uptane.image_target_path(rel.name, rel.version, variant.artifact)
        chunks = info.chunks if chunk_lists else None
        targets[path] = TargetFile(
            info.length,
            {"sha256": info.sha256},
            path,
            unrecognized_fields={
                "custom": uptane.image_target_custom(
                    rel.name, rel.version, variant, chunks, adapter_base=rel.adapter_base
                )
            },
        )
    return targets


def resign_image_targets(
    current: bytes, signers: Sequence[Signer], *, expires_in: timedelta = IMAGE_TARGETS_EXPIRY
) -> bytes:
    """The same targets, next version, signed by ``signers``: after a release-key rotation
    devices must find targets signed by the new keys before the next release."""
    previous = Metadata[Targets].from_bytes(current).signed
    metadata = Metadata(
        Targets(
            version=previous.version + 1,
            expires=datetime.now(UTC) + expires_in,
            targets=dict(previous.targets),
            unrecognized_fields=previous.unrecognized_fields,
        )
    )
    for signer in signers:
        metadata.sign(signer, append=True)
    return metadata.to_bytes(JSONSerializer(compact=True))


def push_requests(
    bundle_dir: Path, image_targets: bytes, *, on_bytes: Callable[[int], None] | None = None
) -> Iterator[operator_pb2.PushBundleRequest]:
    """The header (release metadata and new image targets) first, then every artifact in 1 MiB chunks."""
    bundle = open_bundle(bundle_dir)
    yield operator_pb2.PushBundleRequest(
        header=operator_pb2.PushHeader(release_metadata=bundle.release.metadata, image_targets=image_targets)
    )
    for target in bundle.release.artifacts:
        with bundle.artifact_path(target).open("rb") as f:
            while chunk := f.read(PUSH_CHUNK):
                yield operator_pb2.PushBundleRequest(
                    artifact=operator_pb2.ArtifactData(path=target, data=chunk)
                )
                if on_bytes is not None:
                    on_bytes(len(chunk))


def publish_bundle(
    stub: operator_pb2_grpc.OperatorServiceStub,
    bundle_dir: Path,
    signers: Sequence[Signer],
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> operator_pb2.PushBundleResponse:
    """Extends the image repository with a bundle and uploads both; the one way to publish."""
    current = stub.GetImageTargets(operator_pb2.GetImageTargetsRequest()).targets
    image_targets = extend_image_targets(current or None, open_bundle(bundle_dir), signers)
    response: operator_pb2.PushBundleResponse = stub.PushBundle(
        push_requests(bundle_dir, image_targets, on_bytes=on_bytes)
    )
    return response


def bundle_size(bundle_dir: Path) -> int:
    return sum(a.length for a in open_bundle(bundle_dir).release.artifacts.values())
