"""The statistics store on SQLite and PostgreSQL: round trips, lifecycle, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from bliss.errors import InvalidInputError, NotFoundError, StoreError
from bliss.settings import StoreSettings
from bliss.store import ClassRecord, Store, VersionRecord, VersionState, build_locks
from bliss.store.build_locks import BuildInProgressError
from bliss.store.database import create_store_engine, normalize_url, redact_url, upgrade_to_head
from bliss.store.leases import LeaseHolder, VersionInUseError
from bliss.store.sessions import utc_now

DIM = 8
N_ENTRIES = 50
N_CLASSES = 3
FINGERPRINT = "f" * 64
CHECKSUM = "c" * 64
# Entries that COPY's text format and SQL quoting must carry unchanged.
AWKWARD_TEXTS = ["tab\there", "new\nline", "back\\slash", "\\N", "quote'\"", "", "ünï 🐕"]


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store.open(store_url, migrate=True) as opened:
        yield opened


def new_version(store: Store, name: str = "cifar10", **overrides: object) -> VersionRecord:
    fields: dict[str, object] = {
        "name": name,
        "model_name": "ViT-B-16",
        "model_weights": "openai",
        "model_checksum": None,
        "embedding_dim": DIM,
        "prompt_template": "This is a photo of a {}",
        "dictionary_source": "imagenet-1k",
        "dictionary_size": N_ENTRIES,
        "faiss_path": "",
        "faiss_kind": "flat",
        "default_k": 10,
        "default_lambda": 0.5,
        "eps": 1e-8,
        "build_fingerprint": FINGERPRINT,
    }
    fields.update(overrides)
    return store.create_version(**fields)


def make_classes(rng: np.random.Generator, n: int = N_CLASSES) -> list[ClassRecord]:
    return [
        ClassRecord(
            position=position,
            name=f"class {position}",
            prompt=f"This is a photo of a class {position}",
            label_embedding=rng.standard_normal(DIM).astype(np.float32),
            label_mean=float(rng.random()) / 3,
            label_std=float(rng.random()) / 7,
            sample_count=int(rng.integers(1, 1000)),
            moment_mean=rng.standard_normal(DIM),
            moment_covariance=rng.standard_normal((DIM, DIM)),
        )
        for position in range(n)
    ]


def make_statistics(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mean = rng.standard_normal((N_CLASSES, N_ENTRIES)) / 3
    std = rng.random((N_CLASSES, N_ENTRIES)) / 7
    # Values a text round trip or a float32 column would change.
    mean[0, :4] = [1 / 3, 5e-324, 1e300, -np.pi]
    std[0, :3] = [0.0, 2.2250738585072014e-308, 1 - 2**-53]
    return mean, std


def entry_texts() -> list[str]:
    return AWKWARD_TEXTS + [f"entry {i}" for i in range(N_ENTRIES - len(AWKWARD_TEXTS))]


def build_ready(store: Store, rng: np.random.Generator, name: str = "cifar10") -> VersionRecord:
    version = new_version(store, name)
    store.write_classes(version.id, make_classes(rng))
    store.write_entries(version.id, iter(entry_texts()))
    mean, std = make_statistics(rng)
    store.write_entry_statistics(version.id, 0, mean, std)
    store.set_faiss_file(version.id, path=f"indexes/{name}.faiss", kind="flat", checksum=CHECKSUM)
    return store.mark_ready(version.id)


def test_round_trip_is_exact(store: Store) -> None:
    rng = np.random.default_rng(1)
    version = new_version(store)
    assert (version.version, version.state, version.label) == (
        1,
        VersionState.BUILDING,
        "cifar10@1",
    )
    assert version.created_at.tzinfo is not None
    assert version.created_at.utcoffset().total_seconds() == 0
    assert version.ready_at is None and version.faiss_checksum is None

    classes = make_classes(rng)
    store.write_classes(version.id, list(reversed(classes)))
    loaded = store.load_classes(version.id)
    assert [c.position for c in loaded] == [0, 1, 2]
    for written, read in zip(classes, loaded, strict=True):
        assert (read.name, read.prompt, read.sample_count) == (
            written.name,
            written.prompt,
            written.sample_count,
        )
        assert (read.label_mean, read.label_std) == (written.label_mean, written.label_std)
        assert read.label_embedding.dtype == np.float32
        assert read.moment_mean.dtype == np.float64 and read.moment_covariance.shape == (DIM, DIM)
        assert np.array_equal(read.label_embedding, written.label_embedding)
        assert np.array_equal(read.moment_mean, written.moment_mean)
        assert np.array_equal(read.moment_covariance, written.moment_covariance)

    texts = entry_texts()
    assert store.write_entries(version.id, iter(texts), batch_size=7) == N_ENTRIES
    assert store.count_entries(version.id) == N_ENTRIES
    assert list(store.iter_entry_texts(version.id, batch_size=7)) == texts
    assert store.entry_texts(version.id, [5, 0, 5, 49, 3]) == [
        texts[5],
        texts[0],
        texts[5],
        texts[49],
        texts[3],
    ]

    mean, std = make_statistics(rng)
    # Two blocks of entries, every class each.
    store.write_entry_statistics(version.id, 0, mean[:, :20], std[:, :20])
    store.write_entry_statistics(version.id, 20, mean[:, 20:], std[:, 20:])
    assert store.count_entry_statistics(version.id) == N_CLASSES * N_ENTRIES
    assert store.count_entry_statistics(version.id, 1) == N_ENTRIES

    asked = np.array([7, 3, 7, 0, 49, 3, 1], dtype=np.int64)
    got_mean, got_std = store.entry_statistics(version.id, asked, N_CLASSES)
    assert got_mean.shape == (N_CLASSES, len(asked))
    assert np.array_equal(got_mean, mean[:, asked]) and np.array_equal(got_std, std[:, asked])
    # Fewer classes than stored: the first n_classes rows only.
    two_mean, _ = store.entry_statistics(version.id, asked, 2)
    assert np.array_equal(two_mean, mean[:2, asked])
    all_mean, all_std = store.all_entry_statistics(version.id, N_CLASSES, N_ENTRIES)
    assert np.array_equal(all_mean, mean) and np.array_equal(all_std, std)

    store.set_faiss_file(version.id, path="indexes/cifar10.faiss", kind="flat", checksum=CHECKSUM)
    ready = store.mark_ready(version.id)
    assert ready.state == VersionState.READY and ready.ready_at >= ready.created_at
    assert (ready.faiss_path, ready.faiss_checksum) == ("indexes/cifar10.faiss", CHECKSUM)
    active = store.activate(version.id)
    assert active.state == VersionState.ACTIVE and active.activated_at is not None
    assert active.activated_at.tzinfo is not None
    assert store.get_version("cifar10") == active
    assert store.get_version("cifar10", 1) == active
    assert store.get_version_by_id(version.id) == active
    assert store.active_versions() == [active]
    assert store.list_versions() == [active]


def test_missing_positions_raise_not_found(store: Store) -> None:
    version = build_ready(store, np.random.default_rng(2))
    with pytest.raises(NotFoundError, match=rf"positions -1, {N_ENTRIES + 5}") as raised:
        store.entry_statistics(version.id, np.array([1, N_ENTRIES + 5, -1, 1]), N_CLASSES)
    assert "cifar10@1" in str(raised.value)
    with pytest.raises(NotFoundError, match=rf"\b{N_ENTRIES}\b"):
        store.entry_texts(version.id, [0, N_ENTRIES])
    with pytest.raises(NotFoundError, match="classes"):
        store.entry_statistics(version.id, np.array([0]), N_CLASSES + 1)
    with pytest.raises(NotFoundError, match="incomplete"):
        store.all_entry_statistics(version.id, N_CLASSES + 1, N_ENTRIES)
    with pytest.raises(NotFoundError, match="no index version with id"):
        store.entry_statistics(version.id + 100, np.array([0]), N_CLASSES)
    with pytest.raises(InvalidInputError, match="integers"):
        store.entry_statistics(version.id, np.array([0.5]), N_CLASSES)
    empty_mean, empty_std = store.entry_statistics(version.id, np.array([], np.int64), N_CLASSES)
    assert empty_mean.shape == empty_std.shape == (N_CLASSES, 0)


def test_activation_retires_the_previous_version(store: Store) -> None:
    rng = np.random.default_rng(3)
    first, second = build_ready(store, rng), build_ready(store, rng)
    other = store.activate(build_ready(store, rng, name="other").id)
    store.activate(first.id)
    store.activate(second.id)
    assert store.get_version_by_id(first.id).state == VersionState.RETIRED
    assert store.get_version("cifar10").id == second.id
    # A retired version can come back; the one it replaces retires.
    store.activate(first.id)
    assert store.get_version("cifar10").id == first.id
    assert store.get_version_by_id(second.id).state == VersionState.RETIRED
    assert store.get_version("other") == other
    assert [v.label for v in store.active_versions()] == ["cifar10@1", "other@1"]
    building = new_version(store)
    with pytest.raises(InvalidInputError, match="only ready or retired"):
        store.activate(building.id)


def test_database_allows_one_active_version_per_name(store: Store, store_url: str) -> None:
    rng = np.random.default_rng(4)
    first, second = build_ready(store, rng), build_ready(store, rng)
    elsewhere = build_ready(store, rng, name="other")
    store.activate(first.id)
    engine = create_store_engine(store_url)
    set_state = text("UPDATE index_versions SET state = :state WHERE id = :id")
    try:
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(set_state, {"state": "active", "id": second.id})
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(set_state, {"state": "bogus", "id": second.id})
        with engine.begin() as connection:  # another name may have its own active version
            connection.execute(set_state, {"state": "active", "id": elsewhere.id})
    finally:
        engine.dispose()
    assert store.get_version_by_id(second.id).state == VersionState.READY
    assert store.get_version("other").id == elsewhere.id


def test_versions_are_numbered_per_name(store: Store) -> None:
    fingerprints = ["a" * 64, "b" * 64, "a" * 64]
    created = [new_version(store, "a", build_fingerprint=fp) for fp in fingerprints]
    created.append(new_version(store, "b"))
    assert [(v.name, v.version) for v in created] == [("a", 1), ("a", 2), ("a", 3), ("b", 1)]
    assert store.list_versions() == sorted(created, key=lambda v: (v.name, v.version))
    assert [v.version for v in store.list_versions("b")] == [1]
    assert store.find_version_by_fingerprint("a", "a" * 64) == created[2]
    assert store.find_version_by_fingerprint("a", "b" * 64) == created[1]
    assert store.find_version_by_fingerprint("a", "c" * 64) is None
    assert store.find_version_by_fingerprint("b", "b" * 64) is None


def test_concurrent_creations_get_distinct_numbers(store: Store) -> None:
    numbers: list[int] = []
    errors: list[BaseException] = []

    def create_three() -> None:
        try:
            numbers.extend(new_version(store, "race").version for _ in range(3))
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=create_three) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(numbers) == list(range(1, 13))


def test_concurrent_activations_leave_one_active_version(store: Store) -> None:
    rng = np.random.default_rng(9)
    versions = [build_ready(store, rng) for _ in range(3)]
    errors: list[BaseException] = []

    def activate_repeatedly(version: VersionRecord) -> None:
        try:
            for _ in range(4):
                store.activate(version.id)
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=activate_repeatedly, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    states = sorted(v.state for v in store.list_versions("cifar10"))
    assert states == [VersionState.ACTIVE, VersionState.RETIRED, VersionState.RETIRED]


def test_mark_ready_refuses_an_incomplete_version(store: Store) -> None:
    rng = np.random.default_rng(5)
    version = new_version(store)
    with pytest.raises(StoreError) as raised:
        store.mark_ready(version.id)
    message = str(raised.value)
    assert "no normal classes" in message
    assert f"0 of {N_ENTRIES} dictionary entries" in message
    assert "no FAISS file" in message

    store.write_classes(version.id, make_classes(rng))
    store.write_entries(version.id, iter(entry_texts()))
    mean, std = make_statistics(rng)
    store.write_entry_statistics(version.id, 0, mean[:, :30], std[:, :30])
    store.set_faiss_file(version.id, path="f.faiss", kind="flat", checksum=CHECKSUM)
    with pytest.raises(StoreError, match=r"incomplete or unknown classes: 0, 1, 2\)") as raised:
        store.mark_ready(version.id)
    assert f"{3 * 30} of {3 * N_ENTRIES} entry statistics" in str(raised.value)
    assert "dictionary entries" not in str(raised.value)
    assert store.get_version_by_id(version.id).state == VersionState.BUILDING

    store.write_entry_statistics(version.id, 30, mean[:, 30:], std[:, 30:])
    assert store.mark_ready(version.id).state == VersionState.READY
    assert store.mark_ready(version.id).state == VersionState.READY  # resuming is harmless
    with pytest.raises(InvalidInputError, match="is ready"):
        store.write_entry_statistics(version.id, 0, mean, std)
    with pytest.raises(InvalidInputError, match="is ready"):
        store.set_faiss_file(version.id, path="g.faiss", kind="flat", checksum=CHECKSUM)


def test_delete_cascades_to_every_table(store: Store, store_url: str) -> None:
    rng = np.random.default_rng(6)
    doomed, kept = build_ready(store, rng), build_ready(store, rng)
    store.delete_version(doomed.id)
    with pytest.raises(NotFoundError):
        store.get_version_by_id(doomed.id)
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as connection:
            for table in ("normal_classes", "dictionary_entries", "entry_statistics"):
                rows = dict(
                    connection.execute(
                        text(f"SELECT version_id, COUNT(*) FROM {table} GROUP BY version_id")
                    ).all()
                )
                assert doomed.id not in rows, table
                assert rows[kept.id] > 0, table
    finally:
        engine.dispose()
    store.activate(kept.id)
    with pytest.raises(InvalidInputError, match="active"):
        store.delete_version(kept.id)
    assert store.count_entry_statistics(kept.id) == N_CLASSES * N_ENTRIES


def test_bad_input_loses_nothing(store: Store) -> None:
    rng = np.random.default_rng(7)
    version = new_version(store)
    store.write_classes(version.id, make_classes(rng))
    store.write_entries(version.id, iter(entry_texts()))
    mean, std = make_statistics(rng)
    store.write_entry_statistics(version.id, 0, mean, std)

    bad_mean = mean.copy()
    bad_mean[1, 9] = np.nan
    with pytest.raises(InvalidInputError, match=r"non-finite.*class 1, entry 9"):
        store.write_entry_statistics(version.id, 0, bad_mean, std)
    with pytest.raises(InvalidInputError, match="shape"):
        store.write_entry_statistics(version.id, 0, mean[:-1], std[:-1])
    with pytest.raises(InvalidInputError, match="outside the dictionary"):
        store.write_entry_statistics(version.id, 10, mean, std)
    with pytest.raises(InvalidInputError, match="negative"):
        store.write_entry_statistics(version.id, 0, mean, -std - 1)
    with pytest.raises(InvalidInputError, match="dictionary_size"):
        store.write_entries(version.id, iter(["only", "three", "entries"]))
    with pytest.raises(InvalidInputError, match="entry 2 is a int"):
        store.write_entries(version.id, iter(["a", "b", 3]))
    with pytest.raises(InvalidInputError, match="shape"):
        wrong_dim = ClassRecord(
            1, "wrong dim", "p", np.zeros(DIM + 1, np.float32), 0.1, 0.1, 1,
            np.zeros(DIM), np.zeros((DIM, DIM)),
        )  # fmt: skip
        store.write_classes(version.id, [make_classes(rng)[0], wrong_dim])
    with pytest.raises(InvalidInputError, match="positions"):
        store.write_classes(version.id, make_classes(rng)[1:])

    assert store.entry_texts(version.id, [0, 49]) == [entry_texts()[0], entry_texts()[49]]
    assert len(store.load_classes(version.id)) == N_CLASSES
    kept_mean, kept_std = store.entry_statistics(version.id, np.arange(N_ENTRIES), N_CLASSES)
    assert np.array_equal(kept_mean, mean) and np.array_equal(kept_std, std)

    # A valid rewrite replaces that block's rows.
    store.write_entry_statistics(version.id, 5, mean[::-1, 5:8], std[::-1, 5:8])
    assert store.count_entry_statistics(version.id) == N_CLASSES * N_ENTRIES
    new_mean, _ = store.entry_statistics(version.id, np.arange(N_ENTRIES), N_CLASSES)
    assert np.array_equal(new_mean[:, 5:8], mean[::-1, 5:8])
    assert np.array_equal(new_mean[:, 8:], mean[:, 8:])
    store.write_classes(version.id, make_classes(rng, 2))
    assert [c.position for c in store.load_classes(version.id)] == [0, 1]


def test_missing_versions_are_explained(store: Store) -> None:
    with pytest.raises(NotFoundError, match="no indexes yet"):
        store.get_version("cifar10")
    build_ready(store, np.random.default_rng(8))
    with pytest.raises(NotFoundError, match=r"has no active version \(it has 1 \(ready\)\)"):
        store.get_version("cifar10")
    with pytest.raises(NotFoundError, match=r"has no version 7; it has 1 \(ready\)"):
        store.get_version("cifar10", 7)
    with pytest.raises(NotFoundError, match="no index named 'cifar100'; the store has: cifar10"):
        store.get_version("cifar100")


def test_unmigrated_store_is_refused(store_url: str) -> None:
    with pytest.raises(StoreError, match="run `bliss db upgrade"):
        Store.open(store_url)
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        assert store.list_versions() == []


def test_default_sqlite_url_creates_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BLISS_STORE_URL", raising=False)
    data_dir = tmp_path / "not" / "yet" / "there"
    url = StoreSettings(data_dir=data_dir).resolved_store_url
    with Store.open(url, migrate=True) as store:
        assert store.url == url
        new_version(store)
    assert (data_dir / "bliss.sqlite3").is_file()


def test_urls_are_normalised_and_redacted() -> None:
    for given in ("postgres://bob:secret@db:5433/bliss", "postgresql://bob:secret@db:5433/bliss"):
        assert normalize_url(given) == "postgresql+psycopg://bob:secret@db:5433/bliss"
    assert normalize_url("sqlite:////data/b.sqlite3") == "sqlite:////data/b.sqlite3"
    assert normalize_url("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert redact_url("postgresql://bob:secret@db/bliss") == "postgresql://bob:***@db/bliss"
    with pytest.raises(StoreError, match="cannot parse store URL"):
        normalize_url("not a url")


# ------------------------------------------------------------ leases and build locks


def test_a_leased_version_is_deleted_only_once_released_or_expired(store: Store) -> None:
    rng = np.random.default_rng(10)
    served, other = build_ready(store, rng), build_ready(store, rng)
    first, second = LeaseHolder("a" * 32, "host-a", 11), LeaseHolder("b" * 32, "host-b", 12)
    assert store.sync_leases(first, {served.id, other.id}, ttl_s=60) == {served.id, other.id}
    assert store.sync_leases(second, {served.id}, ttl_s=60) == {served.id}
    with pytest.raises(
        VersionInUseError, match=r"cifar10@1 is served by 2 running servers \(since"
    ):
        store.delete_version(served.id)
    # A renewal that drops a version releases it; renewing keeps the first acquisition time.
    acquired = store.live_leases(served.id)[0].acquired_at
    assert store.sync_leases(first, {served.id}, ttl_s=60) == {served.id}
    assert store.live_leases(served.id)[0].acquired_at == acquired
    store.delete_version(other.id)
    store.sync_leases(second, set(), ttl_s=60)
    with pytest.raises(VersionInUseError, match="served by 1 running server "):
        store.delete_version(served.id)
    # A server that stops renewing (crashed) no longer protects the version.
    store.sync_leases(first, {served.id}, ttl_s=0)
    assert store.live_leases(served.id) == []
    assert store.prune_expired_leases() == 1
    store.delete_version(served.id)


def test_force_deletes_a_leased_version_and_its_leases(store: Store, store_url: str) -> None:
    version = build_ready(store, np.random.default_rng(11))
    holder = LeaseHolder.this_process()
    store.sync_leases(holder, {version.id}, ttl_s=60)
    store.delete_version(version.id, force=True)
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT COUNT(*) FROM version_leases")) == 0
    finally:
        engine.dispose()
    # The server's next renewal finds the version gone and holds nothing.
    assert store.sync_leases(holder, {version.id}, ttl_s=60) == set()


def test_a_build_lock_admits_one_holder(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_locks, "LOCK_WAIT_POLL_S", 0.05)
    lock = store.try_build_lock("pets", FINGERPRINT)
    assert lock is not None
    assert store.try_build_lock("pets", FINGERPRINT) is None
    holder = store.build_lock_holder("pets", FINGERPRINT)
    assert holder is not None and holder.pid == os.getpid()
    other = store.try_build_lock("pets", CHECKSUM)  # another build runs beside it
    assert other is not None
    other.release()
    with pytest.raises(BuildInProgressError) as raised, store.build_lock("pets", FINGERPRINT):
        pass
    message = str(raised.value)
    assert (
        f"another build of pets with the same inputs and options is running (pid {os.getpid()}"
        in message
    )
    assert "add --wait" in message and "\n" not in message

    entered = threading.Event()

    def wait_for_it() -> None:
        with store.build_lock("pets", FINGERPRINT, wait=True):
            entered.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert not entered.wait(0.5)  # still held
    lock.release()
    waiter.join(timeout=30)
    assert entered.is_set()
    assert store.build_lock_holder("pets", FINGERPRINT) is None


_HOLD_LOCK = """
import sys, time
from bliss.store import Store
store = Store.open(sys.argv[1])
assert store.try_build_lock("pets", "f" * 64) is not None
print("locked", flush=True)
time.sleep(120)
"""


def test_the_build_lock_of_a_killed_process_is_taken_over(store: Store, store_url: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, store_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert store.try_build_lock("pets", FINGERPRINT) is None
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # PostgreSQL drops the advisory lock when it notices the connection closed.
    deadline = time.monotonic() + 30
    while (lock := store.try_build_lock("pets", FINGERPRINT)) is None:
        assert time.monotonic() < deadline, "the dead process's lock was never released"
        time.sleep(0.1)
    assert store.build_lock_holder("pets", FINGERPRINT).pid == os.getpid()
    lock.release()


def test_a_silent_lock_holder_elsewhere_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite only: PostgreSQL's advisory locks die with their session, no heartbeat needed."""
    store_url = f"sqlite:///{tmp_path / 'bliss.sqlite3'}"
    upgrade_to_head(store_url)
    monkeypatch.setattr(build_locks, "LOCK_STALE_S", 60.0)
    engine = create_store_engine(store_url)
    insert = text(
        "INSERT INTO build_locks (name, fingerprint, owner, host, pid, acquired_at, heartbeat_at) "
        "VALUES ('pets', :fp, 'x', 'elsewhere', 1, :at, :at)"
    )
    try:
        with engine.begin() as connection:
            connection.execute(insert, {"fp": FINGERPRINT, "at": utc_now()})
            connection.execute(insert, {"fp": CHECKSUM, "at": utc_now() - timedelta(seconds=61)})
    finally:
        engine.dispose()
    with Store.open(store_url) as store:
        assert store.try_build_lock("pets", FINGERPRINT) is None  # its heartbeat is recent
        lock = store.try_build_lock("pets", CHECKSUM)
        assert lock is not None
        lock.release()
