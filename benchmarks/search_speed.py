"""Search speed: ``FlopsPredictor`` (exact FLOPs of a channel plan from one fvcore trace) vs pruning a copy and
re-counting it with fvcore, per candidate and for a whole ``search_threshold`` (``benchmarks/flops_search.py``)."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.flops_search import per_candidate, search_speed  # noqa: E402
from benchmarks.report import Section, Suite, one_thread, save_figure, table  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"search_repeats": 5, "predict_repeats": 200, "recounts": {"resnet56": 2, "resnet50": 1}},
    "full": {"search_repeats": 30, "predict_repeats": 1000, "recounts": {"resnet56": 5, "resnet50": 3}},
}
GRAPHS = {"resnet56": ("ResNet-56, 3x32x32", 32, 10), "resnet50": ("ResNet-50, 3x224x224", 224, 1000)}


@one_thread()
def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    torch.manual_seed(0)
    size = SIZES[suite]
    candidates = {
        arch: per_candidate(arch, image_size, classes, size["predict_repeats"], size["recounts"][arch])
        for arch, (_, image_size, classes) in GRAPHS.items()
    }
    search = search_speed(size["search_repeats"])
    rows = [
        [GRAPHS[arch][0], c["groups"], c["channels"], f"{c['predict_s'] * 1e6:,.1f} µs", f"{c['recount_s'] * 1e3:,.0f} ms",
         f"{c['recount_s'] / c['predict_s']:,.0f}x", f"{c['trace_s'] * 1e3:,.0f} ms"]
        for arch, c in candidates.items()
    ]
    figure, axis = plt.subplots(figsize=(6.4, 3.2))
    labels = [GRAPHS[arch][0] for arch in candidates]
    axis.barh([i + 0.2 for i in range(len(labels))], [c["recount_s"] for c in candidates.values()], height=0.4, label="prune a copy + fvcore recount")
    axis.barh([i - 0.2 for i in range(len(labels))], [c["predict_s"] for c in candidates.values()], height=0.4, label="FlopsPredictor")
    axis.set_xscale("log")
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.set_xlabel("seconds per candidate plan (log scale)")
    axis.legend(fontsize=7)
    save_figure(figure, out_dir / "search_speed.png")
    markdown = "\n".join([
        "A candidate is a channel plan (here: the first half of every coupled channel group's channels); its FLOPs are fvcore's "
        "multiply-adds per sample of the physically pruned network. **Predictor**: `lightning_prune.flops.FlopsPredictor.predict_counts` "
        "(per-module counts from one fvcore trace, scaled by the kept widths; median of "
        f"{size['predict_repeats']}); **recount**: deep-copy the model, remove the channels (`apply_plan`), run fvcore "
        "(median of the recounts in `results.json`). Both give the same number (asserted). 1 torch thread.",
        "",
        table(["graph", "channel groups", "channels", "predictor", "recount", "speed-up", "one-off trace"], rows),
        "",
        f"Whole search, ResNet-56 (`search_threshold` to 50% FLOPs, seeded uniform channel scores): "
        f"{search['slow_s']:.2f} s with a recount per candidate ({search['evaluations']} candidates) vs "
        f"{search['fast_s'] * 1e3:.2f} ms with the predictor (median of {size['search_repeats']}; x{search['slow_s'] / search['fast_s']:,.0f}, "
        f"x{search['slow_s'] / (search['fast_s'] + search['trace_s']):,.1f} counting its one trace); same plan, FLOPs ratio {search['ratio']:.4f}.",
    ])
    return Section("Search speed: FLOPs predictor vs fvcore recount", markdown, ["search_speed.png"],
                   {"per_candidate": candidates, "search_resnet56": search, "size": size})
