"""Health tells the truth: files and store broken while serving turn health NOT_SERVING and
scoring UNAVAILABLE within a few checks, and both come back without a restart; start-up
failures (a SQLite file that is no database, a TLS key of another certificate) are one line."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import text

from bliss.client import BlissClient, ScoringServiceError
from bliss.server.health_monitor import SqliteProbe
from bliss.server.runtime import BackgroundServer
from bliss.store import Store
from tests.serving_fixtures import (
    build_from_embeddings,
    hold_sqlite_lock,
    server_settings,
    wait_for_health,
    write_tls_files,
)
from tests.synthetic_embeddings import synthetic_world

CHECK_S = 0.1
BLISS = str(Path(sys.executable).with_name("bliss"))


@pytest.fixture(scope="module")
def world():
    return synthetic_world(classes=3, entries=80, per_class=10, tests=5, seed=31)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    build_from_embeddings(world, root / "bundle", root / "data")
    return root / "data"


@pytest.fixture
def data(built, tmp_path):
    """A copy of the built data dir per test: the tests break its files."""
    return Path(shutil.copytree(built, tmp_path / "data"))


def version_files(data: Path) -> tuple[Path, Path]:
    """demo@1's FAISS file and its artifacts folder."""
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        faiss_file = data / store.get_version("demo", 1).faiss_path
    return faiss_file, faiss_file.with_suffix(".artifacts")


def refusal(client: BlissClient, world) -> ScoringServiceError:
    with pytest.raises(ScoringServiceError) as caught:
        client.score(embeddings=world.test)
    return caught.value


def scores(client: BlissClient, world) -> list[float]:
    return [item.score for item in client.score(embeddings=world.test)]


def served_object(server: BackgroundServer):
    async def resolve():
        return server.server.registry.served_indexes()[0]

    return server.call(resolve())


