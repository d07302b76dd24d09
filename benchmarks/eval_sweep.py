"""How long an evaluation sweep takes on cached embeddings of CIFAR-10's size.

Target: the paper's CIFAR-10 sweeps (1, 6 and 9 normal classes, 25 trials) run in seconds
once the images are encoded, so a researcher can sweep lambda, K and shots interactively.

    python benchmarks/eval_sweep.py [--dim 512] [--train-per-class 5000]
        [--test-per-class 1000] [--entries 1850]

The embeddings are the synthetic benchmark's at CIFAR-10's size (10 classes, 50,000
training and 10,000 test images, ViT-B/16's 512 dimensions, an ImageNet-sized dictionary).
"""

from __future__ import annotations

import argparse
import time

from bliss.evaluation.runner import ClassWork, run_setting, search_test_split
from bliss.evaluation.splits import Setting, cifar10_trials
from bliss.evaluation.sweeps import SweepConfig
from bliss.evaluation.synthetic import SYNTHETIC_DICTIONARY, SyntheticSpec, synthetic_benchmark

SWEEPS = {
    "methods only": SweepConfig(dictionaries=(SYNTHETIC_DICTIONARY,)),
    "lambda x6": SweepConfig(
        lambdas=(0.1, 0.25, 0.5, 0.75, 1.0, 2.0), dictionaries=(SYNTHETIC_DICTIONARY,)
    ),
    "K x5": SweepConfig(ks=(1, 5, 10, 20, 50), dictionaries=(SYNTHETIC_DICTIONARY,)),
    "shots x4": SweepConfig(shots=(1, 5, 10, None), dictionaries=(SYNTHETIC_DICTIONARY,)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--train-per-class", type=int, default=5000)
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=1850)
    args = parser.parse_args()
    started = time.perf_counter()
    spec = SyntheticSpec(
        dim=args.dim,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        random_entries=args.entries - 10,
    )
    benchmark, dictionaries = synthetic_benchmark(spec)
    print(
        f"embeddings: {len(benchmark.train):,} train, {len(benchmark.test):,} test, "
        f"{args.entries:,} entries, D={args.dim} (generated in "
        f"{time.perf_counter() - started:.1f} s)"
    )
    print(f"{'sweep':<14} {'rows':>5} {'search s':>9} {'1 class s':>10} {'6 classes s':>12} "
          f"{'9 classes s':>12} {'total s':>8}")  # fmt: skip
    for name, config in SWEEPS.items():
        started = time.perf_counter()
        dictionary = dictionaries[SYNTHETIC_DICTIONARY]
        searches = {
            SYNTHETIC_DICTIONARY: search_test_split(benchmark.test, dictionary, max(config.ks))
        }
        searched = time.perf_counter() - started
        seconds = []
        class_work = ClassWork(benchmark, dictionaries)
        for count in (1, 6, 9):
            setting = Setting(f"c{count}", f"{count}", cifar10_trials(count))
            result = run_setting(
                benchmark, dictionaries, searches, setting, config, seed=0, class_work=class_work
            )
            seconds.append(result.seconds)
        total = time.perf_counter() - started
        print(f"{name:<14} {len(config.rows()):>5} {searched:>9.2f} {seconds[0]:>10.2f} "
              f"{seconds[1]:>12.2f} {seconds[2]:>12.2f} {total:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
