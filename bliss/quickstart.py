"""``bliss quickstart``: the whole pipeline on a generated example, offline, in a minute.

Generates a few classes of shape images, builds and activates an index version with the
tiny random test model and the ImageNet dictionary, scores held-out normal images and
anomalies locally, then starts the gRPC server on a free port and scores the same
images through the client. The scores of a random model mean nothing: the point is to show every
step working on this machine, and the command says how to run it with real weights.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

INDEX_NAME = "quickstart"
NORMAL_SHAPES = ("circle", "square", "triangle")
ANOMALOUS_SHAPES = ("cross", "stripes", "ring")
TRAIN_PER_CLASS = 24
TEST_PER_CLASS = 2

REAL_WEIGHTS_NOTE = """\
Note: these scores come from bliss-tiny-random-TEST-ONLY, a randomly initialised model
that exists so this demo and the tests run offline. Real use needs real CLIP weights:

  bliss index build --name my-index --from-images DIR --activate \\
      --model ViT-B-16 --pretrained openai                # downloads the weights, or
      --model ViT-B-16-quickgelu --pretrained /path/to/open_clip_pytorch_model.bin
      --model local-dir:/path/to/open_clip_folder

DIR holds one sub-folder of images per normal class. Then:
  bliss score --local --index my-index --images photo.jpg
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    quickstart = subparsers.add_parser(
        "quickstart",
        help="build a demo index on generated images with the tiny test model and score some",
    )
    add_store_arguments(quickstart)
    quickstart.set_defaults(handler=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    settings = settings_from_args(StoreSettings, args)
    example = settings.data_dir / "quickstart"
    print(f"1. example images in {example}")
    tests = _write_example(example)
    print(
        f"2. building index {INDEX_NAME!r} "
        f"({len(NORMAL_SHAPES)} normal classes, tiny model, ImageNet dictionary)"
    )
    version = _build(settings, example / "normal")
    print(f"   {version}")
    print(f"3. scoring {len(tests)} held-out images locally (higher = more anomalous)")
    local = _score_locally(settings, tests)
    _print_scores(local, tests)
    print("4. serving the index over gRPC and scoring the same images through the client")
    _score_through_server(settings, tests, local)
    print()
    print(REAL_WEIGHTS_NOTE)
    return 0


def _write_example(example: Path) -> list[tuple[Path, str]]:
    """Normal training folders plus labelled test images; reused when already there."""
    from bliss.synthetic_images import write_shape_folders

    if not (example / "normal").is_dir():
        write_shape_folders(example / "normal", NORMAL_SHAPES, TRAIN_PER_CLASS, seed=1)
    if not (example / "test").is_dir():
        write_shape_folders(
            example / "test", NORMAL_SHAPES + ANOMALOUS_SHAPES, TEST_PER_CLASS, seed=2
        )
    tests = []
    for shape in NORMAL_SHAPES + ANOMALOUS_SHAPES:
        truth = "normal" if shape in NORMAL_SHAPES else "anomaly"
        tests += [(path, truth) for path in sorted((example / "test" / shape).glob("*.png"))]
    return tests


def _build(settings: StoreSettings, normal_folder: Path) -> str:
    from bliss.dictionaries import imagenet_dictionary
    from bliss.encoders import DEFAULT_PROMPT_TEMPLATE, TINY_TEST_MODEL, ModelSpec
    from bliss.indexer.build_inputs import ImageFolderInputs
    from bliss.indexer.build_options import BuildOptions, ModelIdentity
    from bliss.indexer.executors import EncoderSettings, LocalExecutor
    from bliss.indexer.image_sources import scan_image_folder
    from bliss.indexer.pipeline import build_version
    from bliss.store import Store

    spec = ModelSpec(model_name=TINY_TEST_MODEL)
    dictionary = imagenet_dictionary()
    inputs = ImageFolderInputs(
        scan_image_folder(normal_folder),
        dictionary,
        lambda: LocalExecutor().encoder(EncoderSettings(spec)),
        DEFAULT_PROMPT_TEMPLATE,
    )
    options = BuildOptions(
        name=INDEX_NAME,
        model=ModelIdentity(spec.model_name, spec.weights_id, spec.checksum()),
        dictionary_source=dictionary.source,
        prompt_template=DEFAULT_PROMPT_TEMPLATE,
    )
    with Store.open(settings.resolved_store_url, migrate=True) as store:
        outcome = build_version(store, settings.data_dir, inputs, options, activate=True)
    version = outcome.version
    verb = "built" if outcome.built else "reused"
    return f"{verb} {version.label} ({version.state.value}) in {settings.data_dir}"


def _score_locally(settings: StoreSettings, tests: list[tuple[Path, str]]) -> list[dict]:
    from bliss.local_scoring import LocalScoringRequest, score_locally

    output = io.StringIO()
    # One image per batch, as the server calls below: the encoder's float32 output
    # shifts in the last digits with the batch an image is part of.
    request = LocalScoringRequest(
        index=INDEX_NAME, images=tuple(path for path, _ in tests), batch_size=1
    )
    score_locally(settings, request, output)
    return [json.loads(line) for line in output.getvalue().splitlines()]


def _print_scores(items: list[dict], tests: list[tuple[Path, str]]) -> None:
    truth = {str(path): label for path, label in tests}
    print(f"   {'image':<22} {'truth':<8} {'score':>9}  {'nearest':<9} top dictionary entries")
    for item in items:
        entries = ", ".join(e["text"] for e in item["top_entries"][:3])
        print(
            f"   {Path(item['id']).name:<22} {truth[item['id']]:<8} {item['score']:>9.3f}  "
            f"{item['nearest_class']:<9} {entries}"
        )


def _score_through_server(
    settings: StoreSettings, tests: list[tuple[Path, str]], local: list[dict]
) -> None:
    from bliss.client import BlissClient
    from bliss.server.runtime import BackgroundServer
    from bliss.server.settings import ServerSettings

    server_settings = ServerSettings(
        data_dir=settings.data_dir, store_url=settings.store_url, host="127.0.0.1", port=0,
        metrics=False,
    )  # fmt: skip
    with BackgroundServer(server_settings) as server, BlissClient(server.address) as client:
        print(f"   bliss serve listening on {server.address}; health: {client.health()}")
        remote = [
            client.score(images=[path], ids=[str(path)], index=INDEX_NAME)[0].to_json_dict()
            for path, _ in tests
        ]
    largest = max(abs(r["score"] - item["score"]) for r, item in zip(remote, local, strict=True))
    same = all(
        r["nearest_class"] == item["nearest_class"] for r, item in zip(remote, local, strict=True)
    )
    print(
        f"   {len(remote)} images scored by the server: largest |server - local| score "
        f"difference {largest:.1e}, same nearest classes: {'yes' if same else 'NO'}"
    )
