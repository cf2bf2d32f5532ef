"""Every method of DeviceService and OperatorService, driven with arbitrary and malformed
requests over a real gRPC server (real servicers, real SQLite store, real TLS), never ends
with UNKNOWN or INTERNAL: each refusal is typed.

The methods are discovered from the service descriptors, so a new RPC is covered without
touching this file, and the requests are drawn from the message descriptors: random field
values, oversized strings and repeated fields, out-of-range integers and enums, and bytes
that are garbage or nearly right (CSRs with other key algorithms, a signed release whose
sha256 is not hex). The server runs on its own thread and event loop; the test calls it with
blocking stubs, as fleetctl does.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Targets
from tuf.api.serialization.json import JSONSerializer

from bench.sim_fleet import build_sim_bundle
from edgefleet.agent.device.tls import DeviceCertificate, csr_pem, new_key, store_certificate
from edgefleet.controlplane.api.device_service import DeviceService
from edgefleet.controlplane.api.operator_service import OperatorService
from edgefleet.controlplane.api.ratelimit import RateLimit
from edgefleet.controlplane.app.server import SERVER_OPTIONS
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE, bootstrap_admin
from edgefleet.controlplane.store.blobs import BlobStore
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.trust.ca import load_ca
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.controlplane.trust.tls import ServerCertificate, server_hostnames
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

pytestmark = pytest.mark.integration

SERVICES = [
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"],
    operator_pb2.DESCRIPTOR.services_by_name["OperatorService"],
]
METHODS = [m for s in SERVICES for m in s.methods]
CALL_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 0.5  # desired-state and tail streams never end: read briefly, then stop
BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


# -- nearly-right inputs -----------------------------------------------------------------------


def pem_csr(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def csr_with_unknown_key_algorithm() -> bytes:
    """A P-256 CSR whose key algorithm OID is one no library knows (UnsupportedAlgorithm)."""
    der = x509.load_pem_x509_csr(csr_pem(new_key(), "t")).public_bytes(serialization.Encoding.DER)
    ec_public_key = bytes.fromhex("06072A8648CE3D0201")  # 1.2.840.10045.2.1
    return pem_csr(der.replace(ec_public_key, bytes.fromhex("06072A8648CE3D0209")))


def csr_of(key: Any) -> bytes:
    """A CSR for a key the control plane does not take (RSA, Ed25519)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)
    return request.public_bytes(serialization.Encoding.PEM)


def resigned_release(metadata: bytes, signers: list[Signer], edit: Callable[[Targets], None]) -> bytes:
    """Release metadata changed by ``edit`` and signed again by the real release keys: it
    passes the signature check, so what follows the check is what gets exercised."""
    md = Metadata[Targets].from_bytes(metadata)
    edit(md.signed)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes(JSONSerializer(compact=True))


def non_hex_digests(targets: Targets) -> None:
    for target in targets.targets.values():
        target.hashes["sha256"] = "z" * 64


@dataclass(frozen=True)
class Samples:
    """Bytes worth more than random ones: each is nearly what some field expects."""

    release: bytes
    bad_digest_release: bytes
    csrs: list[bytes]

    def blobs(self) -> list[bytes]:
        return [
            self.release,
            self.bad_digest_release,
            *self.csrs,
            b"{}",
            b'{"signed": {"_type": "root"}, "signatures": []}',
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ]


# -- strategies from descriptors ---------------------------------------------------------------

TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(
        [
            "",
            "dev-000000000000",
            "smollm2",
            "hw=cpu",
            "a,b=c",
            "../../etc/passwd",
            "1.root.json",
            "timestamp.json",
            "99999999999999999999.root.json",
            "image",
            "director",
            "admin",
            "inference",
        ]
    ),
    st.integers(200, 40_000).map(lambda n: "x" * n),
)
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [
        v for v in (0, 1, 2, 100, 10_000, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1) if low <= v <= high
    ]
    return st.one_of(st.integers(low, high), st.sampled_from([low, high, *edges]))


