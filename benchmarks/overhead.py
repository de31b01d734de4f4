"""Per-step overhead of each pruning callback: step time with the callback active / the same dense step,
plus aten ops and host synchronisations per training step (``lightning_prune.diagnostics.count_ops``).

    python benchmarks/overhead.py [--quick] [--rounds 5] [--steps 8] [--models resnet20 resnet50] [--threads N] [--size 32]
        [--variants dense "AutoPrune channel" ...]

For each model (``build_network("resnet20")``, ``build_network("resnet50")``, 3x32x32 inputs (``--size``),
random data in memory) every round runs one short ``Trainer.fit`` per variant, in turn (dense, IterativeMagnitude
element, IterativeMagnitude channel, AutoPrune element and channel learning ``M`` (``end_epoch=1``) and
fine-tuning under fixed masks (``end_epoch=0``), Lightning's ``ModelPruning``, and a gate epoch of
GatePruningFromScratch (``gate_epochs=2``: epoch 1 is its second gate epoch)), so all variants see the same machine load. A training step is timed
from the first ``on_train_batch_start`` to the last ``on_train_batch_end`` hook (forward, backward,
optimizer step and every callback's batch hooks), in the second epoch only (every callback is active
by then: IterativeMagnitude and ModelPruning prune 90% at epoch 0); the ratio is the median step time
over the median dense step time of the same round, then the median over rounds. Op and sync counts are taken
on one further step and are device-independent.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import time
from collections import Counter
import warnings
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.report import Section, machine, merge_section
from lightning_prune import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude, build_network
from lightning_prune.diagnostics import OpCount, _Dispatch, _Function


class Net(pl.LightningModule):
    def __init__(self, arch: str, size: int = 32) -> None:
        super().__init__()
        self.network = build_network(arch, num_classes=10, in_channels=3, image_size=size)
        self.example_input_array = torch.zeros(1, 3, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepStart(pl.Callback):
    """First in the callback list: starts the clock (and, on the counted step, the op counter)."""

    def __init__(self, count_step: int) -> None:
        self.count_step = count_step
        self.times: list[float] = []
        self.count: Optional[OpCount] = None
        self._modes: list[Any] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 1 and batch_idx == self.count_step:
            self.count = OpCount()
            self._modes = [_Function(self.count), _Dispatch(self.count)]
            for mode in self._modes:
                mode.__enter__()
        self._started = time.perf_counter()


class StepEnd(pl.Callback):
    """Last in the callback list: stops the clock."""

    def __init__(self, start: StepStart) -> None:
        self.start = start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self.start._started
        if self.start._modes:
            for mode in reversed(self.start._modes):
                mode.__exit__(None, None, None)
            self.start._modes = []
        elif trainer.current_epoch == 1 and batch_idx > 0:  # the first step of an epoch warms caches up
            self.start.times.append(elapsed)


def loader(batch: int, steps: int, seed: int, size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * steps, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (batch * steps,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


GATE = "GatePruningFromScratch gate phase"
VARIANTS: dict[str, Callable[[DataLoader], Optional[pl.Callback]]] = {
    "dense": lambda aux: None,
    "IterativeMagnitude element": lambda aux: IterativeMagnitude(
        sparsity=0.9, schedule="one_shot", start_epoch=0, end_epoch=0, verbose=False
    ),
    "IterativeMagnitude channel": lambda aux: IterativeMagnitude(
        sparsity=0.5, schedule="one_shot", start_epoch=0, end_epoch=0, granularity="channel", verbose=False
    ),
    "AutoPrune element": lambda aux: AutoPruneCallback(aux_dataloader=aux, end_epoch=1, verbose=False),
    "AutoPrune element fine-tune": lambda aux: AutoPruneCallback(aux_dataloader=aux, end_epoch=0, verbose=False),
    "AutoPrune channel": lambda aux: AutoPruneCallback(aux_dataloader=aux, end_epoch=1, granularity="channel", verbose=False),
    "AutoPrune channel fine-tune": lambda aux: AutoPruneCallback(aux_dataloader=aux, end_epoch=0, granularity="channel", verbose=False),
    "ModelPruning (Lightning)": lambda aux: ModelPruning(
        "l1_unstructured", amount=0.9, apply_pruning=lambda epoch: epoch == 0, use_lottery_ticket_hypothesis=False
    ),
    GATE: lambda aux: GatePruningFromScratch(flops_ratio=0.5, gate_epochs=2, select="last", verbose=False),
}


def run(arch: str, variant: str, batch: int, steps: int, seed: int, size: int = 32) -> tuple[list[float], Optional[OpCount]]:
    """Step times (seconds) of epoch 1 and the op count of one step of ``variant`` (inputs 3 x ``size`` x ``size``)."""
    pl.seed_everything(seed, workers=True)
    model = Net(arch, size)
    train, aux = loader(batch, steps + 1, seed, size), loader(batch, steps + 1, seed + 1, size)
    start = StepStart(count_step=steps)
    callback = VARIANTS[variant](aux)
    callbacks = [start] + ([callback] if callback is not None else []) + [StepEnd(start)]
    # epoch 1 is timed; AutoPrune's M learns through it (`end_epoch`=1) and needs an epoch after it to fine-tune;
    # GatePruningFromScratch's gate epochs (0 and 1) leave one to train the pruned network
    epochs, limit = 3 if isinstance(callback, (AutoPruneCallback, GatePruningFromScratch)) else 2, steps + 1
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=limit,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(model, train)
    return start.times, start.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 steps, batch 2, resnet20 only")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per fit (epoch 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet50"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--size", type=int, default=32, help="input height and width (224: ImageNet's)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="a subset of the variants (dense always runs)")
    parser.add_argument("--results", type=pathlib.Path, default=None,
                        help="merge the table as a section into this directory's results.json and RESULTS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for logger in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    if args.quick:
        args.rounds, args.steps, args.batch, args.models = 1, 3, 2, ["resnet20"]
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(VARIANTS) if not args.variants else ["dense", *(name for name in args.variants if name != "dense")]
    lines = [f"rounds {args.rounds}, {args.steps} timed steps/fit, batch {args.batch}x3x{args.size}x{args.size}, "
             f"CPU threads {torch.get_num_threads()}; {machine()['date']}, commit `{machine()['git_commit'][:12]}`, "
             f"1-min load average {machine()['load_average_1min']} (step times are of a shared machine; ops and syncs "
             "are device- and load-independent)", "",
             "| model | variant | step ms | / dense | aten ops/step | host syncs/step | transfers/step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines))
    sources: dict[tuple[str, str], Counter] = {}
    for arch in args.models:
        times: dict[str, list[float]] = {name: [] for name in names}
        ratios: dict[str, list[float]] = {name: [] for name in names}
        counts: dict[str, Optional[OpCount]] = {}
        for round_ in range(args.rounds):
            medians = {}
            for name in names:
                step_times, counts[name] = run(arch, name, args.batch, args.steps, seed=round_, size=args.size)
                medians[name] = statistics.median(step_times)
                times[name].append(medians[name])
            for name in names:
                ratios[name].append(medians[name] / medians["dense"])
        for name in names:
            count = counts[name]
            lines.append(
                f"| {arch} | {name} | {1000 * statistics.median(times[name]):.1f} | {statistics.median(ratios[name]):.3f} "
                f"| {count.ops} | {count.syncs} | {count.transfers} |"
            )
            print(lines[-1])
        sources.update({(arch, name): counts[name].sync_ops for name in names if counts[name].sync_ops})
    tail = ["", "Host syncs per step by source (see lightning_prune.diagnostics):"]
    tail += [f"- {arch}, {name}: " + ", ".join(f"{reason} x{n}" for reason, n in reasons.most_common())
             for (arch, name), reasons in sources.items()] or ["- none"]
    print("\n".join(tail))
    lines += tail
    if args.results is not None:
        command = ("python -m benchmarks.overhead " + " ".join(f"--{key} " + (" ".join(f'"{v}"' for v in value) if isinstance(value, list) else str(value))
                                                              for key, value in vars(args).items() if value not in (None, False) and key != "results"))
        merge_section(Section(f"Ops and host syncs per step: {', '.join(names)}", "\n".join(lines),
                              command=command + " --results benchmarks/results"), args.results)


if __name__ == "__main__":
    main()
