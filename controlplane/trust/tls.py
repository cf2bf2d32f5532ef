"""TLS for the control plane's two gRPC listeners, and for fleetctl's side of them.

Enrollment and operator calls arrive on a server-authenticated TLS port: a device has no
certificate before it enrolls, and operators authenticate with tokens. Every other device
call arrives on a second port that requires a client certificate from the fleet CA. gRPC's
Python server cannot make a client certificate optional on one port, and a required
certificate is what lets the device id come from the handshake rather than from a request.

The server certificate is issued by the fleet CA at start and re-issued, without a restart,
for the first connection after two thirds of its life have passed (gRPC asks for the current
certificate before every handshake).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from edgefleet.controlplane.trust.ca import SERVER_VALIDITY, CertificateAuthority, ca_paths
from edgefleet.controlplane.trust.keys import default_home

CA_ENV = "EDGEFLEET_TLS_CA"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


class TlsConfigError(Exception):
    """fleetctl has no CA certificate to verify the control plane with; the message says where to put one."""


def server_hostnames(listens: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The names the server certificate covers: loopback, this host's names, the listen hosts
    and any the operator adds (``--tls-san``) for load balancers or DNS aliases."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    for listen in listens:
        host = listen.rpartition(":")[0].strip("[]")
        if host not in WILDCARD_HOSTS:
            names.append(host)
    return list(dict.fromkeys([*names, *extra]))


@dataclass
class ServerCertificate:
    """The control plane's current key and certificate, renewed in place when it ages."""

    ca: CertificateAuthority
    hostnames: list[str]
    validity: timedelta = SERVER_VALIDITY

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._renew()

    def _renew(self) -> None:
        self.key_pem, self.cert_pem = self.ca.issue_server(self.hostnames, validity=self.validity)
        self.renew_at = datetime.now(UTC) + self.validity * 2 / 3

    def _configuration(self, *, client_ca: bool) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca.certificate_pem if client_ca else None
        )

    def credentials(self, *, require_client_certificate: bool) -> grpc.ServerCredentials:
        """Credentials for one port; ``require_client_certificate`` makes it the device port."""
        served = self.cert_pem

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            with self._lock:
                if datetime.now(UTC) >= self.renew_at:
                    self._renew()
                if served is self.cert_pem:
                    return None
                served = self.cert_pem
                return self._configuration(client_ca=require_client_certificate)

        return grpc.dynamic_ssl_server_credentials(
            self._configuration(client_ca=require_client_certificate),
            fetch,  # type: ignore[arg-type]  # None means "keep the current one" (grpc docs)
            require_client_authentication=require_client_certificate,
        )


def resolve_tls_ca(home: Path | None = None) -> bytes:
    """The CA fleetctl verifies the control plane with: the file ``$EDGEFLEET_TLS_CA`` names,
    or ``$EDGEFLEET_HOME/keys/tls/ca.pem`` (where ``fleetctl keys init`` puts it)."""
    env = os.environ.get(CA_ENV, "").strip()
    path = Path(env) if env else ca_paths((home or default_home()) / "keys")[1]
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(
            f"cannot read the fleet CA certificate {path}: {exc.strerror}; set {CA_ENV} to a copy "
            "of the control plane's keys/tls/ca.pem"
        ) from exc


def channel_credentials(ca_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca_pem)
