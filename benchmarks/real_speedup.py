"""Real speed-up and file size of physically pruned networks (resnet56, 3x32x32 inputs, CPU).

Structures at the same FLOPs target (0.5 x dense; fvcore, one multiply-add = one FLOP), each a plain,
physically smaller ``nn.Module`` (``PLANS``):

- gate plan: ``GatePruningFromScratch(flops_ratio=0.5)`` run in a ``Trainer.fit`` on the digits data;
- uniform: every channel group keeps the same fraction (``baselines.uniform_plan``);
- Torch-Pruning L1: ``baselines.torch_pruning_l1`` (one pruning ratio for every layer).

Latency: per structure and batch size (64 and 1), the median of ``repeats`` forward passes under
``torch.inference_mode()`` in eval mode on one CPU thread, after ``warmup`` passes each; the models run
interleaved (each round visits every model once, in a rotating order) so that load drifts hit all alike.
Speed-up = dense median / pruned median, next to the FLOPs ratio (pruned / dense).

Size: bytes of ``torch.save(state_dict)`` for the dense and each pruned net, and of lightning_prune's
``export_sparse`` (CSR) file of the dense net with 90% of its Conv/Linear weights zeroed by global
magnitude (``MagnitudePruner``), next to the ``dense_bytes``/``sparse_bytes`` that ``export_sparse`` reports.

    python -m benchmarks.real_speedup --suite quick --out outputs/real_speedup
"""

from __future__ import annotations

import copy
import io
import pathlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import pytorch_lightning as pl
import torch
from torch import nn

from benchmarks.baselines import torch_pruning_l1, uniform_plan
from benchmarks.report import Behind, Section, anchor, table
from benchmarks.report import Suite, one_thread
from benchmarks.structured_quality import main, start
from lightning_prune import DigitsDataModule, GatePruningFromScratch, ImageClassifier, build_network, export_sparse
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.magnitude import MagnitudePruner
from lightning_prune.structure import apply_plan, find_channel_groups
from lightning_prune.targets import select_modules

ARCH, RATIO, SPARSITY = "resnet56", 0.5, 0.9


@dataclass(frozen=True)
class Setting:
    """Gate phase length (``gate_batches=None``: whole epochs) and the latency protocol."""

    gate_epochs: int = 4
    gate_batches: Optional[int] = None
    warmup: int = 3
    repeats_batch64: int = 21
    repeats_batch1: int = 101
    seed: int = 0


SETTINGS: dict[str, Setting] = {
    "quick": Setting(gate_epochs=1, gate_batches=2, warmup=2, repeats_batch64=7, repeats_batch1=101),
    "full": Setting(),
}


def example() -> torch.Tensor:
    return torch.zeros(1, 3, 32, 32)


def dense_network(setting: Setting) -> nn.Module:
    torch.manual_seed(setting.seed)
    return build_network(ARCH, 10, 3, 32, 1.0)


def gate_network(setting: Setting, round_to: Optional[int] = None) -> nn.Module:
    """The network ``GatePruningFromScratch`` leaves after a ``fit`` (its gate phase, then pruned training)."""
    pl.seed_everything(setting.seed, verbose=False)
    model = ImageClassifier(ARCH, in_channels=3, image_size=32, width=1.0)
    pruning = GatePruningFromScratch(flops_ratio=RATIO, gate_epochs=setting.gate_epochs, round_to=round_to, verbose=False)
    limits = {} if setting.gate_batches is None else {"limit_train_batches": setting.gate_batches, "limit_val_batches": 1}
    trainer = pl.Trainer(max_epochs=setting.gate_epochs + 1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning], **limits)
    trainer.fit(model, DigitsDataModule(batch_size=64, image_size=32, channels=3, seed=setting.seed))
    return model.network


def uniform_network(setting: Setting) -> nn.Module:
    network, x = dense_network(setting), example()
    groups = find_channel_groups(network, x)
    apply_plan(network, groups, uniform_plan(groups, FlopsPredictor(network, x, groups), RATIO), x)
    return network


def torch_pruning_network(setting: Setting) -> nn.Module:
    network = dense_network(setting)
    torch_pruning_l1(network, example(), RATIO, ignored=["fc"])
    return network


# The structures compared at the same FLOPs target; `round_to` keeps channel counts at multiples (vectorised kernels).
PLANS: dict[str, Callable[[Setting], nn.Module]] = {
    "gate plan": gate_network,
    "gate plan, round_to=8": lambda setting: gate_network(setting, round_to=8),
    "uniform": uniform_network,
    "Torch-Pruning L1": torch_pruning_network,
}


