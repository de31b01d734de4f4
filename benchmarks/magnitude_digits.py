"""IterativeMagnitude on the digits data: accuracy at 90% sparsity and wall time vs Lightning's ModelPruning.

    python benchmarks/magnitude_digits.py [--seeds 3] [--epochs 20] [--sparsity 0.9] [--arch lenet300100]

Every seed trains three runs with the same budget: dense, `IterativeMagnitude` (AGP) and Lightning's
`ModelPruning` (global L1 unstructured) with its compounding `amount` converted so that both reach
the same final sparsity at the same epochs. The three variants are interleaved, so the wall-time
ratio is measured under the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning
from torch import nn

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude, PruningSchedule, sparsity_report


def model_pruning(
    schedule: PruningSchedule, sparsity: float, parameters_to_prune: Optional[list[tuple[nn.Module, str]]] = None,
    use_lottery_ticket_hypothesis: bool = True,
) -> ModelPruning:
    """Lightning's callback with `amount` (a fraction of the *remaining* weights) made equivalent to absolute targets.

    ``parameters_to_prune`` and ``use_lottery_ticket_hypothesis`` go to ``ModelPruning`` (its defaults: every
    module's ``weight``, BatchNorm included, and rewinding the kept weights to their initial values at each event).
    """
    if schedule.events[0] < 1:
        raise ValueError(
            f"`schedule` must start at epoch >= 1 for ModelPruning (it prunes at the end of the epoch before), got {schedule.events}."
        )
    targets = {epoch: schedule.fraction(epoch) * sparsity for epoch in schedule.events}

    def amount(epoch: int) -> float:
        # ModelPruning prunes at the end of `epoch`; IterativeMagnitude at the start of `epoch + 1`.
        target = targets.get(epoch + 1)
        if target is None:
            return 0.0
        previous = max([t for e, t in targets.items() if e < epoch + 1], default=0.0)
        return 1.0 - (1.0 - target) / (1.0 - previous)

    return ModelPruning(
        "l1_unstructured", parameters_to_prune=parameters_to_prune, amount=amount, use_global_unstructured=True,
        use_lottery_ticket_hypothesis=use_lottery_ticket_hypothesis, verbose=0,
    )


def run(arch: str, seed: int, epochs: int, callback: pl.Callback | None) -> tuple[float, float, float, float]:
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(arch)
    data = DigitsDataModule(seed=seed)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[callback] if callback else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start
    validation = float(trainer.callback_metrics["val/acc"])
    accuracy = trainer.test(model, data, verbose=False)[0]["test/acc"]
    return validation, accuracy, sparsity_report(model).sparsity, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--arch", default="lenet300100")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    schedule = PruningSchedule("agp", start_epoch=4, end_epoch=12, frequency=2)
    results: dict[str, list[tuple[float, float, float, float]]] = {"dense": [], "IterativeMagnitude": [], "ModelPruning": []}
    for seed in range(args.seeds):
        results["dense"].append(run(args.arch, seed, args.epochs, None))
        results["IterativeMagnitude"].append(
            run(args.arch, seed, args.epochs, IterativeMagnitude(args.sparsity, "agp", 4, 12, 2, verbose=False))
        )
        results["ModelPruning"].append(run(args.arch, seed, args.epochs, model_pruning(schedule, args.sparsity)))

    def mean_std(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

    print(f"{args.arch} on digits, {args.epochs} epochs, AGP to sparsity {args.sparsity} at epochs {schedule.events}, "
          f"{args.seeds} seeds (mean ± std)")
    print(f"{'run':<20} {'val accuracy':>18} {'test accuracy':>18} {'sparsity':>10} {'fit seconds':>18}")
    for name, rows in results.items():
        validation, accuracy, sparsity, seconds = zip(*rows)
        print(
            f"{name:<20} {mean_std(list(validation)):>18} {mean_std(list(accuracy)):>18} "
            f"{statistics.mean(sparsity):>10.4f} {mean_std(list(seconds)):>18}"
        )
    ours = sum(r[3] for r in results["IterativeMagnitude"])
    theirs = sum(r[3] for r in results["ModelPruning"])
    dense = sum(r[3] for r in results["dense"])
    print(f"wall-time ratio IterativeMagnitude / ModelPruning: {ours / theirs:.3f}")
    print(f"wall-time ratio IterativeMagnitude / dense fit:    {ours / dense:.3f}")


if __name__ == "__main__":
    main()
