"""Unstructured pruning quality: test accuracy vs compression, ShrinkBench style (Blalock et al. 2020).

Every run of one model trains the same number of epochs ``E`` from the same seeded initialisation on the
same split; pruning methods reach their final masks at the start of the same epoch ``P`` and then
fine-tune ``E - P`` epochs under fixed masks (the same fine-tuning budget for every method):

- ``IterativeMagnitude``: ``one_shot`` (one event at ``P``), ``iterative`` and ``agp`` (events every
  ``f`` epochs from ``S`` to ``P``), each with ``scope="global"`` (one threshold over all layers) and
  ``scope="layer"`` (every layer at the target);
- random: a random keep-mask with exactly round(s·N) zeros over all pruned weights, drawn once at ``P``
  (the baseline every method has to beat);
- Lightning's ``ModelPruning``: global L1 unstructured on the same layers, AGP targets converted to its
  compounding ``amount``, no lottery-ticket rewinding (its default rewinds kept weights to their initial
  values, which would give it a different training budget);
- ``AutoPruneCallback`` (default arguments, the paper's 1:1 split of the training data into W's and M's
  halves, auxiliary steps in epochs ``0 .. P - 1``): it has no target, so its point is the compression it reaches.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.magnitude_digits import model_pruning  # noqa: E402
from benchmarks.report import Behind, SEEDS, Section, Suite, anchor, fmt_mean_std, mean_std, one_thread, save_figure, table  # noqa: E402
from lightning_prune import (  # noqa: E402
    AutoPruneCallback,
    DigitsDataModule,
    ImageClassifier,
    IterativeMagnitude,
    PruningSchedule,
    count_flops,
    sparsity_report,
)
from lightning_prune.masks import MaskSet  # noqa: E402
from lightning_prune.report import nonzero_flops  # noqa: E402
from lightning_prune.targets import select_modules  # noqa: E402


class RandomPruning(pl.Callback):
    """Baseline: at the start of epoch ``epoch``, keep a uniformly random subset of all Conv/Linear weights
    with exactly round(``sparsity`` · N) zeros, and write the zeros again after every training step (so every
    forward pass sees them, as with the other methods)."""

    def __init__(self, sparsity: float, epoch: int, seed: int) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
        self.sparsity, self.epoch, self.seed = sparsity, epoch, seed
        self.masks: Optional[MaskSet] = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        names = [f"{name}.weight" for name in select_modules(pl_module)]
        sizes = [pl_module.get_parameter(name).numel() for name in names]
        generator = torch.Generator().manual_seed(self.seed)
        keep = torch.ones(sum(sizes), dtype=torch.bool)
        keep[torch.randperm(sum(sizes), generator=generator)[: round(self.sparsity * sum(sizes))]] = False
        self.masks = MaskSet(pl_module)
        shapes = [pl_module.get_parameter(name).shape for name in names]
        self.masks.update({name: part.view(shape) for name, part, shape in zip(names, keep.split(sizes), shapes)})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.masks is not None:
            self.masks.apply_to_weights()


@dataclass(frozen=True)
class Setting:
    """One model's data, epochs and schedule: ``E`` epochs, events from ``S`` to ``P`` every ``f``."""

    arch: str
    image_size: int
    channels: int
    epochs: int
    start: int
    end: int
    frequency: int
    targets: tuple[float, ...]
    methods: tuple[str, ...]
    label: str = ""

    def schedule(self, kind: str) -> PruningSchedule:
        return PruningSchedule(kind, self.end if kind == "one_shot" else self.start, self.end, self.frequency)  # type: ignore[arg-type]


MAGNITUDE = [f"{kind} ({scope})" for scope in ("global", "layer") for kind in ("one-shot", "iterative", "AGP")]
RANDOM, LIGHTNING, AUTOPRUNE, DENSE = "random", "ModelPruning (Lightning)", "AutoPruneCallback", "dense"
SCHEDULE_KIND = {"one-shot": "one_shot", "iterative": "iterative", "AGP": "agp"}
ALL_TARGETS = (2.0, 4.0, 8.0, 16.0, 32.0)
QUICK_METHODS = ("one-shot (global)", "AGP (global)", "AGP (layer)", RANDOM, LIGHTNING)

