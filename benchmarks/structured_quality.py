"""Accuracy vs FLOPs ratio of structured pruning methods at the same training budget (digits, 32x32).

Per seed (it sets the data split, the shuffle and every initialisation) and FLOPs target r, each method
produces a physically pruned network with fvcore FLOPs <= r x dense (one multiply-add = one FLOP), which
then trains for the same ``epochs`` with ``ImageClassifier``'s recipe (SGD momentum 0.9, wd 5e-4, cosine
schedule, batch 64); test accuracy is measured on the held-out test split. Methods (``METHODS``):

- gates: ``GatePruningFromScratch(flops_ratio=r)``: a gate phase of ``gate_epochs`` on the random
  initialisation, then the pruned net trains from a fresh init for ``epochs``, in one ``fit``;
- uniform: every channel group keeps the same fraction (``baselines.uniform_plan``), fresh init, ``epochs``;
- L1-norm (Torch-Pruning): the dense net trained for ``epochs``, pruned by ``baselines.torch_pruning_l1``
  (Li et al. 2017, one pruning ratio for every layer), fine-tuned for ``epochs`` at lr 0.01;
- network slimming: the dense net trained for ``epochs`` with ``lambda * sum |gamma|`` on the BatchNorm
  scales (Liu et al. 2017), pruned by ``baselines.slimming_plan`` (global threshold on |gamma|),
  fine-tuned for ``epochs`` at lr 0.01.

The L1-norm and slimming pre-training (``epochs`` more) is not counted in the budget; its wall time
is what ``benchmarks/time_to_structure.py`` compares with the gate phase.

    python -m benchmarks.structured_quality --suite quick --out outputs/structured_quality
"""

from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
from torch import nn

from benchmarks.baselines import BatchNormL1, slimming_plan, torch_pruning_l1, uniform_plan
from benchmarks.gate_digits import flops, make_trainer
from benchmarks.report import Behind, Section, Suite, anchor, fmt_mean_std, mean_std, one_thread, save_figure, table
from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier
from lightning_prune.flops import FlopsPredictor
from lightning_prune.gate_search import reinitialise
from lightning_prune.structure import ChannelPlan, apply_plan, find_channel_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One suite's configuration: network, epochs per training, gate-phase epochs, seeds, FLOPs targets."""

    arch: str = "resnet20"
    width: float = 0.5
    epochs: int = 8
    gate_epochs: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = (0.75, 0.5, 0.25)
    finetune_lr: float = 0.01
    slimming_l1: float = 1e-4


SETTINGS: dict[str, Setting] = {
    "quick": Setting(arch="vgg_small", epochs=2, gate_epochs=1, seeds=(0,)),
    "full": Setting(),
}


def start(suite: Suite, out_dir: pathlib.Path, settings: dict[str, Any]) -> Any:
    """A module's ``run`` begins here: ``suite`` checked, Lightning's and fvcore's per-fit chatter silenced
    (benchmarks print their own tables), ``out_dir`` created; returns the suite's setting."""
    if suite not in settings:
        raise ValueError(f"`suite` must be one of {sorted(settings)}, got {suite!r}.")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_prune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    return settings[suite]


class TrainLoopTimer(pl.Callback):
    """Wall time of the training loop, ``on_train_start`` to ``on_train_end`` (per-epoch validation included)."""

    seconds: float = float("nan")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._started


def conv_widths(model: nn.Module) -> list[int]:
    """Output channels of every Conv2d, in model order."""
    return [module.out_channels for module in model.modules() if isinstance(module, nn.Conv2d)]


