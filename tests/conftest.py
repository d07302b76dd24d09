"""Shared fixtures: store URLs for SQLite and for a scratch PostgreSQL database per test.

PostgreSQL comes from ``BLISS_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). When it is unreachable the
postgres tests are skipped with the reason.

CI sets ``BLISS_REQUIRE_ALL_TESTS=1``: then every skip (PostgreSQL down, WordNet missing,
...) is reported as a failure, so CI cannot pass without running everything.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from bliss.store.database import normalize_url, redact_url

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT_S = 3


@pytest.fixture(scope="session")
def _postgres_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the base database, or skip/fail when it is unreachable."""
    url = normalize_url(os.environ.get("BLISS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        engine.dispose()
        reason = str(error.orig or error).strip().splitlines()[0]
        message = (
            f"PostgreSQL not reachable at {redact_url(url)}: {reason}; "
            "start it or set BLISS_TEST_POSTGRES_URL"
        )
        pytest.skip(message)
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(_postgres_admin: Engine) -> Iterator[str]:
    """URL of a fresh, empty database ``bliss_test_<hex>``, dropped after the test."""
    name = f"bliss_test_{secrets.token_hex(6)}"
    with _postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(_postgres_admin.url).set(database=name).render_as_string(hide_password=False)
    finally:
        with _postgres_admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty store (no schema yet) on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'bliss.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("BLISS_REQUIRE_ALL_TESTS") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but BLISS_REQUIRE_ALL_TESTS=1 forbids skips: {reason}"
