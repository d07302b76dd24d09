"""GPU throughput: faiss flat search against a torch matmul floor, and ViT-B/16 encoding.

Search: t = 1M and 10M random unit vectors, D = 512, made on the GPU (host memory holds
none of them); batches of 64 and 1,024 random unit queries already on the GPU; k = 10.
faiss's GPU flat inner-product index with float32 and with float16 storage, against the
floor torch.topk(q @ d.T) in the same dtype on the same GPU (scores chunked over d to
bound their memory). "ratio" is faiss's queries/s over torch's; "agree" is the share of
faiss's top-10 ids that torch also found, a check that both solved the same problem.
Without faiss GPU support (the faiss-cpu wheel) only the torch floor is measured.

Encoding: open_clip ViT-B-16 with random weights (nothing is downloaded), 224 x 224
images, batches of 64 and 256, images/s: fp32 weights, fp32 weights under float16
autocast, and fp16 weights (what ``precision="fp16"`` of bliss's encoder loads).

Each section stops starting measurements once its share of --budget-s is spent, and
says what it skipped.

    python benchmarks/gpu_throughput.py [--entries 1000000 10000000] [--budget-s 240]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEVICE = "cuda"
DIM = 512
K = 10
SEARCH_BATCHES = (64, 1024)
ENCODE_BATCHES = (64, 256)
IMAGE_SIZE = 224
# Score matrices of the torch floor stay under 2 GiB of float32 (1 GiB of float16).
SCORE_ELEMENTS = 1 << 29
MIN_SECONDS = 0.3
SEARCH_SHARE = 0.7  # of the budget; encoding gets the rest


@dataclass(frozen=True)
class SearchRow:
    entries: int
    dtype: str
    batch: int
    faiss_qps: float | None
    torch_qps: float
    agree: float | None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA GPU: run this on a machine with one")
    started = time.monotonic()
    faiss = _faiss_gpu()
    _print_setup(faiss)
    search_deadline = started + SEARCH_SHARE * args.budget_s
    print_search_table(search_rows(args.entries, faiss, search_deadline), faiss is not None)
    print_encode_table(encode_rows(started + args.budget_s))


def _faiss_gpu():  # -> the faiss module with torch interop, or None
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    import faiss.contrib.torch_utils  # faiss indexes then take torch GPU tensors

    return faiss


def _print_setup(faiss) -> None:
    name = torch.cuda.get_device_name(0)
    faiss_text = f"faiss {faiss.__version__} (GPU)" if faiss else "faiss without GPU support"
    print(f"GPU 0: {name}; torch {torch.__version__}; {faiss_text}")
    print(f"torch float32 matmul TF32: {torch.backends.cuda.matmul.allow_tf32}")


def timed_rate(run: Callable[[], object], items: int) -> float:
    """Items per second over at least MIN_SECONDS and 3 calls, after one warm-up call."""
    run()
    torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        torch.cuda.synchronize()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 3 and elapsed >= MIN_SECONDS:
            return items * calls / elapsed


def unit_rows(rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    data = torch.randn(rows, DIM, device=DEVICE, generator=generator)
    data /= data.norm(dim=1, keepdim=True)
    return data.to(dtype)


def torch_top_k(queries: torch.Tensor, data: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [B, k] of the k largest inner products, one chunk of ``data`` at a time."""
    chunk = max(k, SCORE_ELEMENTS // len(queries))
    values, ids = [], []
    for start in range(0, len(data), chunk):
        best = (queries @ data[start : start + chunk].T).topk(k, dim=1)
        values.append(best.values)
        ids.append(best.indices + start)
    merged = torch.cat(values, dim=1).topk(k, dim=1)
    return torch.cat(ids, dim=1).gather(1, merged.indices)


def search_rows(entries: list[int], faiss, deadline: float) -> list[SearchRow]:
    rows: list[SearchRow] = []
    for count in entries:
        for dtype in (torch.float32, torch.float16):
            if time.monotonic() > deadline:
                print(f"search budget spent: skipped t={count:,} {dtype}")
                continue
            try:
                rows += _search_at(count, dtype, faiss)
            except torch.cuda.OutOfMemoryError:
                print(f"t={count:,} {dtype} does not fit this GPU's memory: skipped")
            torch.cuda.empty_cache()
    return rows


def _search_at(count: int, dtype: torch.dtype, faiss) -> list[SearchRow]:
    data = unit_rows(count, dtype, seed=count)
    resources = faiss.StandardGpuResources() if faiss else None
    index = _faiss_index(faiss, resources, data) if faiss else None
    return [_search_row(data, index, batch) for batch in SEARCH_BATCHES]


def _search_row(data: torch.Tensor, index, batch: int) -> SearchRow:
    queries = unit_rows(batch, torch.float32, seed=batch)
    same_dtype = queries.to(data.dtype)
    floor = timed_rate(lambda: torch_top_k(same_dtype, data, K), batch)
    faiss_qps = agree = None
    if index is not None:
        faiss_qps = timed_rate(lambda: index.search(queries, K), batch)
        agree = _agreement(index.search(queries, K)[1], torch_top_k(same_dtype, data, K))
    dtype = str(data.dtype).removeprefix("torch.")
    return SearchRow(len(data), dtype, batch, faiss_qps, floor, agree)


def _faiss_index(faiss, resources, data: torch.Tensor):
    """A GPU flat inner-product index of ``data``, stored in ``data``'s dtype."""
    config = faiss.GpuIndexFlatConfig()
    config.device = 0
    config.useFloat16 = data.dtype == torch.float16
    index = faiss.GpuIndexFlatIP(resources, DIM, config)
    # Added in float32 slices: faiss converts on the GPU, and no full float32 copy exists.
    for start in range(0, len(data), 1 << 20):
        index.add(data[start : start + (1 << 20)].float())
    return index


def _agreement(faiss_ids: torch.Tensor, torch_ids: torch.Tensor) -> float:
    hits = (faiss_ids.unsqueeze(2) == torch_ids.unsqueeze(1)).any(dim=2)
    return float(hits.float().mean())


def print_search_table(rows: list[SearchRow], with_faiss: bool) -> None:
    print(f"\nflat search, D={DIM}, k={K}: queries/s (faiss GPU vs torch.topk(q @ d.T))")
    print(f"{'entries':>12} {'dtype':>8} {'batch':>6} {'faiss':>12} {'torch':>12} "
          f"{'ratio':>6} {'agree':>6}")  # fmt: skip
    for row in rows:
        faiss_text = f"{row.faiss_qps:12,.0f}" if row.faiss_qps else f"{'n/a':>12}"
        ratio = f"{row.faiss_qps / row.torch_qps:6.2f}" if row.faiss_qps else f"{'':>6}"
        agree = f"{row.agree:6.3f}" if row.agree is not None else f"{'':>6}"
        print(f"{row.entries:>12,} {row.dtype:>8} {row.batch:>6} {faiss_text} "
              f"{row.torch_qps:12,.0f} {ratio} {agree}")  # fmt: skip
    if not with_faiss:
        print("(faiss has no GPU support here: install faiss-gpu to fill the faiss column)")


def encode_rows(deadline: float) -> list[tuple[str, int, float]]:
    import open_clip

    rows = []
    for mode in ("fp32", "fp32+autocast", "fp16"):
        if time.monotonic() > deadline:
            print(f"encoding budget spent: skipped {mode}")
            continue
        precision = "fp16" if mode == "fp16" else "fp32"
        model = open_clip.create_model(
            "ViT-B-16", pretrained=None, precision=precision, device=DEVICE
        ).eval()
        for batch in ENCODE_BATCHES:
            rows.append((mode, batch, _encode_rate(model, mode, batch)))
        del model
        torch.cuda.empty_cache()
    return rows


def _encode_rate(model: torch.nn.Module, mode: str, batch: int) -> float:
    dtype = torch.float16 if mode == "fp16" else torch.float32
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE, dtype=dtype)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=mode == "fp32+autocast")

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model.encode_image(pixels)

    return timed_rate(run, batch)


def print_encode_table(rows: list[tuple[str, int, float]]) -> None:
    print(f"\nViT-B-16 image encoding (random weights, {IMAGE_SIZE}x{IMAGE_SIZE}): images/s")
    print(f"{'mode':>14} {'batch':>6} {'images/s':>10}")
    for mode, batch, rate in rows:
        print(f"{mode:>14} {batch:>6} {rate:10,.0f}")


if __name__ == "__main__":
    main()