# full: 3 seeds x (2 + 8 methods x 5 targets) fits per LeNet plus 24 ResNet-20 fits; from the quick run's per-epoch
# times on 2 shared cores (about 0.25 s LeNet-300-100, 1 s LeNet-5, 8 s ResNet-20): about 12 + 29 + 19 minutes.
SETTINGS: dict[str, list[Setting]] = {
    "quick": [
        Setting("lenet300100", 8, 1, 12, 2, 6, 2, (4.0, 16.0), QUICK_METHODS, "LeNet-300-100, 8x8 digits"),
        Setting("lenet5_caffe", 28, 1, 10, 2, 6, 2, (4.0, 16.0), QUICK_METHODS, "LeNet-5 (Caffe), digits at 28x28"),
    ],
    "full": [
        Setting("lenet300100", 8, 1, 16, 2, 8, 2, ALL_TARGETS, (*MAGNITUDE, RANDOM, LIGHTNING), "LeNet-300-100, 8x8 digits"),
        Setting("lenet5_caffe", 28, 1, 12, 2, 6, 2, ALL_TARGETS, (*MAGNITUDE, RANDOM, LIGHTNING), "LeNet-5 (Caffe), digits at 28x28"),
        Setting("resnet20", 32, 3, 6, 1, 3, 1, (4.0, 16.0), ("AGP (global)", RANDOM, LIGHTNING), "ResNet-20, digits at 3x32x32"),
    ],
}


def callback(setting: Setting, method: str, compression: float, seed: int, model: nn.Module) -> pl.Callback:
    """``method``'s callback for the target ``compression`` (sparsity 1 - 1/compression) on ``model``."""
    sparsity = 1.0 - 1.0 / compression
    if method == RANDOM:
        return RandomPruning(sparsity, setting.end, seed)
    if method == LIGHTNING:
        layers = [(module, "weight") for module in select_modules(model).values()]  # the layers the others prune
        return model_pruning(setting.schedule("agp"), sparsity, layers, use_lottery_ticket_hypothesis=False)
    kind, scope = method.split(" (")
    schedule = setting.schedule(SCHEDULE_KIND[kind])
    return IterativeMagnitude(
        sparsity, schedule.kind, schedule.start_epoch, schedule.end_epoch, setting.frequency, scope=scope.rstrip(")"), verbose=False
    )


