"""The open_clip encoders, on the tiny random model only: no network, no downloads."""

import copy
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bliss.encoders import (
    DEFAULT_PROMPT_TEMPLATE,
    TINY_TEST_MODEL,
    ClipEncoder,
    ModelSpec,
    format_prompt,
    select_device,
)
from bliss.errors import InvalidInputError, WeightsUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["tench", "great white shark", "a dog on a skateboard", "", "cafe", "Ünïcödé 東京"] * 3
TINY_CONFIG = REPO_ROOT / "bliss" / "model_configs" / f"{TINY_TEST_MODEL}.json"


@pytest.fixture(scope="module")
def tiny() -> ClipEncoder:
    return ClipEncoder.load(ModelSpec(TINY_TEST_MODEL), device="cpu", batch_size=64)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected network connection: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the url download cache ~/.cache/clip
    return tmp_path / "hf-home" / "hub"


def random_images(count: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = 20 + 7 * index, 45 - 3 * index
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        images.append(image.convert(["RGB", "L", "RGBA"][index % 3]))
    return images


def test_importing_the_module_loads_neither_torch_nor_open_clip():
    probe = "import sys, bliss.encoders; print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_tiny_model_outputs_float32_unit_vectors(tiny):
    embeddings = tiny.encode_texts(TEXTS)
    assert tiny.embedding_dim == json.loads(TINY_CONFIG.read_text())["embed_dim"] == 64
    assert embeddings.shape == (len(TEXTS), 64)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    # Distinct texts give distinct embeddings; equal texts give equal ones.
    assert not np.allclose(embeddings[0], embeddings[1])
    np.testing.assert_array_equal(embeddings[0], embeddings[6])


def test_tiny_model_is_deterministic_across_loads_and_warns(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="bliss.encoders"):
        again = ClipEncoder.load(ModelSpec(TINY_TEST_MODEL), device="cpu", batch_size=64)
    assert any("RANDOMLY" in record.getMessage() for record in caplog.records)
    np.testing.assert_array_equal(again.encode_texts(TEXTS), tiny.encode_texts(TEXTS))
    images = random_images(4)
    np.testing.assert_array_equal(again.encode_images(images), tiny.encode_images(images))


def test_loading_the_tiny_model_leaves_the_global_random_state_alone(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ClipEncoder.load(ModelSpec(TINY_TEST_MODEL), device="cpu")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_tiny_model_is_bit_identical_in_another_process(tiny):
    script = (
        "import hashlib, sys\n"
        "from bliss.encoders import ClipEncoder, ModelSpec, TINY_TEST_MODEL\n"
        "encoder = ClipEncoder.load(ModelSpec(TINY_TEST_MODEL), device='cpu', batch_size=64)\n"
        f"print(hashlib.sha256(encoder.encode_texts({TEXTS!r}).tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    expected = hashlib.sha256(tiny.encode_texts(TEXTS).tobytes()).hexdigest()
    assert result.stdout.strip().splitlines()[-1] == expected


def test_batch_size_does_not_change_results(tiny):
    small = ClipEncoder.load(ModelSpec(TINY_TEST_MODEL), device="cpu", batch_size=3)
    np.testing.assert_allclose(small.encode_texts(TEXTS), tiny.encode_texts(TEXTS), atol=1e-6)
    images = random_images(7)
    np.testing.assert_allclose(small.encode_images(images), tiny.encode_images(images), atol=1e-6)


def test_empty_input_gives_an_empty_matrix(tiny):
    assert tiny.encode_texts([]).shape == (0, 64)
    assert tiny.encode_images([]).shape == (0, 64)


def test_prompts_use_the_template(tiny):
    labels = ["dog", "great white shark"]
    np.testing.assert_array_equal(
        tiny.encode_prompts(labels),
        tiny.encode_texts(["This is a photo of a dog", "This is a photo of a great white shark"]),
    )
    custom = tiny.encode_prompts(labels, "a {label}.")
    np.testing.assert_array_equal(custom, tiny.encode_texts(["a dog.", "a great white shark."]))
    assert not np.allclose(custom, tiny.encode_prompts(labels))


def test_format_prompt():
    assert format_prompt(DEFAULT_PROMPT_TEMPLATE, "dog") == "This is a photo of a dog"
    assert format_prompt("{{literal}} {label}", "{x}") == "{literal} {x}"


@pytest.mark.parametrize(
    "template",
    [
        "no field at all",
        "a {labl}",
        "{label} and {label}",
        "{label} {other}",
        "{0}",
        "{label",
        "{label!r}",
        "{label:>9}",
    ],
)
def test_bad_prompt_templates_are_rejected(tiny, template):
    with pytest.raises(InvalidInputError, match="label"):
        format_prompt(template, "dog")
    with pytest.raises(InvalidInputError):
        tiny.encode_prompts(["dog"], template)


def test_a_single_string_is_not_taken_for_a_list_of_characters(tiny):
    with pytest.raises(InvalidInputError, match="not one string"):
        tiny.encode_texts("dog")


def test_images_from_memory_and_from_files_agree(tiny, tmp_path):
    images = random_images(5)
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"image{index}.png")
        image.save(paths[-1])
    from_memory = tiny.encode_images(images)
    from_files = tiny.encode_images([str(paths[0]), *paths[1:]])
    assert from_memory.shape == (5, 64) and from_memory.dtype == np.float32
    np.testing.assert_array_equal(from_files, from_memory)
    np.testing.assert_allclose(np.linalg.norm(from_files, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(from_memory[0], from_memory[1])


def test_encode_image_batch_matches_encode_images(tiny):
    images = random_images(4, seed=1)
    pixels = torch.stack([tiny.preprocess(image) for image in images])
    assert tuple(pixels.shape) == (4, 3, 32, 32)
    batch = tiny.encode_image_batch(pixels)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch, tiny.encode_images(images), atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"\[B, 3, H, W\]"):
        tiny.encode_image_batch(pixels[0])


def test_an_unreadable_image_is_named(tiny, tmp_path):
    broken = tmp_path / "not-an-image.jpg"
    broken.write_bytes(b"this is text, not a JPEG")
    with pytest.raises(InvalidInputError, match=r"not-an-image\.jpg"):
        tiny.encode_images([*random_images(1), broken])
    with pytest.raises(InvalidInputError, match=r"missing\.png"):
        tiny.encode_images([tmp_path / "missing.png"])


def perturbed_state_dict(encoder: ClipEncoder) -> dict:
    """The tiny model's weights moved off their seeded values, so loading them is observable."""
    model = copy.deepcopy(encoder.model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()}


def assert_weights_equal(model, state_dict):
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tiny, tmp_path, no_network, suffix):
    weights = perturbed_state_dict(tiny)
    path = tmp_path / f"tiny-weights{suffix}"
    if suffix == ".pt":
        torch.save(weights, path)
    else:
        from safetensors.torch import save_file

        save_file(weights, str(path))
    spec = ModelSpec(model_name=TINY_TEST_MODEL, pretrained=str(path))
    encoder = ClipEncoder.load(spec, device="cpu", batch_size=64)
    assert_weights_equal(encoder.model, weights)
    embeddings = encoder.encode_texts(TEXTS)
    assert not np.allclose(embeddings, tiny.encode_texts(TEXTS), atol=1e-3)
    again = ClipEncoder.load(spec, device="cpu", batch_size=64)
    np.testing.assert_array_equal(again.encode_texts(TEXTS), embeddings)
    assert spec.weights_id == str(path)
    assert spec.checksum() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_dir_model(tiny, tmp_path, no_network):
    folder = tmp_path / "tiny-folder"
    folder.mkdir()
    config = {
        "model_cfg": json.loads(TINY_CONFIG.read_text()),
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    weights = perturbed_state_dict(tiny)
    torch.save(weights, folder / "open_clip_pytorch_model.bin")
    spec = ModelSpec(f"local-dir:{folder}")
    encoder = ClipEncoder.load(spec, device="cpu")
    assert_weights_equal(encoder.model, weights)
    assert encoder.embedding_dim == 64
    assert list(encoder.model.visual.preprocess_cfg["mean"]) == [0.5, 0.5, 0.5]
    assert spec.weights_id == str(folder)
    assert (
        spec.checksum()
        == hashlib.sha256((folder / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    )


def test_local_dir_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        ClipEncoder.load(ModelSpec(f"local-dir:{tmp_path / 'nowhere'}"), device="cpu")
    with pytest.raises(InvalidInputError, match=r"open_clip_config\.json"):
        ClipEncoder.load(ModelSpec(f"local-dir:{tmp_path}"), device="cpu")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="no weights file"):
        ClipEncoder.load(ModelSpec(f"local-dir:{tmp_path}"), device="cpu")
    with pytest.raises(InvalidInputError, match="drop --pretrained"):
        ModelSpec(f"local-dir:{tmp_path}", pretrained="openai")


def test_a_checkpoint_for_another_architecture_is_reported(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(InvalidInputError, match=r"tiny\.pt.*RN50"):
        ClipEncoder.load(ModelSpec("RN50", pretrained=str(path)), device="cpu")


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(InvalidInputError, match="checkpoint file not found"):
        ClipEncoder.load(ModelSpec(TINY_TEST_MODEL, pretrained=str(missing)), device="cpu")


def test_uncached_tag_fails_fast_when_offline(empty_hf_cache, monkeypatch, no_network):
    import open_clip  # noqa: F401  (imported first so the timing below is the check alone)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as raised:
        ClipEncoder.load(ModelSpec("ViT-B-16", pretrained="openai"), device="cpu")
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "ViT-B-16" in message and "openai" in message and "not cached" in message
    assert "HF_HUB_OFFLINE" in message
    assert "https://huggingface.co/timm/vit_base_patch16_clip_224.openai" in message
    assert "open_clip_pytorch_model.bin" in message
    # The OpenAI weights need QuickGELU: the hint must name the config that has it.
    assert "--model ViT-B-16-quickgelu --pretrained" in message
    assert "local-dir:" in message and "HF_HOME" in message
    assert "\n" not in message


def test_uncached_tag_fails_fast_when_the_hub_is_unreachable(empty_hf_cache, monkeypatch):
    connections = []

    def unreachable(address, timeout=None, **kwargs):
        connections.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(WeightsUnavailableError, match="not reachable") as raised:
        ClipEncoder.load(ModelSpec("ViT-B-16", pretrained="laion2b_s34b_b88k"), device="cpu")
    assert connections == [(("huggingface.co", 443), 3.0)]
    assert "--model ViT-B-16 --pretrained" in str(raised.value)  # not a QuickGELU tag


def test_a_cached_tag_is_used_without_the_network(empty_hf_cache, monkeypatch, no_network):
    # A fake Hugging Face cache entry: found, handed to open_clip, and rejected as bad weights,
    # which shows the cache was used and nothing was downloaded.
    repo = empty_hf_cache / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"not really safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidInputError, match=r"open_clip_model\.safetensors"):
        ClipEncoder.load(ModelSpec("ViT-B-16", pretrained="openai"), device="cpu")


def test_a_cached_tag_loads_offline_with_the_tags_activation_and_preprocessing(
    tiny, empty_hf_cache, monkeypatch, no_network
):
    # A made-up tag for the tiny architecture, "downloaded" into the Hugging Face cache.
    import open_clip.pretrained
    from safetensors.torch import save_file

    tag_cfg = {"url": "", "hf_hub": "bliss/tiny-demo/", "quick_gelu": True, "mean": (0.5,) * 3}
    monkeypatch.setattr(
        open_clip.pretrained,
        "get_pretrained_cfg",
        lambda model, tag: tag_cfg if (model, tag) == (TINY_TEST_MODEL, "demo") else {},
    )
    repo = empty_hf_cache / "models--bliss--tiny-demo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    weights = perturbed_state_dict(tiny)
    save_file(weights, str(snapshot / "open_clip_model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = ClipEncoder.load(ModelSpec(TINY_TEST_MODEL, pretrained="demo"), device="cpu")
    assert_weights_equal(encoder.model, weights)
    activation = encoder.model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(activation, open_clip.transformer.QuickGELU)
    assert isinstance(tiny.model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert list(encoder.model.visual.preprocess_cfg["mean"]) == [0.5, 0.5, 0.5]


def test_url_only_tags_use_the_clip_download_cache(empty_hf_cache, monkeypatch, no_network):
    import open_clip.pretrained

    url = "https://example.org/weights/ViT-B-16-demo.pt"
    monkeypatch.setattr(
        open_clip.pretrained, "get_pretrained_cfg", lambda model, tag: {"url": url, "hf_hub": ""}
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as raised:
        ClipEncoder.load(ModelSpec("ViT-B-16", pretrained="demo"), device="cpu")
    message = str(raised.value)
    assert url in message and "--pretrained /path/to/ViT-B-16-demo.pt" in message
    assert str(empty_hf_cache.parents[1] / "home" / ".cache" / "clip") in message


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(InvalidInputError, match="ViT-B-16") as raised:
        ClipEncoder.load(ModelSpec("vit-b-16x", pretrained="openai"), device="cpu")
    assert "unknown model" in str(raised.value)


def test_unknown_tag_lists_the_model_tags():
    with pytest.raises(InvalidInputError, match="did you mean openai") as raised:
        ClipEncoder.load(ModelSpec("ViT-B-16", pretrained="opnai"), device="cpu")
    assert "laion2b_s34b_b88k" in str(raised.value)


def test_builtin_model_without_weights_is_refused():
    with pytest.raises(InvalidInputError, match="needs --pretrained"):
        ClipEncoder.load(ModelSpec("ViT-B-16"), device="cpu")


def test_weights_id():
    assert ModelSpec(TINY_TEST_MODEL).weights_id == ""
    assert ModelSpec("ViT-B-16", "LAION2B-s34b-b88k").weights_id == "laion2b_s34b_b88k"
    assert ModelSpec("ViT-B-16", "openai").checksum() is None
    relative = ModelSpec("ViT-B-16", "weights/ckpt.bin")
    assert relative.weights_id == str(Path.cwd() / "weights" / "ckpt.bin")


def test_device_and_precision_choices(monkeypatch):
    monkeypatch.delenv("BLISS_DEVICE", raising=False)
    assert select_device("cpu") == "cpu"
    monkeypatch.setenv("BLISS_DEVICE", "cpu")
    assert select_device() == "cpu"
    with pytest.raises(InvalidInputError, match="unknown device"):
        select_device("tpu-nine")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(InvalidInputError, match="CUDA only"):
        ClipEncoder.load(ModelSpec(TINY_TEST_MODEL), device="cpu", precision="fp16")
    with pytest.raises(InvalidInputError, match="unknown precision"):
        ClipEncoder.load(ModelSpec(TINY_TEST_MODEL), device="cpu", precision="fp8")
