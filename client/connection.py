"""How a client reaches its servers: target, load balancing, retries, TLS, token.

Several servers share one gRPC channel whose ``round_robin`` policy spreads calls over
every reachable server and skips unreachable ones while it reconnects. grpc's own retry
policy (service config) retries calls that fail UNAVAILABLE (a server restarting, a
connection lost, a replica draining) with exponential backoff, on the next server in the
rotation. One channel rather than a pool of channels: gRPC then knows every backend's
connection state and never sends a call to a server it knows is down.

``host:port`` of a single server resolves through DNS (a name with several addresses
is balanced too); several servers are listed as IP addresses (names are resolved once,
when the client is created). With several servers and TLS, every server's certificate
must be valid for one name: ``TlsConfig.server_name``, else the first host listed.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from bliss.errors import InvalidInputError

SCORER_SERVICE = "bliss.v1.AnomalyScorer"
HEALTH_SERVICE = "grpc.health.v1.Health"
# gRPC never makes more than 5 attempts, whatever the service config says.
MAX_RETRIES = 4
DEFAULT_MAX_MESSAGE_MIB = 64
# Keepalive pings while calls are open, to notice a dead connection behind a load balancer;
# the server accepts them every 10 s or more.
_KEEPALIVE_MS = 30_000
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


class UseClientDefault(enum.Enum):
    """The type of USE_CLIENT_DEFAULT: a call takes the deadline the client was made with."""

    TOKEN = enum.auto()


USE_CLIENT_DEFAULT = UseClientDefault.TOKEN
Timeout = float | None | UseClientDefault


@dataclass(frozen=True)
class TlsConfig:
    """TLS towards the servers; the system's roots unless ``ca_cert`` is given.

    ``client_cert`` and ``client_key`` (PEM) present a client certificate (mTLS).
    ``server_name`` is the name checked against the server certificate, when it differs
    from the address dialled (an IP address, or several servers sharing a certificate).
    """

    ca_cert: Path | bytes | None = None
    client_cert: Path | bytes | None = None
    client_key: Path | bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidInputError("mTLS needs both a client certificate and its key")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca_cert, "CA certificate"),
            private_key=_pem(self.client_key, "client key"),
            certificate_chain=_pem(self.client_cert, "client certificate"),
        )


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_servers(servers: str | Sequence[str]) -> list[str]:
    """``'a:1,b:2'`` or ``['a:1', 'b:2']`` to a list of addresses (never empty)."""
    listed = servers.split(",") if isinstance(servers, str) else list(servers)
    addresses = [address.strip() for address in listed if address.strip()]
    if not addresses:
        raise InvalidInputError("no server address given: use HOST:PORT[,HOST:PORT...]")
    return addresses


def parse_endpoint(address: str) -> Endpoint:
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(
            f"server address {address!r} is not HOST:PORT (IPv6: [ADDRESS]:PORT)"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidInputError(f"write the IPv6 address of {address!r} in brackets: [ADDR]:PORT")
    return Endpoint(host, int(port))


def channel_target(addresses: list[str]) -> tuple[str, str | None]:
    """The gRPC target for the servers, and the TLS name to check when one is implied."""
    if len(addresses) == 1:
        if addresses[0].startswith(_URI_SCHEMES):
            return addresses[0], None
        return f"dns:///{parse_endpoint(addresses[0])}", None
    endpoints = [parse_endpoint(address) for address in addresses]
    resolved = [ip for endpoint in endpoints for ip in _resolve(endpoint)]
    families = {":" in ip.host for ip in resolved}
    if len(families) > 1:
        raise InvalidInputError(
            f"the servers {', '.join(addresses)} mix IPv4 and IPv6 addresses: list one family"
        )
    scheme = "ipv6" if families == {True} else "ipv4"
    # The authority of an ipv4:/ipv6: list is not a host name a certificate could match, so
    # TLS checks every server's certificate against the first host named.
    names = [endpoint.host for endpoint in endpoints if not endpoint.is_ip]
    return f"{scheme}:{','.join(str(ip) for ip in resolved)}", (names or [endpoints[0].host])[0]


def _resolve(endpoint: Endpoint) -> list[Endpoint]:
    if endpoint.is_ip:
        return [endpoint]
    try:
        found = socket.getaddrinfo(
            endpoint.host, endpoint.port, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
    except socket.gaierror as error:
        raise InvalidInputError(f"cannot resolve server {endpoint}: {error}") from error
    addresses = sorted({str(info[4][0]) for info in found})  # AF_INET: (host, port)
    return [Endpoint(address, endpoint.port) for address in addresses]


def service_config(max_retries: int) -> str:
    if not 0 <= max_retries <= MAX_RETRIES:
        raise InvalidInputError(
            f"max_retries must be between 0 and {MAX_RETRIES}, got {max_retries}"
        )
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_retries:
        config["methodConfig"] = [
            {
                "name": [{"service": SCORER_SERVICE}, {"service": HEALTH_SERVICE}],
                "retryPolicy": {
                    "maxAttempts": max_retries + 1,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def channel_options(
    *, max_retries: int, max_message_mib: int, tls_server_name: str | None
) -> list[tuple[str, str | int]]:
    max_bytes = max_message_mib * 2**20
    options: list[tuple[str, str | int]] = [
        ("grpc.service_config", service_config(max_retries)),
        ("grpc.enable_retries", 1 if max_retries else 0),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # Requests bigger than the retry buffer (256 KiB by default) are never retried.
        ("grpc.per_rpc_retry_buffer_size", max_bytes),
        ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
        options.append(("grpc.default_authority", tls_server_name))
    return options


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    if token is None:
        return ()
    if not token.strip():
        raise InvalidInputError("the bearer token is empty")
    return (("authorization", f"Bearer {token.strip()}"),)


def _pem(value: Path | bytes | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read the {what} {value}: {error}") from error


@dataclass(frozen=True)
class ChannelPlan:
    """Everything needed to open the channel; shared by the sync and the async client."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, str | int]]
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def create(
        cls,
        servers: str | Sequence[str],
        *,
        tls: TlsConfig | bool | None,
        token: str | None,
        max_retries: int,
        max_message_mib: int,
    ) -> ChannelPlan:
        target, implied_name = channel_target(parse_servers(servers))
        tls_config = TlsConfig() if tls is True else (tls or None)
        server_name = None
        if tls_config is not None:
            server_name = tls_config.server_name or implied_name
        return cls(
            target=target,
            credentials=tls_config.credentials() if tls_config is not None else None,
            options=channel_options(
                max_retries=max_retries,
                max_message_mib=max_message_mib,
                tls_server_name=server_name,
            ),
            metadata=auth_metadata(token),
        )
