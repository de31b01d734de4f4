"""Training overhead per step of each callback vs dense and vs Lightning's ``ModelPruning``.

The measurement is ``benchmarks/overhead.py``'s (see its docstring): all variants run in turn within one
round, in one process, so they share the machine's load; a step is timed from the first
``on_train_batch_start`` to the last ``on_train_batch_end`` hook in the second epoch (every callback active);
aten ops and host synchronisations (``aten._local_scalar_dense`` and device-to-host copies) are counted on
one further step with ``lightning_prune.diagnostics``.
"""

from __future__ import annotations

import pathlib
import statistics
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.overhead import GATE, VARIANTS, run as run_variant  # noqa: E402
from benchmarks.report import Behind, Section, Suite, anchor, one_thread, save_figure, table  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"models": ["resnet20"], "rounds": 3, "steps": 4, "batch": 8},
    "full": {"models": ["resnet20", "resnet50"], "rounds": 5, "steps": 8, "batch": 16},
}
DENSE, LIGHTNING = "dense", "ModelPruning (Lightning)"
TOLERANCE = 1.10  # a step more than 10% slower than ModelPruning's counts as behind (single-round noise is about 5%)
WHY_SLOWER = {
    "IterativeMagnitude element": "two fused multi-tensor multiplies per step (gradients before, weights after the optimizer step) "
    "where ModelPruning multiplies each weight by its mask in a forward pre-hook",
    "IterativeMagnitude channel": "the same two multiplies as element pruning (the masks are element masks of whole channels)",
    "AutoPrune element": "the bi-level method itself: one extra forward and backward on a held-out batch and one step of M per step",
    "AutoPrune element fine-tune": "the same two multiplies as IterativeMagnitude (M fixed: its masks in a MaskSet, no gating)",
    "AutoPrune channel": "the bi-level method, as element pruning, with the BatchNorms of the gated channels gated too",
    "AutoPrune channel fine-tune": "the same two multiplies as IterativeMagnitude (M fixed: its masks in a MaskSet, no gating)",
    GATE: "a different phase: gates are trained on a frozen random network (Adam on one gate parameter, no weight update)",
}


@one_thread()
def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    size = SIZES[suite]
    names = list(VARIANTS)
    data: dict[str, Any] = {"size": size, "models": {}}
    rows, found = [], []
    notes = ["Timings on a shared machine: ratios within one round are comparable, absolute milliseconds are not."]
    for arch in size["models"]:
        times: dict[str, list[float]] = {name: [] for name in names}
        counts: dict[str, Any] = {}
        run_variant(arch, DENSE, size["batch"], size["steps"], seed=0)  # warm-up (the first fit in a process is slower), discarded
        for round_ in range(size["rounds"]):
            for name in names:
                step_times, counts[name] = run_variant(arch, name, size["batch"], size["steps"], seed=round_)
                times[name].append(statistics.median(step_times))
        ratio = {name: statistics.median(t / d for t, d in zip(times[name], times[DENSE])) for name in names}
        model_data = {}
        for name in names:
            vs_lightning = ratio[name] / ratio[LIGHTNING]
            count = counts[name]
            model_data[name] = {
                "step_ms": [1000 * t for t in times[name]], "vs_dense": ratio[name], "vs_model_pruning": vs_lightning,
                "aten_ops": count.ops, "host_syncs": count.syncs, "transfers": count.transfers, "sync_sources": dict(count.sync_ops),
            }
            rows.append([arch, name, f"{1000 * statistics.median(times[name]):.1f}", f"{ratio[name]:.2f}", f"{vs_lightning:.2f}",
                         count.ops, count.syncs, count.transfers])
            if name in WHY_SLOWER and vs_lightning > TOLERANCE:
                found.append(Behind(anchor(f"behind overhead {arch} {name}"),
                                    f"{arch}: a step with {name} takes {vs_lightning:.2f}x ModelPruning's", WHY_SLOWER[name]))
            if name == GATE and set(count.sync_ops) <= {"aten::_local_scalar_dense"}:
                notes.append(f"{arch}: the gate phase's {count.syncs} scalar reads per step are Adam's step counter, which "
                             "`torch.optim.Adam` keeps on the CPU (not capturable, not fused) and reads twice for its bias "
                             "correction: on a GPU a read of host memory, not a device synchronisation.")
            elif name in WHY_SLOWER and count.syncs > counts[LIGHTNING].syncs:
                found.append(Behind(anchor(f"behind syncs {arch} {name}"),
                                    f"{arch}: {name} synchronises with the host {count.syncs}x per step (ModelPruning {counts[LIGHTNING].syncs}x)",
                                    "host reads in its per-step path, by source: " + ", ".join(f"{k} x{v}" for k, v in count.sync_ops.items())))
        data["models"][arch] = model_data
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(size["models"])
    for index, arch in enumerate(size["models"]):
        values = [data["models"][arch][name]["vs_dense"] for name in names]
        axis.barh([i + index * width for i in range(len(names))], values, height=width, label=arch)
    axis.axvline(1.0, color="black", linestyle=":")
    axis.set_yticks([i + width * (len(size["models"]) - 1) / 2 for i in range(len(names))], names, fontsize=7)
    axis.set_xlabel("step time / dense step time (median over rounds)")
    axis.legend(fontsize=7)
    save_figure(figure, out_dir / "step_overhead.png")
    markdown = "\n".join([
        f"Per training step, {size['batch']}x3x32x32 random inputs, {size['rounds']} rounds of {size['steps']} timed steps per variant, "
        "1 torch thread. **/ dense** = median over rounds of (median step time / median dense step time of the same round); "
        "**/ ModelPruning** = that ratio over ModelPruning's. IterativeMagnitude and ModelPruning have pruned 90% (channel: 50%) "
        "before the timed epoch; AutoPrune learns M in it, or (fine-tune) fine-tunes under the masks it learnt in epoch 0; "
        "GatePruningFromScratch is in its second gate epoch (Lightning's own training steps on the gates). Ops and syncs: "
        "one step, device-independent.",
        "",
        table(["model", "variant", "step ms", "/ dense", "/ ModelPruning", "aten ops/step", "host syncs/step", "transfers/step"], rows),
    ])
    return Section("Training overhead per step", markdown, ["step_overhead.png"], data, notes, found)