def latencies(models: dict[str, nn.Module], batch: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of one forward pass per model, ``repeats`` times, models interleaved in a rotating order."""
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(x)
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                models[name](x)
                times[name].append(time.perf_counter() - started)
    return times


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@one_thread()
def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    """Build the pruned structures, time them against the dense net, and compare file sizes."""
    setting = start(suite, out_dir, SETTINGS)
    out_dir = pathlib.Path(out_dir)
    started = time.perf_counter()
    models = {"dense": dense_network(setting)}
    models.update({name: build(setting) for name, build in PLANS.items()})
    flops = {name: count_flops(model, example()).total for name, model in models.items()}
    timing = {
        batch: latencies(models, batch, setting.warmup, repeats)
        for batch, repeats in ((64, setting.repeats_batch64), (1, setting.repeats_batch1))
    }
    medians = {batch: {name: statistics.median(values) for name, values in per.items()} for batch, per in timing.items()}

    element_pruned = copy.deepcopy(models["dense"])
    MagnitudePruner(element_pruned, list(select_modules(element_pruned)), SPARSITY).update(SPARSITY)
    sparse_file = out_dir / f"{ARCH}_sparse{int(100 * SPARSITY)}_csr.pt"
    export = export_sparse(element_pruned, sparse_file, "csr")
    sizes = {name: saved_bytes(model) for name, model in models.items()}
    sizes[f"dense, {int(100 * SPARSITY)}% of weights zeroed, export_sparse CSR"] = sparse_file.stat().st_size
    sparse_file.unlink()

    rows, data_models = [], {}
    for name, model in models.items():
        flops_ratio = flops[name] / flops["dense"]
        params = sum(p.numel() for p in model.parameters())
        speedups = {batch: medians[batch]["dense"] / medians[batch][name] for batch in medians}
        data_models[name] = {"flops_ratio": flops_ratio, "params": params, "bytes": sizes[name],
                             "latency_s": {str(b): timing[b][name] for b in timing},
                             "median_s": {str(b): medians[b][name] for b in medians},
                             "min_s": {str(b): min(timing[b][name]) for b in timing},
                             "speedup": {str(b): speedups[b] for b in speedups}}
        rows.append([name, f"{flops_ratio:.3f}", f"{1 / flops_ratio:.2f}x",
                     f"{1000 * medians[64][name]:.1f} / {1000 * min(timing[64][name]):.1f}", f"{speedups[64]:.2f}x",
                     f"{1000 * medians[1][name]:.2f} / {1000 * min(timing[1][name]):.2f}", f"{speedups[1]:.2f}x", f"{params:,}"])
    size_rows = [[name, f"{size:,}", f"{sizes['dense'] / size:.2f}x"] for name, size in sizes.items()]
    seconds = time.perf_counter() - started
    markdown = "\n\n".join([
        f"**Real CPU speed-up at {RATIO} FLOPs** ({ARCH}, 3x32x32 inputs, one thread, eval mode, "
        f"`torch.inference_mode`; median of {setting.repeats_batch64} (batch 64) / {setting.repeats_batch1} (batch 1) "
        f"interleaved passes after {setting.warmup} warm-up passes; torch {torch.__version__}).",
        table(["network", "FLOPs ratio", "FLOPs speed-up", "batch 64: median / min (ms)", "real speed-up",
                        "batch 1: median / min (ms)",
                        "real speed-up", "parameters"], rows),
        "FLOPs ratio: fvcore's count of the network / the dense network's (one multiply-add = one FLOP); FLOPs "
        "speed-up is its inverse. Real speed-up: dense median latency / the network's median.",
        f"**Model file size** (bytes of `torch.save`): dense and physically pruned state dicts, and lightning_prune's "
        f"`export_sparse` (CSR: float32 values, int64 column indices and row pointers) of the dense net with "
        f"{int(100 * SPARSITY)}% of its Conv/Linear weights zeroed by global magnitude (its report: "
        f"{export.dense_bytes:,} dense tensor bytes -> {export.sparse_bytes:,} encoded, {export.ratio:.2f}x).",
        table(["file", "bytes", "smaller than dense"], size_rows),
    ])
    notes = [f"suite {suite!r} took {seconds:.0f} s; latencies on a shared machine vary with its load"]
    shapes = {name: [tuple(t.shape) for t in model.state_dict().values()] for name, model in models.items()}
    names = list(models)
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            if shapes[first] == shapes[second]:
                spread = ", ".join(f"batch {b}: {abs(medians[b][first] / medians[b][second] - 1):.0%}" for b in medians)
                notes.append(f"{first} and {second} have identical layer shapes: their medians differ by {spread}, "
                             "the measurement noise on this machine (min-of-repeats latencies are in the data)")
    sparse_name = next(name for name in sizes if "export_sparse" in name)
    if sizes[sparse_name] > 1.1 * export.sparse_bytes:
        notes.append(f"the export_sparse file holds {sizes[sparse_name]:,} bytes, {sizes[sparse_name] / export.sparse_bytes:.2f}x the "
                     f"{export.sparse_bytes:,} encoded bytes it reports: torch.save writes whole storages, and the CSR "
                     "index tensors' storages are larger than the indices")
    if setting.gate_batches is not None:
        notes.append(f"quick: the gate plan comes from a {setting.gate_batches}-batch gate phase; latency depends on the "
                     "plan's shapes, not on how well its gates were learned")
    behind = []
    efficiency = {name: data_models[name]["speedup"]["64"] * data_models[name]["flops_ratio"] for name in PLANS}
    best = max((name for name in PLANS if not name.startswith("gate")), key=efficiency.get)
    for name in PLANS:
        if name.startswith("gate") and efficiency[name] < 0.9 * efficiency[best]:
            behind.append(Behind(
                anchor(f"behind real speedup {ARCH} {name}"),
                f"{ARCH} at {RATIO} FLOPs, batch 64: the {name} turns {efficiency[name]:.0%} of its FLOPs reduction into "
                f"speed, {best} {efficiency[best]:.0%}",
                "the gate plan's uneven widths (some layers cut far more than others) run less efficiently in CPU "
                "convolution kernels than even widths; single-run CPU latencies vary by up to 30% (see the notes)",
            ))
    return Section(
        title="Real speed-up and file size of pruned networks",
        markdown=markdown,
        figures=[],
        data={"setting": asdict(setting), "arch": ARCH, "flops_target": RATIO, "models": data_models,
                 "bytes": sizes, "export_sparse": {"dense_bytes": export.dense_bytes, "sparse_bytes": export.sparse_bytes},
                 "threads": 1, "seconds": seconds},
        notes=notes,
        behind=behind,
    )


if __name__ == "__main__":
    main(__doc__, run)
