"""A version's life after its build: leases of running servers, delete, build locks, gc,
verify and its remedies, and read-only commands that never migrate."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from bliss.embedding_bundle import load_bundle
from bliss.encoders import DEFAULT_PROMPT_TEMPLATE
from bliss.indexer import garbage
from bliss.indexer.build_inputs import BundleInputs
from bliss.indexer.build_options import BuildOptions, BuildOutcome, ModelIdentity
from bliss.indexer.build_run import BuildRun
from bliss.indexer.pipeline import build_version
from bliss.server import version_leases
from bliss.server.runtime import BackgroundServer
from bliss.store import Store, build_locks
from bliss.store.build_locks import BuildInProgressError
from bliss.store.database import current_revision, downgrade, upgrade_to_head
from bliss.version_loader import PRECOMPUTED_MODEL
from tests.cli_runner import run_cli
from tests.serving_fixtures import activate, build_from_embeddings, server_settings
from tests.synthetic_embeddings import synthetic_world
from tests.test_indexer_embeddings import bundle_from
from tests.test_server_hot_swap import ScoringLoad, seen, served


class Killed(BaseException):
    """Not an Exception: nothing in bliss catches it, as nothing survives a SIGKILL."""


def sqlite_url(data: Path) -> str:
    return f"sqlite:///{data / 'bliss.sqlite3'}"


def one_error_line(result) -> str:
    assert result.code == 2, result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.fixture
def versions(tmp_path):
    """demo@1 active and demo@2 ready (other statistics, same dimension), and test vectors."""
    data = tmp_path / "data"
    first = synthetic_world(classes=3, entries=200, per_class=20, tests=8, seed=1)
    second = synthetic_world(classes=3, entries=200, per_class=20, tests=8, seed=2)
    build_from_embeddings(first, tmp_path / "b1", data)
    build_from_embeddings(second, tmp_path / "b2", data, activate=False)
    return data, first.test


# ----------------------------------------------------------------------- leases


def test_a_served_version_is_deleted_only_once_its_server_has_let_go(versions):
    data, vectors = versions
    # The server polls only when told (server.refresh()): the test decides when it swaps.
    with BackgroundServer(server_settings(data)) as server:
        old = served(server, "demo")
        load = ScoringLoad(server.address, vectors)
        try:
            load.wait_until(seen("demo@1"))
            activate("demo", 2, data)
            for _ in range(3):  # not swapped yet: demo@1 still answers every call
                line = one_error_line(run_cli("index", "delete", "demo@1", data_dir=data))
                assert line.startswith("error: demo@1 is served by 1 running server (since ")
                assert "run this again then, or add --force" in line
            server.refresh()  # the swap: demo@1 is let go once its in-flight calls end
            deadline = time.monotonic() + 30
            while (deleted := run_cli("index", "delete", "demo@1", data_dir=data)).code != 0:
                assert "demo@1 is served by 1 running server" in deleted.stderr
                assert time.monotonic() < deadline, "the server never let go of demo@1"
                time.sleep(0.05)
            assert deleted.stdout.strip() == "deleted demo@1"
            assert old.released and served(server, "demo").label == "demo@2"
            load.wait_until(seen("demo@2", 6))
        finally:
            load.stop()
        assert load.failures == []
        assert not list((data / "indexes" / "demo").glob("v1.*"))
        with Store.open(sqlite_url(data)) as store:
            active = store.get_version("demo")
            assert len(store.live_leases(active.id)) == 1
    with Store.open(sqlite_url(data)) as store:  # a graceful shutdown releases its leases
        assert store.live_leases(active.id) == []


def test_leases_are_renewed_every_poll(versions, monkeypatch):
    data, _ = versions
    monkeypatch.setattr(version_leases, "MIN_LEASE_TTL_S", 5.0)
    with (
        BackgroundServer(server_settings(data, poll_interval_s=0.1)) as server,
        Store.open(sqlite_url(data)) as store,
    ):
        version = served(server, "demo").version
        (first,) = store.live_leases(version.id)
        deadline = time.monotonic() + 30
        while (renewed := store.live_leases(version.id)) == [first] or not renewed:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        assert renewed[0].acquired_at == first.acquired_at
        assert renewed[0].expires_at > first.expires_at


def test_force_deletes_a_served_version(versions):
    data, _ = versions
    with BackgroundServer(server_settings(data)) as server:
        activate("demo", 2, data)
        deleted = run_cli("index", "delete", "demo", "--version", "1", "--force", data_dir=data)
        assert deleted.code == 0, deleted.stderr
        assert (
            deleted.stdout.strip() == "deleted demo@1 (still served by 1 running server: --force)"
        )
        server.refresh()  # swaps to demo@2; its renewal finds demo@1 gone and holds nothing
        assert served(server, "demo").label == "demo@2"
    with Store.open(sqlite_url(data)) as store:
        assert [v.label for v in store.list_versions()] == ["demo@2"]


# ------------------------------------------------------------------ build locks


def direct_build(store_url: str, data: Path, folder: Path, **kwargs: object) -> BuildOutcome:
    options = BuildOptions(
        name="demo",
        model=ModelIdentity(PRECOMPUTED_MODEL),
        dictionary_source="test bundle",
        prompt_template=DEFAULT_PROMPT_TEMPLATE,
    )
    with Store.open(store_url) as store:
        return build_version(store, data, BundleInputs(load_bundle(folder)), options, **kwargs)


class Outcome(threading.Thread):
    """A thread that keeps what its target returned or raised."""

    def __init__(self, target, *args, **kwargs) -> None:
        super().__init__(daemon=True)
        self._call = lambda: target(*args, **kwargs)
        self.result: object = None

    def run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as error:  # surfaced by the test
            self.result = error


def test_identical_builds_do_the_work_once(store_url, tmp_path, monkeypatch):
    folder = bundle_from(
        synthetic_world(classes=2, entries=60, per_class=8, tests=1), tmp_path / "b"
    )
    data = tmp_path / "data"
    upgrade_to_head(store_url)
    monkeypatch.setattr(build_locks, "LOCK_WAIT_POLL_S", 0.05)
    started, finish, runs = threading.Event(), threading.Event(), []
    real_run = BuildRun.run

    def held_run(self: BuildRun, version):
        runs.append(version.label)
        started.set()
        assert finish.wait(120)
        return real_run(self, version)

    monkeypatch.setattr(BuildRun, "run", held_run)
    first = Outcome(direct_build, store_url, data, folder)
    first.start()
    assert started.wait(120)
    began = time.monotonic()
    with pytest.raises(BuildInProgressError) as raised:
        direct_build(store_url, data, folder)
    assert time.monotonic() - began < 30  # at once, not after the other build
    message = str(raised.value)
    assert message.startswith("another build of demo with the same inputs and options is running")
    assert "(pid " in message and "add --wait to wait for it" in message
    waiter = Outcome(direct_build, store_url, data, folder, wait=True)
    waiter.start()
    waiter.join(timeout=1)
    assert waiter.is_alive()  # waiting for the first
    finish.set()
    first.join(timeout=300)
    waiter.join(timeout=300)
    assert isinstance(first.result, BuildOutcome) and first.result.built
    assert isinstance(waiter.result, BuildOutcome) and not waiter.result.built
    assert waiter.result.version.id == first.result.version.id
    assert runs == ["demo@1"]  # the work was done once
    with Store.open(store_url) as store:
        assert [v.label for v in store.list_versions()] == ["demo@1"]
        assert store.build_lock_holder("demo", first.result.version.build_fingerprint) is None


def test_a_locked_build_stops_with_one_line(versions):
    data, _ = versions
    with Store.open(sqlite_url(data)) as store:
        fingerprint = store.get_version("demo", 1).build_fingerprint
        lock = store.try_build_lock("demo", fingerprint)
        try:
            bundle = data.parent / "b1"
            line = one_error_line(
                run_cli(
                    "index", "build", "--name", "demo", "--from-embeddings", bundle, data_dir=data
                )
            )
        finally:
            lock.release()
    assert "another build of demo with the same inputs and options is running (pid " in line
    assert "add --wait to wait for it" in line


# ------------------------------------------------------------------------- gc


def kill_before_artifacts(monkeypatch) -> None:
    def killed(*_args: object) -> None:
        raise Killed

    monkeypatch.setattr(BuildRun, "_write_artifacts", killed)


def test_gc_removes_stuck_builds_orphans_and_unreferenced_files(versions, tmp_path, monkeypatch):
    data, _ = versions
    stuck = bundle_from(
        synthetic_world(classes=2, entries=50, per_class=5, tests=1, seed=9), tmp_path / "s"
    )
    kill_before_artifacts(monkeypatch)
    with pytest.raises(Killed):
        run_cli("index", "build", "--name", "stuck", "--from-embeddings", stuck, data_dir=data)
    monkeypatch.undo()
    orphan = data / "builds" / "gone" / "0123456789abcdef"
    orphan.mkdir(parents=True)
    (orphan / "dictionary.npy").write_bytes(b"x" * 1000)
    stray = data / "indexes" / "demo" / "v7.faiss"
    stray.write_bytes(b"left by a delete that was killed")
    (data / "indexes" / "demo" / "v7.artifacts").mkdir()
    with Store.open(sqlite_url(data)) as store:
        (building,) = [v for v in store.list_versions() if v.state.value == "building"]
    assert (data / "indexes" / "stuck" / "v1.faiss").is_file()

    young = run_cli("index", "gc", data_dir=data)  # default: untouched for 24 h
    assert young.code == 0, young.stderr
    assert young.stdout.splitlines() == [
        "removed indexes/demo/v7.artifacts (the store has no version demo@7) (0.0 MiB)",
        "removed indexes/demo/v7.faiss (the store has no version demo@7) (0.0 MiB)",
        "removed 2 items, 0.0 MiB",
    ]
    dry = run_cli("index", "gc", "--older-than", "0", "--dry-run", data_dir=data)
    assert dry.code == 0, dry.stderr
    assert dry.stdout.splitlines()[0].startswith(f"would remove {building.label}, building since ")
    assert dry.stdout.splitlines()[1].startswith(
        "would remove workspace builds/gone/0123456789abcdef"
    )
    assert dry.stdout.splitlines()[-1].startswith("would remove 2 items"), dry.stdout
    assert orphan.is_dir() and (data / "indexes" / "stuck" / "v1.faiss").is_file()

    with Store.open(sqlite_url(data)) as store:  # a build that is running is kept
        lock = store.try_build_lock("stuck", building.build_fingerprint)
        try:
            kept = run_cli("index", "gc", "--older-than", "0s", data_dir=data)
        finally:
            lock.release()
    assert "kept stuck@1: its build is running" in kept.stdout
    with Store.open(sqlite_url(data)) as store:
        assert store.get_version("stuck", 1).state.value == "building"

    removed = run_cli("index", "gc", "--older-than", "0m", data_dir=data)
    assert removed.code == 0, removed.stderr
    with Store.open(sqlite_url(data)) as store:
        assert [v.label for v in store.list_versions()] == ["demo@1", "demo@2"]
    assert not (data / "builds").exists() and not (data / "indexes" / "stuck").exists()
    assert sorted(p.name for p in (data / "indexes" / "demo").iterdir()) == [
        "v1.artifacts", "v1.faiss", "v2.artifacts", "v2.faiss",
    ]  # fmt: skip
    assert (
        run_cli("index", "gc", "--older-than", "0", data_dir=data).stdout == "nothing to remove\n"
    )
    assert run_cli("index", "verify", "demo@2", data_dir=data).code == 0


def kill_removal(monkeypatch, *, before_the_trash: bool) -> None:
    """Kill the process at a removal: before anything moved, or half-way through the trash."""
    if before_the_trash:
        monkeypatch.setattr(garbage, "discard", lambda *_args: (_ for _ in ()).throw(Killed()))
        return
    real_delete = garbage._delete

    def delete_some_then_die(path: Path) -> None:
        victims = sorted(p for p in path.rglob("*") if p.is_file())
        for victim in victims[: len(victims) // 2]:
            real_delete(victim)
        raise Killed

    monkeypatch.setattr(garbage, "_delete", delete_some_then_die)


@pytest.mark.parametrize("before_the_trash", [True, False], ids=["after-commit", "mid-removal"])
def test_gc_finishes_a_delete_killed_after_its_commit(versions, monkeypatch, before_the_trash):
    data, _ = versions
    kill_removal(monkeypatch, before_the_trash=before_the_trash)
    with pytest.raises(Killed):
        run_cli("index", "delete", "demo@2", data_dir=data)
    monkeypatch.undo()
    with Store.open(sqlite_url(data)) as store:
        assert [v.label for v in store.list_versions()] == ["demo@1"]  # committed
    leftovers = list((data / "indexes" / "demo").glob("v2.*")) + list((data / ".trash").glob("*"))
    assert leftovers
    collected = run_cli("index", "gc", data_dir=data)  # no --older-than needed
    assert collected.code == 0, collected.stderr
    assert not list((data / "indexes" / "demo").glob("v2.*"))
    assert not (data / ".trash").exists()
    assert run_cli("index", "verify", "demo@1", data_dir=data).code == 0


def test_gc_finishes_a_workspace_removal_killed_after_activation(tmp_path, monkeypatch):
    data = tmp_path / "data"
    folder = bundle_from(
        synthetic_world(classes=2, entries=60, per_class=8, tests=1), tmp_path / "b"
    )
    kill_removal(monkeypatch, before_the_trash=False)
    with pytest.raises(Killed):
        run_cli(
            "index",
            "build",
            "--name",
            "demo",
            "--from-embeddings",
            folder,
            "--activate",
            data_dir=data,
        )
    monkeypatch.undo()
    with Store.open(sqlite_url(data)) as store:
        assert store.get_version("demo").label == "demo@1"  # activation committed
    assert any((data / ".trash").rglob("*"))
    collected = run_cli("index", "gc", data_dir=data)
    assert "the rest of an interrupted removal" in collected.stdout
    assert not (data / ".trash").exists() and not (data / "builds").exists()


# ----------------------------------------------------------- verify and remedies


def flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_rerunning_the_build_repairs_a_damaged_version(versions, caplog):
    data, _ = versions
    flip_bytes(data / "indexes" / "demo" / "v1.faiss")
    line = one_error_line(run_cli("index", "verify", "demo@1", data_dir=data))
    assert "v1.faiss has sha256" in line and "the file is corrupt; rebuild the version" in line
    # What the message advises: run the build that made it again.
    again = ("index", "build", "--name", "demo", "--from-embeddings", data.parent / "b1")
    with caplog.at_level(logging.WARNING):
        rebuilt = run_cli(*again, "--activate", data_dir=data)
    assert rebuilt.code == 0, rebuilt.stderr
    assert rebuilt.stdout.startswith("built demo@3 (active")
    assert "building a new version to replace demo@1 (" in caplog.text
    assert run_cli("index", "verify", "demo", data_dir=data).stdout.startswith("demo@3 verified")
    assert run_cli("index", "delete", "demo@1", data_dir=data).code == 0
    assert run_cli(*again, data_dir=data).stdout.startswith("unchanged demo@3 (active")
    forced = run_cli(*again, "--rebuild", data_dir=data)
    assert forced.stdout.startswith("built demo@4 (ready")


def test_versions_are_named_name_at_version_everywhere(versions):
    data, _ = versions
    described = run_cli("index", "describe", "demo@2", "--json", data_dir=data)
    assert '"label": "demo@2"' in described.stdout
    assert run_cli("index", "verify", "demo", "--version", "2", data_dir=data).stdout.startswith(
        "demo@2 verified"
    )
    assert "served_by_servers" in run_cli("index", "describe", "demo@1", data_dir=data).stdout
    assert (
        run_cli("index", "activate", "demo@2", data_dir=data).stdout
        == "demo@2 is active (files verified)\n"
    )
    mismatch = one_error_line(
        run_cli("index", "describe", "demo@1", "--version", "2", data_dir=data)
    )
    assert "demo@1 and --version 2 name different versions" in mismatch
    assert "use NAME@VERSION" in one_error_line(run_cli("index", "verify", "demo@x", data_dir=data))
    unnamed = one_error_line(run_cli("index", "delete", "demo", data_dir=data))
    assert "name the version: demo@VERSION (or demo --version VERSION)" in unnamed


# ------------------------------------------------------------ read-only commands


def test_read_only_commands_never_migrate(versions, tmp_path):
    data, _ = versions
    url = sqlite_url(data)
    downgrade(url, "0003")
    for command in (("list",), ("describe", "demo"), ("verify", "demo@1")):
        line = one_error_line(run_cli("index", *command, data_dir=data))
        assert "is at revision 0003" in line, command
        assert f"run `bliss db upgrade --store-url {url}`" in line, command
        assert current_revision(url) == "0003", command
    upgrade_to_head(url)
    assert run_cli("index", "list", data_dir=data).code == 0

    empty = tmp_path / "nothing here"
    listed = run_cli("index", "list", data_dir=empty)
    assert listed.code == 0 and listed.stdout.startswith("no index versions yet")
    assert "has no indexes yet" in one_error_line(
        run_cli("index", "describe", "demo", data_dir=empty)
    )
    assert not empty.exists()  # no store was created
