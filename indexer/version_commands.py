"""``bliss index`` list, describe, verify, activate and delete: managing built versions."""

from __future__ import annotations

import argparse
import json
import shutil
from typing import TYPE_CHECKING

from bliss.serving_artifacts import artifacts_directory
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.store import Store, VersionRecord


def register(actions: argparse._SubParsersAction) -> None:
    listing = actions.add_parser("list", help="list index versions")
    listing.add_argument("--name", help="only this index name")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_store_arguments(listing)
    listing.set_defaults(handler=run_list)

    show = actions.add_parser(
        "describe", aliases=["show"], help="describe one index version and its classes"
    )
    show.add_argument("name")
    show.add_argument("--version", type=int, help="version number (default: the active one)")
    show.add_argument("--json", action="store_true", help="print JSON")
    add_store_arguments(show)
    show.set_defaults(handler=run_show)

    verify = actions.add_parser(
        "verify",
        help="hash a version's FAISS file and serving artifacts and compare them with the store",
    )
    verify.add_argument("name")
    verify.add_argument("--version", type=int, help="version number (default: the active one)")
    add_store_arguments(verify)
    verify.set_defaults(handler=run_verify)

    activate = actions.add_parser(
        "activate", help="verify a ready version's files, then make it the active one"
    )
    activate.add_argument("name")
    activate.add_argument("--version", type=int, required=True)
    add_store_arguments(activate)
    activate.set_defaults(handler=run_activate)

    delete = actions.add_parser("delete", help="delete a version that is not active")
    delete.add_argument("name")
    delete.add_argument("--version", type=int, required=True)
    add_store_arguments(delete)
    delete.set_defaults(handler=run_delete)


def run_list(args: argparse.Namespace) -> int:
    with open_store(settings_from_args(StoreSettings, args)) as store:
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
    with open_store(settings_from_args(StoreSettings, args)) as store:
        version = store.get_version(args.name, args.version)
        classes = store.load_classes(version.id)
    description = _version_json(version)
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
    with open_store(settings, migrate=False) as store:
        version = store.get_version(args.name, args.version)
        checked = verify_version(store, version, settings.data_dir)
    print(
        f"{checked.label} verified: {checked.files} files ({checked.bytes / 2**20:,.1f} MiB) "
        f"match their checksums; {checked.sampled_entries} entries match the store"
    )
    return 0


def run_activate(args: argparse.Namespace) -> int:
    from bliss.version_check import verify_version

    settings = settings_from_args(StoreSettings, args)
    with open_store(settings) as store:
        version = store.get_version(args.name, args.version)
        verify_version(store, version, settings.data_dir)
        version = store.activate(version.id)
    print(f"{version.label} is active (files verified)")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    settings = settings_from_args(StoreSettings, args)
    with open_store(settings) as store:
        version = store.get_version(args.name, args.version)
        store.delete_version(version.id)
    if version.faiss_path:
        faiss_file = settings.data_dir / version.faiss_path
        faiss_file.unlink(missing_ok=True)
        shutil.rmtree(artifacts_directory(faiss_file), ignore_errors=True)
    print(f"deleted {version.label}")
    return 0


def _version_json(version: VersionRecord) -> dict:
    return {
        "name": version.name,
        "version": version.version,
        "label": version.label,
        "state": version.state.value,
        "model": version.model_name,
        "weights": version.model_weights,
        "embedding_dim": version.embedding_dim,
        "prompt_template": version.prompt_template,
        "dictionary_source": version.dictionary_source,
        "dictionary_size": version.dictionary_size,
        "faiss_kind": version.faiss_kind,
        "faiss_path": version.faiss_path,
        "statistics_mode": version.statistics_mode.value,
        "serving_artifacts": "yes" if version.artifacts_checksum else "no (store rows)",
        "extends": version.parent_version_id,
        "search_tuning": _tuning_json(version),
        "default_k": version.default_k,
        "default_lambda": version.default_lambda,
        "created_at": version.created_at.isoformat(),
        "activated_at": version.activated_at.isoformat() if version.activated_at else None,
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