def fit(setting: Setting, seed: int, make: Callable[[nn.Module], Optional[pl.Callback]], aux_fraction: float = 0.0) -> dict[str, float]:
    """Train one run; test accuracy (%), compression (total / non-zero pruned weights) and non-zero MACs per sample."""
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(setting.arch, in_channels=setting.channels, image_size=setting.image_size)
    data = DigitsDataModule(image_size=setting.image_size, channels=setting.channels, seed=seed, aux_fraction=aux_fraction)
    made = make(model)
    trainer = pl.Trainer(
        max_epochs=setting.epochs, callbacks=[made] if made else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(model, data)
    accuracy = trainer.test(model, data, verbose=False)[0]["test/acc"]
    report = sparsity_report(model)
    flops = count_flops(model, model.example_input_array)
    return {
        "accuracy": 100 * accuracy,
        "compression": report.total.total / max(1, report.total.nonzero),
        "macs": nonzero_flops(flops, report),
        "dense_macs": flops.total,
    }


def interpolate(curve: dict[float, list[dict[str, float]]], compression: float) -> Optional[float]:
    """Mean accuracy of ``curve`` at ``compression``, linear in log2(compression); None outside its range."""
    xs = sorted(curve)
    for low, high in zip(xs, xs[1:]):
        if low <= compression <= high:
            a, b = (mean_std([r["accuracy"] for r in curve[x]])[0] for x in (low, high))
            t = (math.log2(compression) - math.log2(low)) / (math.log2(high) - math.log2(low))
            return a + t * (b - a)
    return None


MARGIN_IMAGES = 2  # a gap of one or two test images is within run-to-run noise, even with one seed
WHY_BEHIND = {
    ("global", RANDOM): "a global magnitude threshold on a briefly trained network can empty most of one layer, "
    "where a random mask thins every layer alike",
    ("layer", RANDOM): "per-layer scope prunes the small output layer as hard as the large ones",
    ("global", LIGHTNING): "the same criterion (global |w|); ModelPruning runs AGP here, so a one-shot or iterative schedule "
    "differs, and ModelPruning keeps `weight_orig` and its momentum under a forward-pre-hook mask where IterativeMagnitude "
    "zeros the weights and their optimizer state",
    ("layer", LIGHTNING): "per-layer scope gives every layer the same sparsity, the small output layer included; ModelPruning's "
    "global threshold spends the sparsity where the weights are smallest",
}


def behind(setting: Setting, results: dict[str, dict[float, list[dict[str, float]]]], test_images: int) -> list[Behind]:
    """Where our methods are clearly below a baseline at the same target (gap > std(ours) + std(baseline) +
    ``MARGIN_IMAGES`` test images), and where AutoPrune stays below every target or below AGP at its compression."""
    found = []
    margin = MARGIN_IMAGES * 100.0 / test_images + 1e-3  # 1e-3: accuracies are float32, equal image counts must tie
    for method in setting.methods:
        if method in (RANDOM, LIGHTNING):
            continue
        scope = method.split(" (")[1].rstrip(")")
        for baseline in (RANDOM, LIGHTNING):
            if baseline not in setting.methods:
                continue
            for target in setting.targets:
                ours, theirs = (mean_std([r["accuracy"] for r in results[m][target]]) for m in (method, baseline))
                if theirs[0] - ours[0] > ours[1] + theirs[1] + margin:
                    claim = f"{setting.label}: {method} {ours[0]:.1f}% < {baseline} {theirs[0]:.1f}% at {target:g}x"
                    found.append(Behind(anchor(f"behind {setting.arch} {method} {baseline} {target:g}x"), claim, WHY_BEHIND[scope, baseline]))
    if AUTOPRUNE in results:
        reached = mean_std([r["compression"] for r in results[AUTOPRUNE][0.0]])[0]
        accuracy = mean_std([r["accuracy"] for r in results[AUTOPRUNE][0.0]])
        expected = interpolate(results["AGP (global)"], reached) if "AGP (global)" in results else None
        if reached < min(setting.targets):
            found.append(Behind(
                anchor(f"behind {setting.arch} autoprune compression"),
                f"{setting.label}: AutoPruneCallback reaches only {reached:.1f}x in the shared budget (smallest target {min(setting.targets):g}x)",
                f"its compression grows with the epochs M learns in (here epochs 0…{setting.end - 1}); its defaults are calibrated "
                "for 40 epochs, where `benchmarks/autoprune_digits.py` measured 10.1x on LeNet-300-100",
            ))
        elif expected is not None and expected - accuracy[0] > accuracy[1] + margin:
            found.append(Behind(
                anchor(f"behind {setting.arch} autoprune"),
                f"{setting.label}: AutoPruneCallback {accuracy[0]:.1f}% at {reached:.1f}x < AGP (global) {expected:.1f}% (interpolated)",
                "AutoPrune's W trains on half of the training split (M learns on the other half), magnitude pruning on all of it",
            ))
    return found


def plot(setting: Setting, results: dict[str, dict[float, list[dict[str, float]]]], path: pathlib.Path) -> None:
    """Test accuracy vs compression (left) and vs theoretical speed-up, dense MACs / MACs (right); log2 x axes."""
    figure, axes = plt.subplots(1, 2, figsize=(10.4, 4.2), sharey=True)
    dense = mean_std([r["accuracy"] for r in results[DENSE][0.0]])
    for axis, key, label in zip(axes, ("compression", "speedup"), ("compression (total / non-zero pruned weights)", "speed-up (dense MACs / MACs)")):
        def x(run: dict[str, float]) -> float:
            return run["compression"] if key == "compression" else run["dense_macs"] / run["macs"]

        axis.axhline(dense[0], color="black", linestyle=":", label=f"dense {dense[0]:.1f}%")
        for method in setting.methods:
            targets = sorted(results[method])
            stats = [mean_std([r["accuracy"] for r in results[method][t]]) for t in targets]
            xs = [mean_std([x(r) for r in results[method][t]])[0] for t in targets]
            style = "--" if method in (RANDOM, LIGHTNING) else "-"
            axis.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", linestyle=style, capsize=3, label=method)
        auto = results[AUTOPRUNE][0.0]
        (acc, acc_std), (at, at_std) = mean_std([r["accuracy"] for r in auto]), mean_std([x(r) for r in auto])
        axis.errorbar([at], [acc], xerr=[at_std], yerr=[acc_std], marker="*", markersize=12, color="red", linestyle="", label=AUTOPRUNE)
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7)
    figure.suptitle(setting.label)
    save_figure(figure, path)


