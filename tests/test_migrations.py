"""Alembic migrations on SQLite and PostgreSQL: up, down, up again; no model drift."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect, text

from bliss.errors import StoreError
from bliss.store import Store, commands
from bliss.store.database import (
    create_store_engine,
    current_revision,
    downgrade,
    head_revision,
    upgrade_to_head,
)
from bliss.store.leases import LeaseHolder
from bliss.store.models import Base

STORE_TABLES = {
    "index_versions",
    "normal_classes",
    "dictionary_entries",
    "entry_statistics",
    "calibration_scores",
    "version_leases",
    "build_locks",
}


def table_names(url: str) -> set[str]:
    engine = create_store_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_diffs(url: str, metadata: MetaData) -> list:
    engine = create_store_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_and_upgrade_again(store_url: str) -> None:
    assert head_revision() == "0005"
    assert current_revision(store_url) is None
    upgrade_to_head(store_url)
    assert current_revision(store_url) == "0005"
    assert table_names(store_url) == STORE_TABLES | {"alembic_version"}
    engine = create_store_engine(store_url)
    try:
        indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("index_versions")}
    finally:
        engine.dispose()
    assert indexes["ux_index_versions_active_name"]["unique"]

    downgrade(store_url, "base")
    assert current_revision(store_url) is None
    assert table_names(store_url) <= {"alembic_version"}

    upgrade_to_head(store_url)
    assert current_revision(store_url) == "0005"
    with Store.open(store_url) as store:
        assert store.list_versions() == []


def test_models_match_the_migrated_schema(store_url: str) -> None:
    upgrade_to_head(store_url)
    assert schema_diffs(store_url, Base.metadata) == []
    # The comparison does see drift: a model column the migrations lack.
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["index_versions"].append_column(Column("extra", Integer, nullable=True))
    assert [diff[0] for diff in schema_diffs(store_url, drifted)] == ["add_column"]


def test_a_store_from_a_newer_bliss_is_refused(store_url: str) -> None:
    upgrade_to_head(store_url)
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="revision 9999, which this bliss does not know"):
        Store.open(store_url)


def test_db_commands(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="bliss")
    commands.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> str:
        args = parser.parse_args(["db", *argv, "--store-url", store_url])
        assert args.handler(args) == 0
        return capsys.readouterr().out

    assert "none (empty: run `bliss db upgrade`" in run("current")
    assert "empty -> 0005" in run("upgrade")
    assert "already at 0005" in run("upgrade")
    assert "0005 (head)" in run("current")
    assert "0005 -> 0001" in run("downgrade", "0001")
    assert "0001 -> 0005" in run("upgrade")
    assert "0005 -> empty (base)" in run("downgrade", "base")
    assert table_names(store_url) <= {"alembic_version"}


def test_downgrading_calibration_keeps_the_versions(store_url: str) -> None:
    """0002 -> 0001 drops only the calibration table; the versions survive a round trip."""
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        created = store.create_version(
            name="kept", model_name="m", model_weights="", model_checksum=None,
            embedding_dim=4, prompt_template="a {label}", dictionary_source="test",
            dictionary_size=1, faiss_path="", faiss_kind="flat", default_k=1,
            default_lambda=0.5, eps=1e-8, build_fingerprint="f" * 64,
        )  # fmt: skip
    downgrade(store_url, "0001")
    assert "calibration_scores" not in table_names(store_url)
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        assert store.get_version_by_id(created.id).name == "kept"
        assert store.load_calibration(created.id) is None


def test_0003_turns_raw_moments_into_centred_ones_and_back(store_url: str) -> None:
    """Classes written under 0002 (sum z, sum zz') read back as mean and covariance."""
    rng = np.random.default_rng(4)
    members = rng.standard_normal((9, 4))
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        created = store.create_version(
            name="old", model_name="m", model_weights="", model_checksum=None,
            embedding_dim=4, prompt_template="a {label}", dictionary_source="test",
            dictionary_size=1, faiss_path="", faiss_kind="flat", default_k=1,
            default_lambda=0.5, eps=1e-8, build_fingerprint="f" * 64,
        )  # fmt: skip
    downgrade(store_url, "0002")
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO normal_classes (version_id, position, name, prompt, "
                    "label_embedding, label_mean, label_std, sample_count, moment_sum, "
                    "moment_outer) VALUES (:v, 0, 'c', 'a c', :e, 0.1, 0.2, 9, :s, :o)"
                ),
                {
                    "v": created.id,
                    "e": np.ones(4, "<f4").tobytes(),
                    "s": members.sum(axis=0).astype("<f8").tobytes(),
                    "o": (members.T @ members).astype("<f8").tobytes(),
                },
            )
    finally:
        engine.dispose()
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        (record,) = store.load_classes(created.id)
        assert store.get_version_by_id(created.id).statistics_mode.value == "table"
    np.testing.assert_allclose(record.moment_mean, members.mean(axis=0), atol=1e-14)
    np.testing.assert_allclose(record.moment_covariance, np.cov(members.T, ddof=0), atol=1e-13)
    downgrade(store_url, "0002")
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        (again,) = store.load_classes(created.id)
    np.testing.assert_allclose(again.moment_covariance, record.moment_covariance, atol=1e-13)


def test_downgrading_leases_and_locks_keeps_the_versions(store_url: str) -> None:
    """0004 -> 0003 drops only the lease and lock tables; leases do not come back."""
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        created = store.create_version(
            name="kept", model_name="m", model_weights="", model_checksum=None,
            embedding_dim=4, prompt_template="a {label}", dictionary_source="test",
            dictionary_size=1, faiss_path="", faiss_kind="flat", default_k=1,
            default_lambda=0.5, eps=1e-8, build_fingerprint="f" * 64,
        )  # fmt: skip
        store.sync_leases(LeaseHolder.this_process(), {created.id}, ttl_s=60)
    downgrade(store_url, "0003")
    assert not {"version_leases", "build_locks"} & table_names(store_url)
    upgrade_to_head(store_url)
    with Store.open(store_url) as store:
        assert store.get_version_by_id(created.id).name == "kept"
        assert store.live_leases(created.id) == []