class SeedRun:
    """Everything one seed's methods share: data, fresh classifiers, training, and the pre-trained nets."""

    def __init__(self, setting: Setting, seed: int) -> None:
        self.setting, self.seed = setting, seed
        dense = self.classifier()
        self.dense_flops = flops(dense)
        self.dense_params = sum(p.numel() for p in dense.parameters())
        self.dense_widths = conv_widths(dense)

    def data(self) -> DigitsDataModule:
        return DigitsDataModule(batch_size=64, image_size=32, channels=3, seed=self.seed)

    def classifier(self) -> ImageClassifier:
        """A fresh, seeded dense classifier (the same initialisation every call)."""
        pl.seed_everything(self.seed, verbose=False)
        return ImageClassifier(self.setting.arch, in_channels=3, image_size=32, width=self.setting.width, lr_schedule="cosine")

    def fit(self, model: ImageClassifier, callbacks: Sequence[pl.Callback] = ()) -> float:
        """Train ``model`` for ``epochs`` (seeded; after the gate epochs of a ``GatePruningFromScratch``, which count in
        the fit's ``max_epochs``); returns the training loop's wall time in seconds."""
        timer = TrainLoopTimer()
        pl.seed_everything(self.seed, verbose=False)
        gate_epochs = sum(c.gate_epochs for c in callbacks if isinstance(c, GatePruningFromScratch))
        make_trainer(self.setting.epochs + gate_epochs, (*callbacks, timer)).fit(model, self.data())
        return timer.seconds

    def test(self, model: ImageClassifier) -> float:
        return make_trainer(0).test(model, self.data(), verbose=False)[0]["test/acc"]

    def fresh_with_plan(self, plan_of: Callable[[ImageClassifier, list, FlopsPredictor], ChannelPlan]) -> ImageClassifier:
        """A fresh classifier pruned to ``plan_of(model, groups, predictor)``, the whole network re-initialised."""
        model = self.classifier()
        x = model.example_input_array
        groups = find_channel_groups(model, x)
        plan = plan_of(model, groups, FlopsPredictor(model, x, groups))
        apply_plan(model, groups, plan, x)
        reinitialise(model)
        return model

    @cached_property
    def dense(self) -> ImageClassifier:
        """The dense net trained for ``epochs``."""
        model = self.classifier()
        self.fit(model)
        return model

    @cached_property
    def slimming(self) -> tuple[ImageClassifier, float]:
        """The dense net trained for ``epochs`` with network slimming's L1 penalty on |gamma|, and its seconds."""
        model = self.classifier()
        return model, self.fit(model, (BatchNormL1(self.setting.slimming_l1),))

    def fine_tuned(self, model: ImageClassifier) -> ImageClassifier:
        model.hparams.lr = self.setting.finetune_lr
        self.fit(model)
        return model


Method = Callable[[SeedRun, float], ImageClassifier]


def gates(**options: Any) -> Method:
    """``GatePruningFromScratch(flops_ratio=r, gate_epochs=..., **options)`` in one ``fit``."""

    def method(run: SeedRun, ratio: float) -> ImageClassifier:
        model = run.classifier()
        pruning = GatePruningFromScratch(flops_ratio=ratio, gate_epochs=run.setting.gate_epochs, verbose=False, **options)
        run.fit(model, (pruning,))
        return model

    return method


def uniform(run: SeedRun, ratio: float) -> ImageClassifier:
    model = run.fresh_with_plan(lambda _, groups, predictor: uniform_plan(groups, predictor, ratio))
    run.fit(model)
    return model


def l1_torch_pruning(run: SeedRun, ratio: float) -> ImageClassifier:
    model = copy.deepcopy(run.dense)
    classifier = [name for name, module in model.network.named_modules() if isinstance(module, nn.Linear)][-1]
    torch_pruning_l1(model.network, model.example_input_array, ratio, ignored=[classifier])
    return run.fine_tuned(model)


def network_slimming(run: SeedRun, ratio: float) -> ImageClassifier:
    model = copy.deepcopy(run.slimming[0])
    x = model.example_input_array
    groups = find_channel_groups(model, x)
    apply_plan(model, groups, slimming_plan(model, groups, FlopsPredictor(model, x, groups), ratio), x)
    return run.fine_tuned(model)


