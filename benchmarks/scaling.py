"""Scaling: time per training step and per pruning event as the model widens (ResNet-20 x1, x2, x4), and the time
of one global magnitude event vs the number of weights (100 layers), next to ``torch.nn.utils.prune.global_unstructured``
(what Lightning's ``ModelPruning`` calls). Everything runs ``lightning_prune.magnitude.MagnitudePruner`` directly
(the core ``IterativeMagnitude`` drives), in a plain training loop without Lightning."""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from benchmarks.report import Behind, Section, Suite, anchor, one_thread, save_figure, table  # noqa: E402
from lightning_prune.demo.models import build_network  # noqa: E402
from lightning_prune.magnitude import MagnitudePruner  # noqa: E402
from lightning_prune.targets import select_modules  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"widths": (1, 2, 4), "batch": 8, "steps": 3, "weights": (10**5, 10**6, 10**7)},
    "full": {"widths": (1, 2, 4), "batch": 32, "steps": 10, "weights": (10**5, 10**6, 10**7, 10**8)},
}
FRACTIONS = (0.6, 0.7, 0.8, 0.9)  # timed events after a warm-up event at 0.5 (sparsity 0.9 · fraction)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def event_seconds(model: nn.Module) -> float:
    """Median time of a global magnitude event (to 90% · fraction sparsity) over ``FRACTIONS``, after one warm-up event."""
    pruner = MagnitudePruner(model, list(select_modules(model)), 0.9)
    pruner.update(0.45)
    return statistics.median(timed(lambda: pruner.update(0.9 * fraction)) for fraction in FRACTIONS)


def step_seconds(width: int, batch: int, steps: int) -> dict[str, float]:
    """Median SGD step time of ResNet-20 at ``width``, dense and with 90% element masks held (interleaved), and its event time."""
    torch.manual_seed(0)
    model = build_network("resnet20", num_classes=10, in_channels=3, image_size=32, width=width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    pruner = MagnitudePruner(model, list(select_modules(model)), 0.9)

    def step(masked: bool) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if masked:
            pruner.before_step()
        optimizer.step()
        if masked:
            pruner.after_step()

    event = timed(lambda: pruner.update(pruner.final))
    for masked in (True, False):  # warm-up
        step(masked)
    dense, masked = [], []
    for _ in range(steps):
        dense.append(timed(lambda: step(False)))
        masked.append(timed(lambda: step(True)))
    weights = sum(model.get_parameter(name).numel() for name in pruner.weights)
    return {"weights": weights, "dense_step_s": statistics.median(dense), "masked_step_s": statistics.median(masked), "event_s": event}


def layers_of(total: int) -> nn.Module:
    """100 Linear layers holding ``total`` weights in all (100 outputs each), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(total // 10_000, 100, bias=False) for _ in range(100)])


def torch_global_seconds(model: nn.Module) -> float:
    """One ``prune.global_unstructured`` (L1, 54% of the weights: the first timed event's target) on ``model``, undone after."""
    parameters = [(module, "weight") for module in model]
    seconds = timed(lambda: prune.global_unstructured(parameters, prune.L1Unstructured, amount=0.54))
    for module, name in parameters:
        prune.remove(module, name)
    return seconds


@one_thread()
def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    size = SIZES[suite]
    widths = {width: step_seconds(width, size["batch"], size["steps"]) for width in size["widths"]}
    events = {}
    for total in size["weights"]:  # the same seeded weights for both, one model in memory at a time
        events[total] = {"torch_global_s": torch_global_seconds(layers_of(total)), "magnitude_event_s": event_seconds(layers_of(total))}
    width_rows = [
        [f"x{w}", f"{r['weights']:,}", f"{r['dense_step_s'] * 1e3:.0f}", f"{r['masked_step_s'] * 1e3:.0f}",
         f"{r['masked_step_s'] / r['dense_step_s']:.3f}", f"{r['event_s'] * 1e3:.1f}"]
        for w, r in widths.items()
    ]
    event_rows = [
        [f"{total:,}", f"{r['magnitude_event_s'] * 1e3:,.1f}", f"{r['torch_global_s'] * 1e3:,.1f}",
         f"{r['magnitude_event_s'] / r['torch_global_s']:.2f}"]
        for total, r in events.items()
    ]
    found = [
        Behind(anchor(f"behind event {total}"),
               f"a global magnitude event over {total:,} weights takes {r['magnitude_event_s'] / r['torch_global_s']:.2f}x "
               "torch's global_unstructured",
               "it is an exact two-pass radix select on the weights' device that also keeps the previous masks and the "
               "per-layer floor (max_layer_sparsity), with memory bounded by the largest layer; torch's call is one top-k over "
               "a concatenated copy of all scores without those constraints")
        for total, r in events.items() if r["magnitude_event_s"] > 1.10 * r["torch_global_s"]
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    xs = list(widths)
    left.plot(xs, [r["dense_step_s"] * 1e3 for r in widths.values()], marker="o", label="dense step")
    left.plot(xs, [r["masked_step_s"] * 1e3 for r in widths.values()], marker="o", label="step with 90% masks")
    left.plot(xs, [r["event_s"] * 1e3 for r in widths.values()], marker="s", label="pruning event")
    left.set(xscale="log", yscale="log", xlabel="ResNet-20 width (Conv/Linear weights)", ylabel="ms", title=f"batch {size['batch']}")
    left.set_xticks(xs, [f"x{w} ({r['weights'] / 1e6:.2f} M)" for w, r in widths.items()])
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.legend(fontsize=7)
    totals = list(events)
    right.plot(totals, [events[t]["magnitude_event_s"] for t in totals], marker="o", label="MagnitudePruner.prune (global)")
    right.plot(totals, [events[t]["torch_global_s"] for t in totals], marker="s", linestyle="--", label="torch prune.global_unstructured")
    right.set(xscale="log", yscale="log", xlabel="weights (100 layers)", ylabel="seconds per event")
    right.legend(fontsize=7)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    save_figure(figure, out_dir / "scaling.png")
    markdown = "\n".join([
        f"ResNet-20 at width x1/x2/x4, batch {size['batch']}x3x32x32, plain SGD loop, 1 torch thread: median of {size['steps']} "
        "interleaved steps dense and with `MagnitudePruner`'s masks held (`apply_to_grads` before, `apply_to_weights` after "
        "each optimizer step); the event is one global magnitude decision to 90% sparsity over all Conv/Linear weights.",
        "",
        table(["width", "weights", "dense step ms", "masked step ms", "ratio", "event ms"], width_rows),
        "",
        "One global event vs the number of weights (100 Linear layers, previous masks at 45%, target 54%…81%, median of "
        f"{len(FRACTIONS)} events) beside one `torch.nn.utils.prune.global_unstructured` call (L1, 54%) on the same layers:",
        "",
        table(["weights", "MagnitudePruner event ms", "torch global_unstructured ms", "ratio"], event_rows),
    ])
    notes = [] if suite == "full" else ["Suite `quick` stops at 10 M weights; `full` goes to 100 M."]
    data = {"size": {**size, "weights": list(size["weights"])}, "widths": widths, "events": {str(k): v for k, v in events.items()}}
    return Section("Scaling: step and pruning-event time", markdown, ["scaling.png"], data, notes, found)
