"""AutoPrune on the digits data: compression and accuracy vs dense and AGP, and the ablation of its terms.

    python benchmarks/autoprune_digits.py [--seeds 3] [--epochs 40] [--archs lenet300100 lenet5] [--ablations NAME ...]

For each network and seed, with the same epoch budget:

- dense: plain training on the whole training split;
- dense (W's half): plain training on the half of the training split that W sees in the bi-level
  runs (``DigitsDataModule(aux_fraction=0.5)`` without the callback), which separates the cost of
  the split from the cost of pruning: "Δ vs half" compares with it;
- AutoPrune (bi-level): ``AutoPruneCallback()`` with default arguments on ``DigitsDataModule(aux_fraction=0.5)``
  (the paper's 1:1 split: W learns on one half, M on the other);
- AutoPrune (train batches): the same callback without an auxiliary split, so W learns on all
  training data and M on the same batches (the callback warns about it);
- AGP: ``IterativeMagnitude(schedule="agp")`` on the whole training split, at the sparsity the
  bi-level AutoPrune run of that seed reached; "half": the same on W's half of the split (the
  data the bi-level AutoPrune run trains W on);
- ablations of the bi-level run: each consistency term off, the leaky-ReLU STE's former default
  slope 0.1, the other two STEs, the paper's ``reg=5e-2`` with our normalisation, and
  ``paper_defaults=True`` (µ = 5e-2 on the unnormalised loss signal), also with ``init=0.1`` and with Adam
  on ``M`` (the paper's initial value and optimizer of ``M`` are not known here).

Compression = total / non-zero weights of the Conv/Linear layers; FLOPs kept = non-zero
multiply-adds / dense (fvcore's per-layer counts, one multiply-add = one FLOP, times each layer's
density). Accuracy is on the test split (270 images: one image is 0.37 points).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier, IterativeMagnitude, count_flops, sparsity_report

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning_prune").setLevel(logging.ERROR)

ABLATIONS: dict[str, dict[str, Any]] = {
    "- sensitivity": {"sensitivity": False},
    "- correlation": {"correlation": False},
    "- direction": {"direction": False},
    "ste_slope=0.1": {"ste_slope": 0.1},
    "ste=linear": {"ste": "linear"},
    "ste=softplus": {"ste": "softplus"},
    "paper reg=5e-2": {"reg": 5e-2},
    "paper_defaults=True": {"paper_defaults": True},
    "paper_defaults, init=0.1": {"paper_defaults": True, "init": 0.1},
    "paper_defaults, init=0.1, adam": {"paper_defaults": True, "init": 0.1, "aux_optimizer": "adam"},
}


def run(arch: str, seed: int, epochs: int, callback: Optional[pl.Callback], aux_fraction: float = 0.0) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(arch)
    data = DigitsDataModule(seed=seed, aux_fraction=aux_fraction)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[callback] if callback else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(model, data)
    accuracy = trainer.test(model, data, verbose=False)[0]["test/acc"]
    report = sparsity_report(model)
    flops = count_flops(model, model.example_input_array)
    removed = sum(flops.by_module[row.layer] * (1 - row.nonzero / row.total) for row in report.layers)
    return {
        "accuracy": 100 * accuracy,
        "compression": report.total.total / max(1, report.total.nonzero),
        "sparsity": report.sparsity,
        "flops": 100 * (flops.total - removed) / flops.total,
    }


def mean_std(values: list[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--archs", nargs="+", default=["lenet300100", "lenet5"])
    parser.add_argument("--no-ablation", action="store_true", help="only dense, AutoPrune and AGP")
    parser.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS), help="which ablation rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for arch in args.archs:
        rows: dict[str, list[dict[str, float]]] = {}
        for seed in range(args.seeds):
            rows.setdefault("dense", []).append(run(arch, seed, args.epochs, None))
            rows.setdefault("dense (W's half)", []).append(run(arch, seed, args.epochs, None, aux_fraction=0.5))
            bilevel = run(arch, seed, args.epochs, AutoPruneCallback(verbose=False), aux_fraction=0.5)
            rows.setdefault("AutoPrune (bi-level)", []).append(bilevel)
            rows.setdefault("AutoPrune (train batches)", []).append(run(arch, seed, args.epochs, AutoPruneCallback(verbose=False)))
            for name, fraction in (("AGP, same sparsity", 0.0), ("AGP, same sparsity, half", 0.5)):
                agp = IterativeMagnitude(sparsity=round(bilevel["sparsity"], 4), schedule="agp", verbose=False)
                rows.setdefault(name, []).append(run(arch, seed, args.epochs, agp, aux_fraction=fraction))
            if not args.no_ablation:
                for name in args.ablations:
                    kwargs = ABLATIONS[name]
                    callback = AutoPruneCallback(verbose=False, **kwargs)
                    rows.setdefault(f"AutoPrune {name}", []).append(run(arch, seed, args.epochs, callback, aux_fraction=0.5))
        dense = statistics.mean(r["accuracy"] for r in rows["dense"])
        half = statistics.mean(r["accuracy"] for r in rows["dense (W's half)"])
        print(f"\n{arch} on digits, {args.epochs} epochs, {args.seeds} seeds (mean ± std)")
        print(
            f"| {'run':<28} | {'test accuracy %':>15} | {'Δ vs dense':>10} | {'Δ vs half':>9} | {'compression':>14} "
            f"| {'FLOPs kept %':>13} |"
        )
        print(f"|{'-' * 30}|{'-' * 16}:|{'-' * 11}:|{'-' * 10}:|{'-' * 15}:|{'-' * 14}:|")
        for name, results in rows.items():
            accuracy = [r["accuracy"] for r in results]
            compression = mean_std([r["compression"] for r in results], 1) + "x"
            flops = mean_std([r["flops"] for r in results], 1)
            delta, delta_half = statistics.mean(accuracy) - dense, statistics.mean(accuracy) - half
            print(
                f"| {name:<28} | {mean_std(accuracy):>15} | {delta:>+10.2f} | {delta_half:>+9.2f} | {compression:>14} "
                f"| {flops:>13} |"
            )


if __name__ == "__main__":
    main()
