"""``bliss db``: upgrade, downgrade and inspect the store's schema revision."""

from __future__ import annotations

import argparse

from bliss.settings import StoreSettings, add_store_arguments, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bliss db upgrade|downgrade REV|current``."""
    parser = subparsers.add_parser(
        "db",
        help="manage the statistics store's schema (Alembic migrations)",
        description="Manage the schema of the statistics store (SQLite or PostgreSQL).",
    )
    actions = parser.add_subparsers(dest="db_action", required=True, metavar="ACTION")

    upgrade = actions.add_parser("upgrade", help="migrate the store to this bliss's schema")
    add_store_arguments(upgrade)
    upgrade.set_defaults(handler=_upgrade)

    downgrade = actions.add_parser(
        "downgrade", help="migrate the store down to an older revision (drops data)"
    )
    downgrade.add_argument(
        "revision", help="target revision, e.g. 0001, -1, or base (drops every table)"
    )
    add_store_arguments(downgrade)
    downgrade.set_defaults(handler=_downgrade)

    current = actions.add_parser("current", help="show the store's schema revision")
    add_store_arguments(current)
    current.set_defaults(handler=_current)


def _url(args: argparse.Namespace) -> str:
    return settings_from_args(StoreSettings, args).resolved_store_url


def _upgrade(args: argparse.Namespace) -> int:
    from bliss.store import database

    url = _url(args)
    before = database.current_revision(url)
    database.upgrade_to_head(url)
    after = database.current_revision(url)
    change = f"already at {after}" if before == after else f"{before or 'empty'} -> {after}"
    print(f"{database.redact_url(url)}: {change}")
    return 0


def _downgrade(args: argparse.Namespace) -> int:
    from bliss.store import database

    url = _url(args)
    before = database.current_revision(url)
    database.downgrade(url, args.revision)
    after = database.current_revision(url)
    print(f"{database.redact_url(url)}: {before or 'empty'} -> {after or 'empty (base)'}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from bliss.store import database

    url = _url(args)
    current = database.current_revision(url)
    head = database.head_revision()
    if current == head:
        status = "(head)"
    elif current is None:
        status = f"(empty: run `bliss db upgrade` to create schema {head})"
    else:
        status = f"(this bliss needs {head}: run `bliss db upgrade`)"
    print(f"{database.redact_url(url)}: {current or 'none'} {status}")
    return 0
