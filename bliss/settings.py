"""Where bliss keeps its files and its statistics store.

One typed settings object, read from command-line flags first, then ``BLISS_*``
environment variables, then defaults. Components that need more settings (the server)
subclass :class:`StoreSettings`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SQLITE_FILE_NAME = "bliss.sqlite3"


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/bliss``, falling back to ``~/.local/share/bliss``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "bliss"


class StoreSettings(BaseSettings):
    """The data directory (SQLite file, FAISS files, build work) and the store URL."""

    model_config = SettingsConfigDict(env_prefix="BLISS_", extra="ignore")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Folder for the SQLite store, FAISS files and resumable build work.",
    )
    store_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the statistics store; default: SQLite in the data dir.",
    )

    @property
    def resolved_store_url(self) -> str:
        """The store URL to connect to: the explicit one, else the SQLite file in data_dir."""
        if self.store_url:
            return self.store_url
        return f"sqlite:///{(self.data_dir / SQLITE_FILE_NAME).resolve()}"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir`` and ``--store-url`` (unset flags fall back to the environment)."""
    group = parser.add_argument_group("store")
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (env BLISS_DATA_DIR; default $XDG_DATA_HOME/bliss)",
    )
    group.add_argument(
        "--store-url",
        default=None,
        help="SQLAlchemy store URL, e.g. postgresql://user@host/db "
        "(env BLISS_STORE_URL; default SQLite in the data directory)",
    )


def settings_from_args(settings_type: type[SettingsT], args: argparse.Namespace) -> SettingsT:
    """Build settings from parsed flags; flags left unset defer to ``BLISS_*`` variables."""
    given = {
        name: getattr(args, name)
        for name in settings_type.model_fields
        if getattr(args, name, None) is not None
    }
    return settings_type(**given)
