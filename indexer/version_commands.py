"""``bliss index`` list, describe, verify, activate, delete and gc: managing built versions.

A version is named ``NAME@V`` or ``NAME --version V`` (``NAME`` alone: the active one).
``list``, ``describe`` and ``verify`` only read: they never create or migrate a store.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from bliss.errors import InvalidInputError, NotFoundError
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.store import Store, VersionRecord

VERSION_HELP = "NAME or NAME@VERSION (NAME alone: the active version)"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def register(actions: argparse._SubParsersAction) -> None:
    listing = actions.add_parser("list", help="list index versions")
    listing.add_argument("--name", help="only this index name")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_store_arguments(listing)
    listing.set_defaults(handler=run_list)

    show = actions.add_parser(
        "describe", aliases=["show"], help="describe one index version and its classes"
    )
    show.add_argument("name", help=VERSION_HELP)
    show.add_argument("--version", type=int, help="version number (default: the active one)")
    show.add_argument("--json", action="store_true", help="print JSON")
    add_store_arguments(show)
    show.set_defaults(handler=run_show)

    verify = actions.add_parser(
        "verify",
        help="hash a version's FAISS file and serving artifacts and compare them with the store",
    )
    verify.add_argument("name", help=VERSION_HELP)
    verify.add_argument("--version", type=int, help="version number (default: the active one)")
    add_store_arguments(verify)
    verify.set_defaults(handler=run_verify)

    activate = actions.add_parser(
        "activate", help="verify a ready version's files, then make it the active one"
    )
    activate.add_argument("name", help="NAME@VERSION (or NAME --version VERSION)")
    activate.add_argument("--version", type=int, help="version number")
    add_store_arguments(activate)
    activate.set_defaults(handler=run_activate)

    delete = actions.add_parser(
        "delete",
        help="delete a version that is not active and that no running server serves",
    )
    delete.add_argument("name", help="NAME@VERSION (or NAME --version VERSION)")
    delete.add_argument("--version", type=int, help="version number")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete it even while running servers still serve it (their calls on it may fail)",
    )
    add_store_arguments(delete)
    delete.set_defaults(handler=run_delete)

    gc = actions.add_parser(
        "gc",
        help="remove stuck builds, orphaned workspaces and files no version references",
        description="Remove versions stuck in 'building' and build workspaces untouched for "
        "longer than --older-than whose build is not running, files under indexes/ that no "
        "version references, and the rest of removals that were interrupted.",
    )
    gc.add_argument(
        "--older-than",
        type=_duration,
        default=timedelta(hours=24),
        metavar="AGE",
        help="only builds and workspaces untouched for this long: 90s, 30m, 24h, 7d (default 24h)",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="say what would be removed, remove nothing"
    )
    add_store_arguments(gc)
    gc.set_defaults(handler=run_gc)


def run_list(args: argparse.Namespace) -> int:
    store = open_store_read_only(settings_from_args(StoreSettings, args))
    if store is None:
        versions = []
    else:
        with store:
            versions = store.list_versions(args.name)
    if args.json:
        print(json.dumps([_version_json(v) for v in versions], indent=2))
        return 0
    if not versions:
        print(
            "no index versions yet: build one with `bliss index build` (or try `bliss quickstart`)"
        )
        return 0
    print(
        f"{'NAME':<24} {'VER':>4} {'STATE':<9} {'DIM':>5} {'ENTRIES':>10} {'KIND':<6} "
        f"{'MODEL':<32} CREATED"
    )
    for v in versions:
        model = f"{v.model_name} {v.model_weights}".strip()
        print(
            f"{v.name:<24} {v.version:>4} {v.state.value:<9} {v.embedding_dim:>5} "
            f"{v.dictionary_size:>10,} {v.faiss_kind:<6} {model[:32]:<32} "
            f"{v.created_at:%Y-%m-%d %H:%M}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    name, number = version_ref(args.name, args.version)
    with _existing_store(settings_from_args(StoreSettings, args), name) as store:
        version = store.get_version(name, number)
        classes = store.load_classes(version.id)
        servers = len({lease.server_id for lease in store.live_leases(version.id)})
    description = _version_json(version)
    description["served_by_servers"] = servers
    description["classes"] = [
        {
            "position": c.position,
            "name": c.name,
            "prompt": c.prompt,
            "normal_images": c.sample_count,
            "label_mean": c.label_mean,
            "label_std": c.label_std,
        }
        for c in classes
    ]
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    for key, value in description.items():
        if key != "classes":
            print(f"{key:<20} {value}")
    print(f"classes ({len(classes)}):")
    for c in classes:
        print(
            f"  {c.position:>4}  {c.name:<30} {c.sample_count:>7} images  "
            f"label sim {c.label_mean:.4f} +- {c.label_std:.4f}"
        )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from bliss.version_check import verify_version

    settings = settings_from_args(StoreSettings, args)
    name, number = version_ref(args.name, args.version)
    with _existing_store(settings, name) as store:
        version = store.get_version(name, number)
        checked = verify_version(store, version, settings.data_dir)
    print(
        f"{checked.label} verified: {checked.files} files ({checked.bytes / 2**20:,.1f} MiB) "
        f"match their checksums; {checked.sampled_entries} entries match the store"
    )
    return 0


def run_activate(args: argparse.Namespace) -> int:
    from bliss.version_check import verify_version

    settings = settings_from_args(StoreSettings, args)
    name, number = version_ref(args.name, args.version, required=True)
    with open_store(settings) as store:
        version = store.get_version(name, number)
        verify_version(store, version, settings.data_dir)
        version = store.activate(version.id)
    print(f"{version.label} is active (files verified)")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from bliss.indexer.garbage import discard, drop_dictionary, version_paths

    settings = settings_from_args(StoreSettings, args)
    name, number = version_ref(args.name, args.version, required=True)
    with open_store(settings) as store:
        version = store.get_version(name, number)
        overridden = store.delete_version(version.id, force=args.force)
    # After the commit: a removal killed here leaves files that `bliss index gc` finishes.
    discard(settings.data_dir, version_paths(settings.data_dir, version))
    drop_dictionary(version)
    servers = len({lease.server_id for lease in overridden})
    plural = "s" if servers > 1 else ""
    still = f" (still served by {servers} running server{plural}: --force)" if servers else ""
    print(f"deleted {version.label}{still}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from bliss.indexer.garbage import collect_garbage

    settings = settings_from_args(StoreSettings, args)
    with open_store(settings) as store:
        report = collect_garbage(store, settings.data_dir, args.older_than, dry_run=args.dry_run)
    for line in report.lines:
        print(line)
    total = f"{report.items} items, {report.bytes / 2**20:,.1f} MiB"
    if not report.items:
        print("nothing to remove")
    elif args.dry_run:
        print(f"would remove {total}: run without --dry-run to remove them")
    else:
        print(f"removed {total}")
    return 0


def version_ref(
    name: str, version: int | None, *, required: bool = False
) -> tuple[str, int | None]:
    """(name, version) from ``NAME@V`` or ``NAME`` plus ``--version`` (None: the active one)."""
    base, at, number = name.partition("@")
    if at:
        if not number.isdigit() or int(number) < 1:
            raise InvalidInputError(
                f"{name!r} does not name a version: use NAME@VERSION with a version number "
                f"from 1, e.g. {base}@1"
            )
        if version is not None and version != int(number):
            raise InvalidInputError(
                f"{name} and --version {version} name different versions: give one of them"
            )
        version = int(number)
    if required and version is None:
        raise InvalidInputError(
            f"name the version: {base}@VERSION (or {base} --version VERSION); "
            "`bliss index list` shows them"
        )
    return base, version


def _version_json(version: VersionRecord) -> dict:
    """The public fields every client sees, then what only the store knows."""
    return {
        **version.info().to_dict(),
        "state": version.state.value,
        "faiss_path": version.faiss_path,
        "statistics_mode": version.statistics_mode.value,
        "serving_artifacts": "yes" if version.artifacts_checksum else "no (store rows)",
        "extends": version.parent_version_id,
        "search_tuning": _tuning_json(version),
    }


def _tuning_json(version: VersionRecord) -> dict | None:
    tuning = version.search_tuning
    if tuning is None:
        return None
    return {
        "parameter": tuning.parameter,
        "value": tuning.value,
        "target_recall": tuning.target,
        "measured_recall": tuning.recall,
        "max_bliss_score_change": tuning.max_score_change,
    }


def open_store(settings: StoreSettings, *, migrate: bool = True) -> Store:
    from bliss.store import Store

    return Store.open(settings.resolved_store_url, migrate=migrate)


def open_store_read_only(settings: StoreSettings) -> Store | None:
    """The store, never created nor migrated; None when there is none (or no schema) yet.

    A store at an older schema raises StoreError naming the upgrade command.
    """
    from bliss.store import Store
    from bliss.store.database import existing_revision

    url = settings.resolved_store_url
    if existing_revision(url) is None:
        return None
    return Store.open(url, migrate=False)


def _existing_store(settings: StoreSettings, name: str) -> Store:
    from bliss.store.database import redact_url

    store = open_store_read_only(settings)
    if store is None:
        where = redact_url(settings.resolved_store_url)
        raise NotFoundError(
            f"no index named {name!r}: the store at {where} has no indexes yet; build one "
            "first (bliss index build), or point --data-dir or --store-url at the store "
            "that has it"
        )
    return store


def _duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` or ``0`` as a timedelta (for --older-than)."""
    if text.strip() == "0":
        return timedelta(0)
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: use a number and a unit, e.g. 90s, 30m, 24h or 7d"
        )
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