# One line per method; a GatePruningFromScratch variant is one more `gates(...)` line with its options.
METHODS: dict[str, Method] = {
    "gates, inner sites (paper)": gates(gate_sites="inner"),
    "gates, all sites": gates(gate_sites="all"),
    "uniform": uniform,
    "L1-norm (Torch-Pruning)": l1_torch_pruning,
    "network slimming": network_slimming,
}


@dataclass
class Results:
    """Per-seed numbers: ``values[(method, ratio)][metric]`` lists one value per seed."""

    values: dict[tuple[str, float], dict[str, list[Any]]] = field(default_factory=dict)

    def add(self, method: str, ratio: float, **metrics: Any) -> None:
        entry = self.values.setdefault((method, ratio), {})
        for name, value in metrics.items():
            entry.setdefault(name, []).append(value)

    def as_json(self) -> dict[str, dict[str, dict[str, list[Any]]]]:
        out: dict[str, dict[str, dict[str, list[Any]]]] = {}
        for (method, ratio), metrics in self.values.items():
            out.setdefault(method, {})[str(ratio)] = metrics
        return out


def plot(results: Results, setting: Setting, dense_acc: list[float], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        entries = [results.values[(method, r)] for r in setting.ratios]
        axes.errorbar(
            [statistics.mean(e["flops_ratio"]) for e in entries],
            [100 * statistics.mean(e["acc"]) for e in entries],
            yerr=[100 * mean_std(e["acc"])[1] for e in entries],
            marker="o", capsize=3, label=method,
        )
    axes.axhline(100 * statistics.mean(dense_acc), color="black", linestyle="--", label="dense")
    axes.set_xlabel("FLOPs ratio (fvcore, pruned / dense)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"{setting.arch} x{setting.width}, digits 32x32, {setting.epochs} epochs, {len(setting.seeds)} seed(s)")
    axes.legend(fontsize=8)
    save_figure(figure, path, dpi=120)


@one_thread()
def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    """Train every method at every FLOPs target for each seed of ``suite``; tables, figure and numbers."""
    setting = start(suite, out_dir, SETTINGS)
    out_dir = pathlib.Path(out_dir)
    started = time.perf_counter()
    results, dense_acc = Results(), []
    for seed in setting.seeds:
        seed_run = SeedRun(setting, seed)
        for ratio in setting.ratios:
            for name, method in METHODS.items():
                method_started = time.perf_counter()
                model = method(seed_run, ratio)
                method_seconds = time.perf_counter() - method_started
                params = sum(p.numel() for p in model.parameters())
                results.add(name, ratio, acc=seed_run.test(model), flops_ratio=flops(model) / seed_run.dense_flops,
                            params_ratio=params / seed_run.dense_params, seconds=method_seconds,
                            conv_width_ratios=[k / n for k, n in zip(conv_widths(model), seed_run.dense_widths)])
                log.info("seed %d, r=%s, %s: %.0f s", seed, ratio, name, method_seconds)
        dense_acc.append(seed_run.test(seed_run.dense))
    header = ["method"] + [f"r = {r}: acc (%)" for r in setting.ratios] + [f"r = {r}: FLOPs ratio" for r in setting.ratios]
    rows = [["dense"] + [fmt_mean_std(dense_acc, 2, scale=100)] * len(setting.ratios) + ["1.000"] * len(setting.ratios)]
    for method in METHODS:
        entries = [results.values[(method, r)] for r in setting.ratios]
        rows.append([method] + [fmt_mean_std(e["acc"], 2, scale=100) for e in entries] + [fmt_mean_std(e["flops_ratio"], 3) for e in entries])
    narrowest = [
        [method] + [fmt_mean_std([min(widths) for widths in results.values[(method, r)]["conv_width_ratios"]], 3) for r in setting.ratios]
        for method in METHODS
    ]
    behind = []
    baselines = [method for method in METHODS if not method.startswith("gates")]
    for method in (m for m in METHODS if m.startswith("gates")):
        lost, narrowest_kept = [], []
        for r in setting.ratios:
            ours = results.values[(method, r)]["acc"]
            best = max(baselines, key=lambda b: statistics.mean(results.values[(b, r)]["acc"]))
            theirs = results.values[(best, r)]["acc"]
            spread = mean_std(ours)[1] + mean_std(theirs)[1]
            if statistics.mean(ours) < statistics.mean(theirs) - spread - 0.0075:  # beyond the seeds' spread plus 2 test images
                lost.append(f"{r}: {fmt_mean_std(ours, 2, scale=100)}% vs {best} {fmt_mean_std(theirs, 2, scale=100)}%")
                narrowest_kept.append(statistics.mean(min(w) for w in results.values[(method, r)]["conv_width_ratios"]))
        if lost:
            behind.append(Behind(
                anchor(f"behind structured {setting.arch} {method}"),
                f"{setting.arch}: {method} trail the best baseline at FLOPs ratio " + "; ".join(lost),
                f"the gates learn on random weights for {setting.gate_epochs} gate epoch(s) of a small data set, and one "
                f"global threshold leaves the narrowest layer {min(narrowest_kept):.3f}-{max(narrowest_kept):.3f} of its "
                "channels (the paper's CIFAR setting: 10 gate epochs on 50,000 images); the baselines read a trained network",
            ))
    figure = "structured_quality.png"
    plot(results, setting, dense_acc, out_dir / figure)
    seconds = time.perf_counter() - started
    markdown = "\n\n".join([
        f"**Accuracy vs FLOPs ratio at the same training budget** ({setting.arch} width {setting.width}, digits "
        f"upsampled to 32x32, {len(setting.seeds)} seed(s), mean ± std over seeds).",
        "Every pruned network trains for the same " f"{setting.epochs} epochs after its structure is found: gates "
        f"(GatePruningFromScratch, {setting.gate_epochs} gate epoch(s) on random weights) and uniform width from a fresh "
        "initialisation; L1-norm (Torch-Pruning MetaPruner, L1 filter norm, one pruning ratio per layer) and network "
        f"slimming (L1 {setting.slimming_l1} on BatchNorm scales, global |gamma| threshold) fine-tune a net pre-trained "
        f"for {setting.epochs} epochs at lr {setting.finetune_lr} (pre-training not counted). FLOPs ratio: fvcore's "
        "recount of the physically pruned net / the dense net (one multiply-add = one FLOP); r is the target "
        "(every method lands at or below it). Test accuracy on the held-out 15% test split.",
        table(header, rows),
        "The narrowest layer each method leaves: min over Conv2d layers of kept / original output channels "
        "(every layer's value is in the data, `conv_width_ratios`).",
        table(["method"] + [f"r = {r}" for r in setting.ratios], narrowest),
    ])
    return Section(
        title="Structured pruning: accuracy vs FLOPs ratio",
        markdown=markdown,
        figures=[figure],
        data={"setting": asdict(setting), "dense_acc": dense_acc, "results": results.as_json(), "seconds": seconds},
        notes=[
            f"suite {suite!r} took {seconds:.0f} s on one thread; per-method seconds and kept / original output "
            "channels of every Conv2d (conv_width_ratios) are in the data",
            "farthest below the FLOPs target (target - achieved FLOPs ratio, any seed): " + ", ".join(
                f"{method} {max(r - f for r in setting.ratios for f in results.values[(method, r)]['flops_ratio']):.3f}"
                for method in METHODS
            ) + " (one fraction or one pruning ratio for every group moves in steps of whole channels of the "
            "narrowest groups; a global threshold moves one channel at a time)",
        ],
        behind=behind,
    )


def main(description: str, run_suite: Callable[[Suite, pathlib.Path], Section]) -> None:
    """The command line every benchmark module shares: ``--suite quick|full --out DIR``, prints the markdown."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SETTINGS), default="quick")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    args = parser.parse_args()
    result = run_suite(args.suite, args.out)
    print(f"# {result.title}\n\n{result.markdown}\n")
    for note in result.notes:
        print(f"- {note}")
    for item in result.behind:
        print(f"- behind: {item.claim} ({item.reason})")


if __name__ == "__main__":
    main(__doc__, run)
