"""Alembic environment for the bliss statistics store.

bliss runs migrations on a connection it opened itself (``bliss db upgrade``,
``Store.open(url, migrate=True)``, the tests) and passes it in
``config.attributes["connection"]``. Developers running the ``alembic`` command from the
repository root get a connection to ``BLISS_STORE_URL`` (default: the SQLite store in the
data directory), e.g. ``alembic revision --autogenerate -m "..." --rev-id 0002``.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from bliss.settings import StoreSettings
from bliss.store.database import create_store_engine, normalize_url
from bliss.store.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _developer_url() -> str:
    return config.get_main_option("sqlalchemy.url") or StoreSettings().resolved_store_url


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later revisions go through batch mode.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = create_store_engine(_developer_url())
    try:
        with engine.connect() as own_connection:
            _run_on(own_connection)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = normalize_url(_developer_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
