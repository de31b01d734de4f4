"""Pruning from Scratch on the digits data (upsampled to 32x32, 3 channels): the closing-note table.

Per seed (the seed sets the data split, the shuffle and the initialisation), every network trains for
the same ``--epochs`` with the same recipe (``ImageClassifier``: SGD lr 0.05, momentum 0.9, wd 5e-4,
cosine schedule, batch 64), and test accuracy is measured on the held-out test split:

- dense: the full network;
- gates @ r: ``GatePruningFromScratch(flops_ratio=r)`` in one ``fit`` (gate phase of ``--gate-epochs``
  on random weights, then the pruned net trains from a fresh init for ``--epochs``);
- uniform @ r: the same architecture at the largest uniform width multiplier with FLOPs <= r x dense;
- L1-norm @ r: the trained dense net, channels ranked by the L1 norm of their weights (Li et al.
  2017; normalised by the group's mean norm so one global threshold compares layers), pruned to the
  same FLOPs with the same threshold search, then fine-tuned for ``--epochs`` at lr 0.01;

and the wall time of finding the structure: the gate phase vs. network slimming's pre-training (the
dense net trained ``--epochs`` with L1 on the BatchNorm scales, lambda 1e-4), measured in this run.

FLOPs are fvcore's (one multiply-add = one FLOP), recounted on the physically pruned networks.

    python benchmarks/gate_digits.py [--seeds 3] [--arch vgg_small] [--width 0.5] [--epochs 8] [--gate-epochs 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier
from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.structure import apply_plan, channel_norms, find_channel_groups


class BatchNormL1(pl.Callback):
    """Network slimming's sparsity term: adds the subgradient of ``lam * sum |gamma|`` before each step."""

    def __init__(self, lam: float = 1e-4) -> None:
        self.lam = lam

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        for module in pl_module.modules():
            if isinstance(module, nn.BatchNorm2d) and module.weight.grad is not None:
                module.weight.grad.add_(self.lam * torch.sign(module.weight.detach()))


def make_trainer(epochs: int, callbacks: tuple = ()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )


def flops(model: ImageClassifier) -> int:
    return count_flops(model, model.example_input_array).total


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def uniform_width(args: argparse.Namespace, ratio: float, dense: int) -> float:
    """Largest width multiplier whose network has at most ``ratio`` x the dense FLOPs (bisection)."""
    low, high = 0.01, args.width
    for _ in range(25):
        middle = (low + high) / 2
        if flops(ImageClassifier(args.arch, in_channels=3, image_size=32, width=middle)) <= ratio * dense:
            low = middle
        else:
            high = middle
    return low


def l1_prune(model: ImageClassifier, ratio: float) -> None:
    x = model.example_input_array
    groups = find_channel_groups(model, x)
    scores = [score / score.mean().clamp_min(1e-12) for score in channel_norms(model, groups, "l1")]
    found = search_threshold(scores, ratio, FlopsPredictor(model, x, groups))
    apply_plan(model, groups, found.plan, x)


def run_seed(seed: int, args: argparse.Namespace, results: dict[str, list[float]]) -> None:
    def data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=64, image_size=32, channels=3, seed=seed)

    def classifier(width: float = args.width, **kwargs: Any) -> ImageClassifier:
        return ImageClassifier(args.arch, in_channels=3, image_size=32, width=width, lr_schedule="cosine", **kwargs)

    def record(name: str, model: ImageClassifier, trainer: pl.Trainer, dense_flops: int) -> None:
        results.setdefault(f"{name} acc", []).append(trainer.test(model, data(), verbose=False)[0]["test/acc"])
        results.setdefault(f"{name} flops", []).append(flops(model) / dense_flops)

    pl.seed_everything(seed, verbose=False)
    dense = classifier()
    dense_flops = flops(dense)
    trainer = make_trainer(args.epochs)
    results.setdefault("dense train s", []).append(timed(lambda: trainer.fit(dense, data())))
    record("dense", dense, trainer, dense_flops)

    pl.seed_everything(seed, verbose=False)
    slimming = classifier()
    trainer = make_trainer(args.epochs, (BatchNormL1(1e-4),))
    results.setdefault("slimming pre-train s", []).append(timed(lambda: trainer.fit(slimming, data())))

    for ratio in args.ratios:
        pl.seed_everything(seed, verbose=False)
        model = classifier()
        pruning = GatePruningFromScratch(flops_ratio=ratio, gate_epochs=args.gate_epochs, verbose=False)
        trainer = make_trainer(args.gate_epochs + args.epochs, (pruning,))  # the gate epochs count in max_epochs
        trainer.fit(model, data())
        record(f"gates@{ratio}", model, trainer, dense_flops)
        results.setdefault(f"gates@{ratio} gate phase s", []).append(pruning.gate_seconds)

        pl.seed_everything(seed, verbose=False)
        model = classifier(width=uniform_width(args, ratio, dense_flops))
        trainer = make_trainer(args.epochs)
        trainer.fit(model, data())
        record(f"uniform@{ratio}", model, trainer, dense_flops)

        pl.seed_everything(seed, verbose=False)
        model = copy.deepcopy(dense)
        l1_prune(model, ratio)
        model.hparams.lr = 0.01
        trainer = make_trainer(args.epochs)
        trainer.fit(model, data())
        record(f"l1-norm@{ratio}", model, trainer, dense_flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arch", default="vgg_small")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--gate-epochs", type=int, default=5)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_prune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results: dict[str, list[float]] = {}
    started = time.perf_counter()
    for seed in range(args.seeds):
        run_seed(seed, args, results)
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)

    def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"

    print(f"\n{args.arch} width {args.width}, digits 32x32, {args.epochs} training epochs, gate phase "
          f"{args.gate_epochs} epochs, {args.seeds} seeds (mean ± std)")
    print(f"{'method':<16} {'test acc (%)':>14} {'FLOPs (MACs) ratio':>20}   per-seed acc (%)")
    names = ["dense"] + [f"{m}@{r}" for r in args.ratios for m in ("gates", "uniform", "l1-norm")]
    for name in names:
        seeds = " ".join(f"{100 * v:.2f}" for v in results[f"{name} acc"])
        print(f"{name:<16} {fmt(results[f'{name} acc'], 100):>14} {fmt(results[f'{name} flops'], 1, 3):>20}   {seeds}")
    slimming = results["slimming pre-train s"]
    for ratio in args.ratios:
        gate = results[f"gates@{ratio} gate phase s"]
        ratios = [g / s for g, s in zip(gate, slimming)]
        print(f"gate phase @{ratio}: {fmt(gate)} s vs network slimming pre-training {fmt(slimming)} s: "
              f"ratio {fmt(ratios, 1, 3)} ({args.gate_epochs} gate epochs vs {args.epochs} training epochs; "
              f"per epoch {statistics.mean(ratios) * args.epochs / max(args.gate_epochs, 1):.2f})")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