@one_thread()
def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    seeds = SEEDS[suite]
    data: dict[str, Any] = {}
    rows, figures, found = [], [], []
    split = DigitsDataModule(image_size=8)
    split.setup()
    test_images = len(split.test_dataloader().dataset)
    for setting in SETTINGS[suite]:
        results: dict[str, dict[float, list[dict[str, float]]]] = {DENSE: {0.0: []}, AUTOPRUNE: {0.0: []}}
        for method in setting.methods:
            results[method] = {target: [] for target in setting.targets}
        for seed in seeds:
            results[DENSE][0.0].append(fit(setting, seed, lambda model: None))
            results[AUTOPRUNE][0.0].append(
                fit(setting, seed, lambda model: AutoPruneCallback(start_epoch=0, end_epoch=setting.end - 1, verbose=False), aux_fraction=0.5)
            )
            for method in setting.methods:
                for target in setting.targets:
                    results[method][target].append(fit(setting, seed, lambda model: callback(setting, method, target, seed, model)))
        dense_macs = results[DENSE][0.0][0]["dense_macs"]
        for method, curve in results.items():
            for target, runs in curve.items():
                rows.append([
                    setting.label, method, f"{target:g}x" if target else "—",
                    fmt_mean_std([r["compression"] for r in runs], 1),
                    fmt_mean_std([r["accuracy"] for r in runs]),
                    f"{mean_std([r['macs'] for r in runs])[0]:,.0f}",
                    f"{dense_macs / mean_std([r['macs'] for r in runs])[0]:.1f}x",
                ])
        name = f"quality_{setting.arch}.png"
        plot(setting, results, out_dir / name)
        figures.append(name)
        found += behind(setting, results, test_images)
        data[setting.arch] = {
            "setting": {k: getattr(setting, k) for k in ("arch", "image_size", "channels", "epochs", "start", "end", "frequency", "targets", "methods")},
            "results": {method: {str(t): runs for t, runs in curve.items()} for method, curve in results.items()},
        }
    first = SETTINGS[suite][0]
    markdown = "\n".join([
        "Test accuracy vs compression on the bundled digits data (1,797 images; train/val/test 70/15/15%, "
        f"{test_images} test images: one image is {100 / test_images:.2f} points), mean ± std over seeds {seeds}.",
        "",
        "- **compression** = total / non-zero weights of all Conv/Linear layers (the pruned weights; biases and "
        "BatchNorm not counted), measured on the trained model; targets 2x…32x mean sparsity 1 − 1/target.",
        "- **MACs** = fvcore's multiply-adds per sample of the dense model minus, per layer, its MACs times its sparsity "
        "(`lightning_prune.report.nonzero_flops`: the multiplications by zero a sparse kernel would skip; one multiply-add = one FLOP); "
        "**speed-up** = dense MACs / MACs.",
        f"- **Budget**: every run of a model trains the same `E` epochs (SGD, lr 0.05, momentum 0.9, wd 5e-4, batch 64) from the "
        f"same seeded initialisation; final masks are in place at the start of epoch `P` for every method, then `E − P` epochs fine-tune "
        f"(e.g. {first.label}: E={first.epochs}, events from S={first.start} to P={first.end} every {first.frequency} epochs).",
        "- **Methods**: `IterativeMagnitude` one-shot / iterative / AGP (Zhu & Gupta: s_k = s_f (1 − (1 − k/n)³)) with global or "
        "per-layer scope; **random** (uniform random mask, exactly round(s·N) zeros, one-shot at P); Lightning's **ModelPruning** "
        "(global L1, AGP targets, `use_lottery_ticket_hypothesis=False`); **AutoPruneCallback** (defaults, 1:1 W/M data split, "
        "auxiliary steps in epochs 0…P−1; its compression is what it reaches).",
        "- **Plots**: accuracy (mean, error bars ± std) vs compression and vs speed-up, log2 axes; AutoPrune is the star.",
        "",
        table(["model", "method", "target", "compression", "test accuracy (%)", "MACs / sample", "speed-up"], rows),
    ])
    notes = [f"Settings per model (epochs, schedule, methods, targets): `results.json` → unstructured_quality.setting. "
             f"Suite `{suite}`" + (": a subset of targets and methods, one seed, no ResNet-20 (about 7 s per epoch here); "
                                   "`--suite full` adds 2x/8x/32x, the iterative and layer variants, ResNet-20 and 3 seeds." if suite == "quick" else ".")]
    return Section("Unstructured pruning: accuracy vs compression", markdown, figures, data, notes, found)
