"""Helpers of the server and client tests: indexes, servers on free ports, certificates."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bliss.client import BlissClient
from bliss.server.settings import ServerSettings
from tests.cli_runner import run_cli
from tests.synthetic_embeddings import SyntheticWorld
from tests.test_indexer_embeddings import bundle_from


def build_from_embeddings(
    world: SyntheticWorld,
    folder: Path,
    data_dir: Path,
    store_url: str | None = None,
    *,
    name: str = "demo",
    activate: bool = True,
    extra: tuple[str, ...] = (),
) -> None:
    bundle = bundle_from(world, folder)
    args = ["index", "build", "--name", name, "--from-embeddings", bundle, *extra]
    if activate:
        args.append("--activate")
    built = run_cli(*args, data_dir=data_dir, store_url=store_url)
    assert built.code == 0, built.stderr


def activate(name: str, version: int, data_dir: Path, store_url: str | None = None) -> None:
    result = run_cli(
        "index", "activate", name, "--version", str(version), data_dir=data_dir,
        store_url=store_url,
    )  # fmt: skip
    assert result.code == 0, result.stderr


def local_lines(data_dir: Path, store_url: str | None, *args: str | Path) -> list[dict]:
    """``bliss score --local ...`` parsed, one dict per JSON line."""
    result = run_cli("score", "--local", *args, data_dir=data_dir, store_url=store_url)
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def server_settings(data_dir: Path, store_url: str | None = None, **overrides) -> ServerSettings:
    """A loopback server on a free port; tests poll the store themselves unless told."""
    values = {
        "data_dir": data_dir,
        "store_url": store_url,
        "host": "127.0.0.1",
        "port": 0,
        "metrics": False,
        "poll_interval_s": 3600,
        "decode_threads": 2,
        "scoring_threads": 2,
        "grace_period_s": 5,
    }
    values.update(overrides)
    return ServerSettings(**values)


def embedding_items_match(remote: list[dict], local: list[dict], tolerance: float = 1e-6) -> None:
    """Same ids, classes and entries; scores within ``tolerance``."""
    assert [r["id"] for r in remote] == [line["id"] for line in local]
    for r, line in zip(remote, local, strict=True):
        assert r["index_version"] == line["index_version"]
        assert r["nearest_class"] == line["nearest_class"]
        for key in ("score", "internal_class_score", "external_text_score"):
            assert abs(r[key] - line[key]) <= tolerance, (key, r[key], line[key])
        assert [e["text"] for e in r["top_entries"]] == [e["text"] for e in line["top_entries"]]
        np.testing.assert_allclose(
            [e["similarity"] for e in r["top_entries"]],
            [e["similarity"] for e in line["top_entries"]],
            atol=tolerance,
        )
        assert (r.get("class_scores") is None) == (line.get("class_scores") is None)
        if line.get("class_scores") is not None:
            assert list(r["class_scores"]) == list(line["class_scores"])
            np.testing.assert_allclose(
                list(r["class_scores"].values()),
                list(line["class_scores"].values()),
                atol=tolerance,
            )


def wait_for_health(client: BlissClient, service: str, status: str, timeout_s: float = 15) -> None:
    """Poll ``client.health(service)`` until it says ``status`` (a loaded machine may take a
    few health-check intervals)."""
    deadline = time.monotonic() + timeout_s
    while (seen := client.health(service)) != status:
        assert time.monotonic() < deadline, f"health of {service!r} stayed {seen}, not {status}"
        time.sleep(0.05)


_SQLITE_LOCKER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA locking_mode = EXCLUSIVE")
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


@contextmanager
def hold_sqlite_lock(database: Path) -> Iterator[None]:
    """Another process holding an exclusive lock on the SQLite file for the block."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _SQLITE_LOCKER, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        yield
    finally:
        locker.communicate(timeout=30)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def write_tls_files(folder: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _certificate_authority("bliss test CA")
    _, other_ca = _certificate_authority("unrelated CA")
    server_key, server_cert = _issue(
        ca_key, ca_cert, "bliss test server", ExtendedKeyUsageOID.SERVER_AUTH,
        dns_names=("localhost", "bliss.test"), ip_addresses=("127.0.0.1",),
    )  # fmt: skip
    client_key, client_cert = _issue(
        ca_key, ca_cert, "bliss test client", ExtendedKeyUsageOID.CLIENT_AUTH
    )
    files = TlsFiles(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca=folder / "other-ca.pem",
    )
    files.ca.write_bytes(_certificate_pem(ca_cert))
    files.other_ca.write_bytes(_certificate_pem(other_ca))
    files.server_cert.write_bytes(_certificate_pem(server_cert))
    files.server_key.write_bytes(_key_pem(server_key))
    files.client_cert.write_bytes(_certificate_pem(client_cert))
    files.client_key.write_bytes(_key_pem(client_key))
    return files


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)


def _certificate_authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _validity()
    signing_only = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(signing_only, critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    usage: x509.ObjectIdentifier,
    *,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    names = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
