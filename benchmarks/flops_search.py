"""FLOPs-constrained threshold search: fast predictor vs. fvcore per candidate; pruned vs. dense latency.

Prints, in one run on one machine:
  (a) the time of ``search_threshold`` on ResNet-56 (CIFAR shapes) with the ``FlopsPredictor`` vs. the
      same search when every candidate plan is physically applied to a copy and re-counted by fvcore,
      as a ratio (both searches must return the same plan), plus one candidate's time both ways on ResNet-50;
  (b) CPU inference latency of ResNet-56 pruned to 50% FLOPs vs. dense (batch 64, 32x32), as a
      ratio next to the FLOPs ratio.

FLOPs are fvcore's: one multiply-add = one FLOP. Channel scores are seeded i.i.d. uniform, a stand-in for
learned gates (summed channel norms of an untrained net would keep every residual channel and strip
the blocks' inner convs instead).

  (c) with ``--zoo [NAME ...]``, for every model of the test zoo (``tests/zoo_models.py``; all of them without
      names): the ``FlopsPredictor`` set-up time in fvcore recounts of the dense model (given its count, as the
      callbacks do), the time of one ``search_threshold`` to 50% FLOPs, and whether the found plan's predicted
      FLOPs equal fvcore's recount of the physically pruned copy.

    python benchmarks/flops_search.py [--repeats 30] [--threads 1] [--zoo [NAME ...]]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.demo.models import build_network
from lightning_prune.structure import ChannelGroup, apply_plan, find_channel_groups


class RecountingPredictor(FlopsPredictor):
    """The slow baseline: every prediction prunes a copy of the model and re-runs fvcore on it."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, groups: Sequence[ChannelGroup]) -> None:
        super().__init__(model, example_input, groups)
        self.model, self.example_input, self.groups = model, example_input, groups
        self.evaluations = 0

    def predict_counts(self, kept: Sequence[int] | np.ndarray) -> int:
        self.evaluations += 1
        pruned = copy.deepcopy(self.model)
        plan = {group.index: torch.arange(int(k)) for group, k in zip(self.groups, kept)}
        apply_plan(pruned, self.groups, plan, self.example_input)
        return count_flops(pruned, self.example_input).total


def seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``function`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def uniform_scores(groups: Sequence[ChannelGroup]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(group.size, generator=generator) for group in groups]


def per_candidate(arch: str, image_size: int, num_classes: int, repeats: int, recounts: int) -> dict[str, float]:
    """Time of one candidate's FLOPs: the fast predictor vs pruning a copy and re-counting it with fvcore (same number)."""
    model = build_network(arch, num_classes=num_classes, in_channels=3, image_size=image_size).eval()
    x = torch.randn(1, 3, image_size, image_size)
    groups = find_channel_groups(model, x)
    start = time.perf_counter()
    predictor = FlopsPredictor(model, x, groups)
    trace = time.perf_counter() - start
    kept = np.array([max(1, group.size // 2) for group in groups])
    fast = seconds(lambda: predictor.predict_counts(kept), repeats)
    slow_predictor = RecountingPredictor(model, x, groups)
    recounted: list[int] = []
    slow = seconds(lambda: recounted.append(slow_predictor.predict_counts(kept)), recounts)
    assert predictor.predict_counts(kept) == recounted[-1]
    return {"groups": len(groups), "channels": int(predictor.sizes.sum()), "trace_s": trace, "predict_s": fast, "recount_s": slow}


def search_speed(repeats: int) -> dict[str, float]:
    """``search_threshold`` to 50% FLOPs on ResNet-56 (32x32): fast predictor vs fvcore per candidate (same plan)."""
    model = build_network("resnet56", num_classes=10, in_channels=3, image_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = find_channel_groups(model, x)
    scores = uniform_scores(groups)
    start = time.perf_counter()
    predictor = FlopsPredictor(model, x, groups)
    trace = time.perf_counter() - start
    fast_result = search_threshold(scores, 0.5, predictor)
    fast = seconds(lambda: search_threshold(scores, 0.5, predictor), repeats)
    slow_predictor = RecountingPredictor(model, x, groups)
    start = time.perf_counter()
    slow_result = search_threshold(scores, 0.5, slow_predictor)
    slow = time.perf_counter() - start
    assert slow_result.flops == fast_result.flops and slow_result.threshold == fast_result.threshold
    return {"groups": len(groups), "channels": int(predictor.sizes.sum()), "trace_s": trace, "fast_s": fast, "slow_s": slow,
            "evaluations": slow_predictor.evaluations, "ratio": fast_result.ratio}


def print_search_speed(repeats: int) -> None:
    r = search_speed(repeats)
    slow, fast, trace = r["slow_s"], r["fast_s"], r["trace_s"]
    print(f"(a) ResNet-56 32x32, search_threshold to 50% FLOPs, {r['groups']} groups, {r['channels']} channels")
    print(f"    fvcore per candidate: {slow * 1e3:9.1f} ms ({r['evaluations']} prune + fvcore recounts)")
    print(f"    fast predictor:       {fast * 1e3:9.3f} ms (median of {repeats}; one fvcore trace beforehand: {trace * 1e3:.0f} ms)")
    print(f"    speed-up: x{slow / fast:,.0f} (x{slow / (fast + trace):,.1f} counting the one trace); same plan, ratio {r['ratio']:.4f}")
    c = per_candidate("resnet50", 224, 1000, 1000, 1)
    print(f"    ResNet-50 224x224 ({c['groups']} groups): one candidate {c['predict_s'] * 1e6:.1f} us predicted, "
          f"{c['recount_s']:.2f} s pruned + recounted")


def latency(repeats: int) -> None:
    x = torch.randn(64, 3, 32, 32)
    dense = build_network("resnet56", num_classes=10, in_channels=3, image_size=32).eval()
    groups = find_channel_groups(dense, x[:1])
    predictor = FlopsPredictor(dense, x[:1], groups)
    result = search_threshold(uniform_scores(groups), 0.5, predictor)
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, groups, result.plan, x[:1])
    flops_ratio = count_flops(pruned, x[:1]).total / count_flops(dense, x[:1]).total
    timings: dict[str, list[float]] = {"dense": [], "pruned": []}
    with torch.inference_mode():
        for model in (dense, pruned, dense, pruned):  # warm-up
            model(x)
        for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
            for name, model in (("dense", dense), ("pruned", pruned)):
                timings[name].append(seconds(lambda: model(x), 1))
    dense_time, pruned_time = statistics.median(timings["dense"]), statistics.median(timings["pruned"])
    print(f"(b) ResNet-56 CPU inference, batch 64, 32x32, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"    dense {dense_time * 1e3:.1f} ms, pruned {pruned_time * 1e3:.1f} ms")
    print(f"    latency ratio {pruned_time / dense_time:.3f} at FLOPs ratio {flops_ratio:.3f}")


def zoo_setup(names: Sequence[str]) -> None:
    """(c): set-up in recounts, search time and exactness per zoo model (one run each; a shared machine's load
    shows in single timings, so read the set-up as a ratio to the recount timed just before it)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from zoo_models import ZOO, build, import_torchvision

    import_torchvision()
    print("(c) zoo: FlopsPredictor set-up (given the dense count) in fvcore recounts; search_threshold to 50% FLOPs")
    print(f"    {'model':28} {'groups':>6} {'recount':>9} {'set-up':>9} {'recounts':>8} {'search':>9}  exact")
    for name in names or list(ZOO):
        model, x = build(name)
        try:
            groups = find_channel_groups(model, x)
        except ValueError as error:
            print(f"    {name:28} not supported: {str(error)[:60]}")
            continue
        start = time.perf_counter()
        count = count_flops(model, x)
        recount = time.perf_counter() - start
        start = time.perf_counter()
        predictor = FlopsPredictor(model, x, groups, count)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        result = search_threshold(uniform_scores(groups), 0.5, predictor)
        search = time.perf_counter() - start
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, result.plan, x)
        exact = count_flops(pruned, x).total == result.flops
        print(f"    {name:28} {len(groups):6d} {recount:8.2f}s {setup:8.2f}s {setup / recount:8.2f} {search:8.3f}s  {exact}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: on a shared machine, waiting threads distort timings)"
    )
    parser.add_argument("--zoo", nargs="*", default=None, metavar="NAME", help="only (c), for these zoo models (none named: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.zoo is not None:
        zoo_setup(args.zoo)
        return
    print_search_speed(args.repeats)
    latency(args.repeats)


if __name__ == "__main__":
    main()
