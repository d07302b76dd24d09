"""Connecting to the store and keeping its schema at the migrations' head.

URLs are normalised so that ``postgresql://`` means psycopg 3. SQLite connections get
foreign keys, WAL and a busy timeout, and real transactions: SQLAlchemy emits ``BEGIN``
itself (the ``sqlite3`` module's legacy mode would run reads outside the transaction).
Writers ask for ``BEGIN IMMEDIATE`` through :data:`WRITE_OPTIONS`, so concurrent
writers queue on the busy timeout instead of failing when they upgrade a read lock.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from bliss.errors import StoreError

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Execution option read by the SQLite "begin" hook: writers take the write lock up front.
SQLITE_BEGIN_OPTION = "bliss_sqlite_begin"
WRITE_OPTIONS = {SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"}
# Arbitrary constant: serialises concurrent `upgrade` runs on one PostgreSQL database.
_MIGRATION_LOCK_KEY = 0x626C697373  # "bliss"


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL to connect with: ``postgresql://``/``postgres://`` use psycopg 3."""
    parsed = _parse_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages and logs."""
    return _parse_url(url).render_as_string(hide_password=True)


def create_store_engine(url: str) -> Engine:
    """An engine for the store at ``url``; a SQLite file's folder is created if missing."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(parsed)
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    try:
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (ArgumentError, ImportError) as error:
        raise StoreError(
            f"cannot use store URL {redact_url(url)}: {error}; "
            "use sqlite:///PATH or postgresql://USER@HOST/DB"
        ) from error


def migrations_folder() -> Path:
    """The folder of the installed ``bliss.migrations`` package (Alembic's script location)."""
    return Path(str(importlib.resources.files("bliss.migrations")))


def head_revision() -> str:
    """The newest schema revision this bliss knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no Alembic revisions found in {migrations_folder()}; reinstall bliss")
    return head


def current_revision(url: str) -> str | None:
    """The schema revision of the store at ``url`` (None: no schema yet)."""
    engine = create_store_engine(url)
    try:
        with _connect(engine) as connection:
            return _revision_of(connection)
    finally:
        engine.dispose()


def existing_revision(url: str) -> str | None:
    """The schema revision of the store at ``url``; None when there is no store or no schema.

    Unlike :func:`current_revision`, never creates a SQLite file that is not there.
    """
    parsed = make_url(normalize_url(url))
    path = parsed.database or ":memory:"
    plain_file = not path.startswith(("file:", ":memory:"))
    if parsed.get_backend_name() == "sqlite" and plain_file and not Path(path).is_file():
        return None
    return current_revision(url)


def upgrade_to_head(url: str) -> None:
    """Migrate the store at ``url`` to the newest schema, in one transaction."""
    _run_on_url(url, lambda config: command.upgrade(config, "head"))


def downgrade(url: str, revision: str) -> None:
    """Migrate the store at ``url`` down to ``revision`` (``base``: drop everything)."""
    _run_on_url(url, lambda config: command.downgrade(config, revision))


def prepare_schema(engine: Engine, *, migrate: bool) -> None:
    """Upgrade to head when ``migrate``; then require the store to be exactly at head."""
    if migrate:
        _run_alembic(engine, lambda config: command.upgrade(config, "head"))
    head = head_revision()
    with _connect(engine) as connection:
        current = _revision_of(connection)
    if current == head:
        return
    where = display_url(engine)
    # With a password the URL shown is redacted: the command names the flag instead.
    url_flag = "--store-url URL" if engine.url.password else f"--store-url {where}"
    if current is None:
        raise StoreError(
            f"store at {where} has no bliss schema (empty database), this bliss needs "
            f"revision {head}: run `bliss db upgrade {url_flag}` first"
        )
    if current not in _known_revisions():
        raise StoreError(
            f"store at {where} is at revision {current}, which this bliss does not know "
            f"(its newest is {head}): the store was migrated by a newer bliss; upgrade bliss"
        )
    raise StoreError(
        f"store at {where} is at revision {current}, this bliss needs {head}: "
        f"run `bliss db upgrade {url_flag}` (back up the database first)"
    )


def display_url(engine: Engine) -> str:
    """The engine's URL with its password replaced by ``***``."""
    return engine.url.render_as_string(hide_password=True)


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as error:
        raise StoreError(
            f"cannot parse store URL {url!r}: use sqlite:///PATH or "
            "postgresql://USER@HOST/DB (flag --store-url or env BLISS_STORE_URL)"
        ) from error


def _create_sqlite_engine(url: URL) -> Engine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection, _record) -> None:  # noqa: ANN001 (DBAPI objects)
        # Take transaction control away from the sqlite3 module (see the module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_sqlite(connection: Connection) -> None:
        begin = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "BEGIN")
        connection.exec_driver_sql(begin)

    return engine


def _connect(engine: Engine) -> Connection:
    try:
        return engine.connect()
    except OperationalError as error:
        raise store_operational_error(engine, error) from error


def store_operational_error(engine: Engine, error: OperationalError) -> StoreError:
    """The StoreError for a connection refused, lost or locked out by the database."""
    reason = str(error.orig or error).strip().splitlines()[0]
    return StoreError(
        f"the store at {display_url(engine)} failed: {reason}; check that the database is "
        "running, reachable and not locked, and that the URL is right "
        "(flag --store-url or env BLISS_STORE_URL)"
    )


def _revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(_alembic_config())
    return {revision.revision for revision in script.walk_revisions()}


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_folder()))
    if connection is not None:
        # migrations/env.py runs on this connection instead of opening its own.
        config.attributes["connection"] = connection
    return config


def _run_on_url(url: str, run: Callable[[Config], None]) -> None:
    engine = create_store_engine(url)
    try:
        _run_alembic(engine, run)
    finally:
        engine.dispose()


def _run_alembic(engine: Engine, run: Callable[[Config], None]) -> None:
    writer = engine.execution_options(**WRITE_OPTIONS)
    with _connect(writer) as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch migrations copy a table and drop the old one; with foreign keys on,
            # the drop would cascade-delete every child row (SQLite ignores this pragma
            # inside a transaction, hence on the raw connection, before BEGIN).
            _driver_execute(connection, "PRAGMA foreign_keys = OFF")
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                run(_alembic_config(connection))
                if sqlite:
                    _check_sqlite_foreign_keys(connection)
        finally:
            if sqlite:
                _driver_execute(connection, "PRAGMA foreign_keys = ON")


def _driver_execute(connection: Connection, statement: str) -> None:
    """Run ``statement`` on the driver's own connection, outside SQLAlchemy's transaction."""
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None, "an open Connection holds its driver's"
    driver_connection.execute(statement)


def _check_sqlite_foreign_keys(connection: Connection) -> None:
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").first()
    if broken is not None:
        raise StoreError(
            f"a migration left a row of {broken[0]} pointing at a missing {broken[2]} row; "
            "nothing was changed (the migration was rolled back): report this as a bug"
        )
