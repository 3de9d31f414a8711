"""Compare S-KAN / KAN recipe variants WITHOUT the test set: train on the first 50,000 Fashion-MNIST
training images and score on the last 10,000 training images (a validation split).

    nice .venv/bin/python -m benchmarks.skan_validate 'kan-fast-long:0' 'skan:0:{"epochs_full": 2, "epochs_prune": 10}'

Each argument is ``entry:seed[:json recipe overrides]``; runs are sequential, nothing is cached, and
one markdown row per run is printed (validation accuracy, plus S-KAN's phase accuracies, which are
also on the validation split). Use it to choose recipes; report test accuracy only from
benchmarks/zoo_g2g_kan.py. A 10k split has a binomial standard error of about 0.3 points at 90 %.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from toolchain.core.cache import Cache
from toolchain.zoo import TrainContext
from toolchain.zoo.datasets import load_dataset
from toolchain.zoo.registry import get_entry

VAL = 10_000


def main(jobs: list[str]) -> None:
    if not jobs:
        raise SystemExit(__doc__)
    d = load_dataset("fashion-mnist", None)
    # The test arrays are replaced by the validation slice: train functions score on x_test.
    val = dataclasses.replace(d, x_train=d.x_train[:-VAL], y_train=d.y_train[:-VAL],
                              x_test=d.x_train[-VAL:], y_test=d.y_train[-VAL:])
    print("| run | val acc | full pool (val) | selected (val) | choices | s |\n| --- | --- | --- | --- | --- | --- |")
    for job in jobs:
        name, seed, *over = job.split(":", 2)
        entry = get_entry(name)
        recipe = {**entry.recipe, **(json.loads(over[0]) if over else {})}
        torch.manual_seed(int(seed))
        model = entry.build(recipe)
        t0 = time.monotonic()
        # KAN and S-KAN train on no other entry's weights: the cache is never written.
        m = entry.train(model, TrainContext(data=val, cache=Cache(), seed=int(seed), progress=False), recipe)
        print(f"| {job} | {m['test_accuracy']:.4f} | {m.get('full_pool_accuracy', '-')} | "
              f"{m.get('selected_untuned_accuracy', '-')} | {m.get('choices', '-')} | {time.monotonic() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