def scalar(field: FieldDescriptor, samples: Samples, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return TEXT
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.sampled_from(samples.blobs()),
            st.integers(1_000, 2_000_000).map(lambda n: b"\xff" * n),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32
        )
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 40))
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, samples, depth + 1)
    low, high = INT_RANGES[kind]
    return integers(low, high)


def field_values(field: FieldDescriptor, samples: Samples, depth: int) -> st.SearchStrategy[Any]:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        keys = scalar(entry.fields_by_name["key"], samples, depth)
        values = scalar(entry.fields_by_name["value"], samples, depth)
        many = st.tuples(values, st.integers(30, 40)).map(lambda t: {f"k{i}": t[0] for i in range(t[1])})
        if entry.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING:  # 32 labels of 240 KB
            many = st.one_of(
                many, st.integers(30, 33).map(lambda n: {f"k{i}": "v" * 240_000 for i in range(n)})
            )
        return st.one_of(st.dictionaries(keys, values, max_size=4), many)
    one = scalar(field, samples, depth)
    if field.is_repeated:
        many = st.tuples(one, st.integers(9_990, 10_010)).map(lambda t: [t[0]] * t[1])
        return st.one_of(st.lists(one, max_size=4), many)
    return one


def messages(descriptor: Descriptor, samples: Samples, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional = {f.name: st.deferred(lambda f=f: field_values(f, samples, depth)) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            target = getattr(message, name) if field.is_repeated or field.message_type else None
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(item, Message):
                        target[key].CopyFrom(item)
                    else:
                        target[key] = item
            elif isinstance(value, list):
                if value and isinstance(value[0], Message):
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.extend(value)
            elif isinstance(value, Message):
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


# -- a control plane on its own thread ---------------------------------------------------------


@dataclass
class Served:
    public: str
    device: str
    ca_pem: bytes
    admin_token: str
    device_certificate: DeviceCertificate
    loop: asyncio.AbstractEventLoop
    server: grpc.aio.Server


async def serve(work: Path, keys: KeyDir) -> tuple[grpc.aio.Server, int, int, bytes]:
    """The servicers as the control plane wires them, without its broker and ingestion, and
    with a rate limit no test run reaches (its own tests are in test_rpc_rate_limit.py)."""
    db = Database(make_engine(f"sqlite:///{work / 'cp.db'}"))
    repositories = Repositories(keys)
    await db.run(repositories.bootstrap)
    await db.run(lambda s: bootstrap_admin(s, data_dir=work))
    ca = load_ca(keys.path)
    assert ca is not None
    certificate = ServerCertificate(ca, server_hostnames(["127.0.0.1:0"]))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    port = server.add_secure_port("127.0.0.1:0", certificate.credentials(require_client_certificate=False))
    device_port = server.add_secure_port(
        "127.0.0.1:0", certificate.credentials(require_client_certificate=True)
    )
    notifier, blobs = DesiredStateNotifier(), BlobStore(work / "blobs")
    unlimited = RateLimit(burst=1e9, per_second=1e9)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(
        DeviceService(
            db=db,
            blobs=blobs,
            notifier=notifier,
            chunk_size=1 << 20,
            recheck_seconds=0.2,
            mqtt_url="mqtt://127.0.0.1:1",
            repositories=repositories,
            ca=ca,
            device_cert_validity=timedelta(days=1),
            device_endpoint=f":{device_port}",
            rate_limit=unlimited,
        ),
        server,
    )
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(
        OperatorService(
            db=db, blobs=blobs, notifier=notifier, repositories=repositories, rate_limit=unlimited
        ),
        server,
    )
    await server.start()
    return server, port, device_port, ca.certificate_pem


def admin_metadata(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keys: KeyDir) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started: Future[tuple[grpc.aio.Server, int, int, bytes]] = asyncio.run_coroutine_threadsafe(
        serve(work, keys), loop
    )
    server, port, device_port, ca_pem = started.result(timeout=60)
    token = (work / ADMIN_TOKEN_FILE).read_text().strip()
    public = f"127.0.0.1:{port}"
    with grpc.secure_channel(public, grpc.ssl_channel_credentials(ca_pem)) as channel:
        op = operator_pb2_grpc.OperatorServiceStub(channel)
        bootstrap = op.CreateToken(operator_pb2.CreateTokenRequest(), metadata=admin_metadata(token)).token
        key = new_key()
        enrolled = device_pb2_grpc.DeviceServiceStub(channel).Enroll(
            device_pb2.EnrollRequest(bootstrap_token=bootstrap, hostname="t", csr=csr_pem(key, "t"))
        )
    certificate = store_certificate(work / "device.pem", key, enrolled.certificate)
    yield Served(public, f"127.0.0.1:{device_port}", ca_pem, token, certificate, loop, server)
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, keys: KeyDir) -> Samples:
    bundle = build_sim_bundle(tmp_path_factory.mktemp("sim"), keys.release_signers())
    metadata = bundle.release.metadata
    return Samples(
        release=metadata,
        bad_digest_release=resigned_release(metadata, keys.release_signers(), non_hex_digests),
        csrs=[
            csr_pem(new_key(), "t"),
            csr_with_unknown_key_algorithm(),
            csr_of(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            csr_of(ed25519.Ed25519PrivateKey.generate()),
        ],
    )


@pytest.fixture(scope="module")
def channels(served: Served) -> Iterator[dict[str, grpc.Channel]]:
    credentials = grpc.ssl_channel_credentials(served.ca_pem)
    device = served.device_certificate.grpc_credentials(served.ca_pem)
    options = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 << 20),
    ]
    with (
        grpc.secure_channel(served.public, credentials, options=options) as public,
        grpc.secure_channel(served.device, device, options=options) as mutual,
    ):
        yield {"public": public, "device": mutual}