def rewrite(path: Path, content: bytes) -> None:
    """Put ``content`` at ``path`` as a new file (another inode), as a copy or restore does."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def faults(data: Path) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Ways to break demo@1's files, each with the way to undo it."""
    faiss_file, artifacts = version_files(data)
    offsets = artifacts / "entry_text_offsets.npy"
    original_faiss, original_offsets = faiss_file.read_bytes(), offsets.read_bytes()
    hidden = faiss_file.with_name("hidden.faiss")
    noise = np.random.default_rng(0).bytes(len(original_faiss))
    return {
        # Renamed away and back: the very file returns, no reload needed.
        "removed": (lambda: faiss_file.rename(hidden), lambda: hidden.rename(faiss_file)),
        # Cut in place, then written back in place: verified and reloaded.
        "truncated": (
            lambda: os.truncate(offsets, len(original_offsets) // 2),
            lambda: offsets.write_bytes(original_offsets),
        ),
        # Other bytes under the name (fail verification), then the original copied back.
        "replaced": (
            lambda: rewrite(faiss_file, noise),
            lambda: rewrite(faiss_file, original_faiss),
        ),
    }


@pytest.mark.parametrize("fault", ["removed", "truncated", "replaced"])
def test_broken_index_files_turn_health_not_serving_until_restored(world, data, fault, caplog):
    damage, repair = faults(data)[fault]
    settings = server_settings(data, health_check_interval_s=CHECK_S)
    with (
        caplog.at_level(logging.INFO, logger="bliss.server.health_monitor"),
        BackgroundServer(settings) as server,
        BlissClient(server.address, max_retries=0, timeout_s=20) as client,
    ):
        before = scores(client, world)
        loaded = served_object(server)
        damage()
        wait_for_health(client, "demo", "NOT_SERVING")
        assert client.health() == "NOT_SERVING"  # its only index
        error = refusal(client, world)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.details.startswith("index 'demo' is not serving on this server: the files ")
        assert "\n" not in error.details and "/" not in error.details  # no paths
        if fault == "replaced":
            # The other bytes fail verification: still refused after several more checks.
            deadline = time.monotonic() + 10
            while not any("do not verify" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the replaced file was never verified"
                time.sleep(0.05)
            assert refusal(client, world).code == grpc.StatusCode.UNAVAILABLE
        repair()
        wait_for_health(client, "demo", "SERVING")
        assert client.health() == "SERVING"
        assert scores(client, world) == before
        # A file back as it was needs no reload; one rewritten is verified and reloaded.
        assert (served_object(server) is loaded) == (fault == "removed")
    logged = [r.getMessage() for r in caplog.records]
    (broken,) = [m for m in logged if "is NOT_SERVING, its files changed" in m]
    assert str(data) in broken  # the detail, with paths, is for the operator
    assert any("are back as loaded; SERVING" in m or "verify; loading it" in m for m in logged)


def corrupt_header(database: Path) -> Callable[[], None]:
    """Overwrite SQLite's file header in place; returns how to put it back."""
    with open(database, "r+b") as stream:
        header = stream.read(100)
        stream.seek(0)
        stream.write(b"this is not a SQLite database".ljust(100, b"!"))

    def restore() -> None:
        with open(database, "r+b") as stream:
            stream.write(header)

    return restore


@pytest.mark.parametrize("fault", ["removed", "corrupted"])
def test_an_unusable_sqlite_store_turns_health_not_serving_until_it_is_back(
    world, data, fault, caplog
):
    database = data / "bliss.sqlite3"
    hidden = data / "hidden.sqlite3"
    settings = server_settings(data, health_check_interval_s=CHECK_S)
    with (
        caplog.at_level(logging.INFO),
        BackgroundServer(settings) as server,
        BlissClient(server.address, max_retries=0, timeout_s=20) as client,
    ):
        before = scores(client, world)
        if fault == "removed":
            database.rename(hidden)
            repair: Callable[[], None] = lambda: hidden.rename(database)  # noqa: E731
        else:
            repair = corrupt_header(database)
        wait_for_health(client, "", "NOT_SERVING")
        assert client.health("demo") == "NOT_SERVING"
        error = refusal(client, world)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.details.startswith("the statistics store is unusable from this server")
        assert "/" not in error.details and "\n" not in error.details
        server.refresh()  # a poll meanwhile neither fails nor creates an empty store file
        assert database.exists() == (fault == "corrupted")
        repair()
        wait_for_health(client, "", "SERVING")
        assert client.health("demo") == "SERVING"
        assert scores(client, world) == before
    messages = [r.getMessage() for r in caplog.records]
    (down,) = [m for m in messages if m.startswith("health: NOT_SERVING, the SQLite store")]
    assert ("is gone" if fault == "removed" else "file is not a database") in down
    assert "health: the store answers again; SERVING" in messages
    # One line each, and no SQLAlchemy traceback anywhere.
    assert all("\n" not in m for m in messages)
    assert not [r for r in caplog.records if r.exc_info]


def test_a_locked_sqlite_store_is_reported_within_the_busy_timeout(data):
    database = data / "bliss.sqlite3"
    probe = SqliteProbe(database)
    assert probe.check() is None
    with hold_sqlite_lock(database):
        started = time.monotonic()
        problem = probe.check()
        assert time.monotonic() - started < 3
    assert problem is not None and problem.endswith("is unusable: database is locked")
    assert probe.check() is None


@pytest.mark.postgres
def test_an_unreachable_postgres_store_turns_health_not_serving_until_it_is_back(
    world, tmp_path, postgres_url, _postgres_admin
):
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data, postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    settings = server_settings(data, postgres_url, health_check_interval_s=CHECK_S)
    with (
        BackgroundServer(settings) as server,
        BlissClient(server.address, max_retries=0, timeout_s=20) as client,
        _postgres_admin.connect() as admin,
    ):
        before = scores(client, world)
        # The database refuses connections and its open ones (the server's pool) are cut.
        admin.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        admin.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
            {"d": database},
        )
        wait_for_health(client, "", "NOT_SERVING")
        assert client.health("demo") == "NOT_SERVING"
        assert refusal(client, world).code == grpc.StatusCode.UNAVAILABLE
        admin.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        wait_for_health(client, "", "SERVING")
        assert scores(client, world) == before


def serve_and_fail(*args: str | Path) -> str:
    """``bliss serve ...`` that must fail at start-up: its stderr."""
    result = subprocess.run(
        [BLISS, "serve", "--port", "0", "--no-metrics", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_a_malformed_sqlite_store_at_start_up_is_one_line(tmp_path):
    database = tmp_path / "bliss.sqlite3"
    database.write_bytes(np.random.default_rng(1).bytes(8192))
    stderr = serve_and_fail("--data-dir", tmp_path)
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: the store at sqlite:///{database} failed: file is not a database; check that "
        "the database is running, reachable, not locked and not corrupt (restore a damaged "
        "SQLite file from a backup), and that --store-url / BLISS_STORE_URL is right"
    )


def test_a_tls_key_of_another_certificate_is_named_at_start_up(tmp_path):
    tls = write_tls_files(tmp_path / "tls")
    stderr = serve_and_fail(
        "--data-dir", tmp_path, "--tls-cert", tls.server_cert, "--tls-key", tls.client_key
    )
    assert stderr.splitlines() == [
        f"error: the TLS key {tls.client_key} does not belong to the certificate "
        f"{tls.server_cert}: give that certificate's key (--tls-key / BLISS_TLS_KEY)"
    ]
    assert "port" not in stderr
    stderr = serve_and_fail(
        "--data-dir", tmp_path, "--tls-cert", tls.client_key, "--tls-key", tls.server_key
    )
    assert stderr.startswith(f"error: the TLS certificate {tls.client_key} holds no certificate")
