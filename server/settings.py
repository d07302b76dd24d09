"""The server's typed settings: flags of ``bliss serve`` first, then ``BLISS_*`` variables.

Every field is a flag of the same name with dashes (``max_batch_items`` is
``--max-batch-items``) and a variable with the ``BLISS_`` prefix in capitals
(``BLISS_MAX_BATCH_ITEMS``); the README lists them all.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import SettingsConfigDict

from bliss.errors import InvalidInputError
from bliss.settings import StoreSettings, add_store_arguments

LogFormat = Literal["text", "json"]


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a name other than localhost
    may resolve anywhere, so it counts as exposed)."""
    name = host.strip().strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class ServerSettings(StoreSettings):
    """Everything ``bliss serve`` can be told; see the README section "Serving"."""

    # inf and NaN are refused for every float setting: none of them means anything then.
    model_config = SettingsConfigDict(**StoreSettings.model_config, allow_inf_nan=False)

    # Loopback unless told otherwise: exposing the service is a decision (with TLS and a
    # token), not a default.
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on: 0.0.0.0 (or '[::]' for IPv6 too) for other "
        "machines, with TLS and a token.",
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    poll_interval_s: float = Field(
        10.0,
        gt=0,
        le=86_400,
        description="Seconds between store polls for newly activated versions.",
    )
    max_batch_items: int = Field(
        4096, ge=1, description="Most items one request may carry (RESOURCE_EXHAUSTED above)."
    )
    encode_batch_size: int = Field(
        64, ge=1, description="Most images encoded together (micro-batches across requests)."
    )
    encode_max_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="Longest wait for more images before a partial micro-batch runs.",
    )
    max_message_mib: int = Field(
        64, ge=1, le=2047, description="Largest request or response message, MiB."
    )
    memory_budget_mib: int = Field(
        2048,
        ge=0,
        description="Hold a version's statistics in memory up to this size, else gather "
        "from the store per batch (0 always gathers from the store).",
    )
    # One by default: FAISS and BLAS already spread one search over every core, and two
    # concurrent searches on 2 cores ran streaming at half the rate of one (benchmarks/).
    scoring_threads: int = Field(
        1, ge=1, description="Batches scored at once (FAISS search, gather, scoring)."
    )
    faiss_threads: int = Field(
        0,
        ge=0,
        description="Threads of one search (FAISS's OpenMP and the BLAS of flat search); "
        "0 leaves the libraries' defaults.",
    )
    malloc_tuning: bool = Field(
        True,
        description="Keep freed scoring buffers mapped (glibc mmap/trim thresholds): up to "
        "2x faster scoring on the pool threads, for up to 128 MiB of retained memory per arena.",
    )
    decode_threads: int = Field(
        default_factory=_default_threads,
        ge=1,
        description="Threads decoding images (default: the CPU count, at most 8).",
    )
    max_k: int = Field(
        1000,
        ge=1,
        description="Most dictionary entries (K) one request may ask for per item "
        "(INVALID_ARGUMENT above); the dictionary size limits K too.",
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest image, in pixels declared by its header (checked before decoding).",
    )
    max_request_pixels: int = Field(
        400_000_000,
        ge=1,
        description="Most image pixels one request may carry, all its images together.",
    )
    max_image_mib: float = Field(20.0, gt=0, le=2047, description="Largest encoded image, MiB.")
    device: str | None = Field(
        None, description="Torch device for image encoding; default cuda when present, else cpu."
    )
    encode_precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32",
        description="Image encoder precision; fp16 and bf16 need a CUDA device (about 2x "
        "the images/s of fp32 on recent GPUs; embeddings differ by ~1e-3).",
    )
    faiss_gpu: bool = Field(False, description="Move FAISS indexes to the GPUs (faiss-gpu).")
    faiss_gpu_float16: bool = Field(
        False,
        description="With --faiss-gpu: FAISS vectors in float16 on the GPUs (half the GPU "
        "memory; near-tied neighbours may swap places).",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve TLS.")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mTLS)."
    )
    auth_token: SecretStr | None = Field(
        None,
        description="Require 'authorization: Bearer TOKEN' on every call but health checks "
        "(a flag shows in the process list: prefer the variable or --auth-token-file).",
    )
    auth_token_file: Path | None = Field(
        None, description="File holding the bearer token (keeps it out of the process list)."
    )
    reflection: bool = Field(
        False,
        description="Serve gRPC server reflection (grpc.reflection.v1 and v1alpha) for tools "
        "such as grpcurl; it needs the token like any other call.",
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics over HTTP.")
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address of the Prometheus endpoint (0.0.0.0 for scrapers on other machines).",
    )
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one."
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry traces of every call (the otel extra), sent over OTLP as "
        "the OTEL_* variables say (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...).",
    )
    log_format: LogFormat = Field("text", description="'text' or 'json' (one object a line).")
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="On SIGTERM, how long to report NOT_SERVING while still serving, so load "
        "balancers stop sending calls before the port closes.",
    )
    grace_period_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="On SIGTERM, how long in-flight calls may take to finish.",
    )
    max_concurrent_rpcs: int | None = Field(
        None, ge=1, description="Calls handled at once; more get RESOURCE_EXHAUSTED."
    )
    # 256 rows against 20,000 entries (D = 512) score in ~70 ms on 2 cores, so a small request
    # waits about that long behind a 4,096-item batch instead of all of its ~1.2 s; smaller
    # turns cost the huge batch more (benchmarks/request_fairness.py).
    micro_batch_items: int = Field(
        256,
        ge=0,
        description="Items of one request scored per turn on the scoring threads: requests "
        "take turns (as their images do for decoding and encoding), so a huge batch cannot "
        "starve small ones; 0 scores each request whole, in arrival order.",
    )
    health_check_interval_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Seconds between health checks: the store is pinged and the served "
        "files compared with what was loaded (size, mtime, inode); a failure turns health "
        "NOT_SERVING and scoring UNAVAILABLE until it clears.",
    )

    @model_validator(mode="after")
    def _tls_files_come_in_pairs(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("give auth_token or auth_token_file, not both")
        return self

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mib * 2**20

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mib * 2**20)

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget_mib * 2**20

    def exposure_warning(self) -> str | None:
        """One line on why this address is unsafe (other machines, no TLS or no token)."""
        if is_loopback(self.host):
            return None
        has_token = self.auth_token is not None or self.auth_token_file is not None
        missing = [
            what
            for what, present in (("TLS", self.tls_cert is not None), ("a token", has_token))
            if not present
        ]
        if not missing:
            return None
        return (
            f"listening on {self.host}, reachable from other machines, without "
            f"{' and without '.join(missing)}: anyone who reaches the port can score and read "
            "index details (and a token without TLS travels in clear text); set --tls-cert/"
            "--tls-key and --auth-token-file (or BLISS_AUTH_TOKEN), or listen on 127.0.0.1"
        )

    def bearer_token(self) -> str | None:
        """The configured token, read from auth_token_file when that is set."""
        if self.auth_token is not None:
            token = self.auth_token.get_secret_value()
        elif self.auth_token_file is not None:
            try:
                token = self.auth_token_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise InvalidInputError(
                    f"cannot read the bearer token file {self.auth_token_file}: {error}"
                ) from error
        else:
            return None
        if not token:
            raise InvalidInputError(
                "the bearer token is empty: set a non-empty --auth-token / BLISS_AUTH_TOKEN, "
                "or drop it to serve without token checks"
            )
        return token


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerSettings field; unset flags defer to BLISS_* variables, then defaults."""
    add_store_arguments(parser)
    fields = ServerSettings.model_fields
    group = parser.add_argument_group("server (each flag also reads BLISS_<FLAG_NAME>)")
    for name, field in fields.items():
        if name in StoreSettings.model_fields:
            continue
        flag = "--" + name.replace("_", "-")
        default = "" if field.default in (None, PydanticUndefined) else f"default {field.default}; "
        help_text = f"{field.description} ({default}env BLISS_{name.upper()})"
        if field.annotation is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(flag, default=None, metavar=name.upper(), help=help_text)