def status_of(
    channel: grpc.Channel, method: MethodDescriptor, request: Message, metadata: Any
) -> tuple[grpc.StatusCode, str]:
    """The status ``method`` ends with for ``request`` (OK when it answered; a stream that was
    still open when read briefly counts as answered)."""
    try:
        call(channel, method, request, metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def call(channel: grpc.Channel, method: MethodDescriptor, request: Message, metadata: Any) -> None:
    """Calls ``method`` with ``request``; returns normally or raises grpc.RpcError."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = type(request).SerializeToString
    reply_type = message_factory.GetMessageClass(method.output_type)
    if method.client_streaming:
        invoke = channel.stream_unary(path, serialize, reply_type.FromString)
        invoke(iter([request, request]), metadata=metadata, timeout=CALL_TIMEOUT_S)
    elif method.server_streaming:
        stream = channel.unary_stream(path, serialize, reply_type.FromString)(
            request, metadata=metadata, timeout=STREAM_TIMEOUT_S
        )
        try:
            for _, _reply in zip(range(3), stream, strict=False):
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise
        finally:
            stream.cancel()
    else:
        channel.unary_unary(path, serialize, reply_type.FromString)(
            request, metadata=metadata, timeout=CALL_TIMEOUT_S
        )


@pytest.mark.parametrize("method", METHODS, ids=[m.full_name for m in METHODS])
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(data=st.data())
def test_no_call_ends_unknown_or_internal(
    method: MethodDescriptor,
    served: Served,
    samples: Samples,
    channels: dict[str, grpc.Channel],
    data: st.DataObject,
) -> None:
    request = data.draw(messages(method.input_type, samples), label="request")
    on_device_port = method.containing_service.name == "DeviceService" and method.name != "Enroll"
    channel = channels[
        "device" if on_device_port and data.draw(st.booleans(), label="with certificate") else "public"
    ]
    as_admin = data.draw(st.sampled_from([True, True, True, False]), label="admin token")
    metadata = admin_metadata(served.admin_token) if as_admin else None
    code, details = status_of(channel, method, request, metadata)
    assert code not in BUGS, f"{method.full_name} ended {code.name}: {details[:300]}"
    assert len(details) <= 2_048, "error details must be bounded"
