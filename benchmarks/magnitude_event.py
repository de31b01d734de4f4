"""IterativeMagnitude's hot paths: pruning-event time vs number of weights, host syncs in one channel
event, and the ops of the per-step mask path.

    PYTHONPATH=. python benchmarks/magnitude_event.py [--sizes 1e6 1e7 1e8] [--device cpu] [--threads 1]

Event: one global magnitude decision (``global_magnitude_masks`` on the weights' device: a sampled
bracket, one chunked pass over the weights, the keys inside the bracket ranked exactly) over ``N``
weights in 100 layers, with the previous masks and the per-layer floor, as ``MagnitudePruner`` runs
it; the sort-based decision of the first version (all weights copied to the host and sorted) is timed
beside it up to 1e7 weights. Before the bracket (the two-pass radix select alone, now the fallback for
heavy ties): 0.81 s against 0.40 s at 1e8 weights, single-threaded CPU (medians of 6 alternating runs in
one process; on a busier machine 1.54 s against 0.86 s). Syncs: calls of ``aten._local_scalar_dense``
(what ``.item()``/``int()``/``bool()`` run) in one channel-granular event on ResNet-20 (before:
2,164). Step: the aten ops of ``apply_to_grads`` + ``apply_to_weights`` on ResNet-50-sized masks.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_prune.criteria import global_magnitude_masks
from lightning_prune.magnitude import ChannelMagnitude, MagnitudePruner, max_zeros
from lightning_prune.demo.models import build_network
from lightning_prune.structure import find_channel_groups


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def sort_based(weights: dict[str, torch.Tensor], sparsity: float) -> None:
    """The decision before: every weight to the host, one stable sort."""
    flat = torch.cat([w.abs().flatten().float().cpu() for w in weights.values()])
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[: round(sparsity * flat.numel())]] = False


def event_times(sizes: list[int], device: torch.device) -> None:
    print(f"{'weights':>12}  {'event (s)':>16}  {'host sort (s)':>13}")
    for size in sizes:
        torch.manual_seed(0)
        weights = {f"l{i}": torch.randn(size // 100, device=device) for i in range(100)}
        previous = global_magnitude_masks(weights, 0.5)
        for name, w in weights.items():
            w.mul_(previous[name])
        cap = {name: max_zeros(w.numel(), 0.99) for name, w in weights.items()}
        global_magnitude_masks(weights, 0.6, previous, cap)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        global_magnitude_masks(weights, 0.6, previous, cap)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ours = time.perf_counter() - start
        theirs = "-"
        if size <= 10_000_000:
            start = time.perf_counter()
            sort_based(weights, 0.6)
            theirs = f"{time.perf_counter() - start:.3f}"
        print(f"{size:>12,}  {ours:>16.3f}  {theirs:>13}")
        del weights, previous


def channel_event_syncs() -> None:
    model = build_network("resnet20", num_classes=10, in_channels=3, image_size=32)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    groups = find_channel_groups(model, torch.zeros(1, 3, 32, 32), ignored_layers=["fc"])
    pruner = MagnitudePruner(model, layers, 0.5)
    pruner.channels = ChannelMagnitude(groups, list(pruner.weights), {n: p.shape for n, p in model.named_parameters()}, "l1", 0.99)
    with Ops() as ops:
        pruner.update(pruner.final)
    print(f"channel event on ResNet-20 ({sum(g.size for g in groups)} channels): "
          f"{ops.ops.count('_local_scalar_dense')} host syncs, {len(ops.ops)} aten ops")


def step_ops() -> None:
    model = build_network("resnet50", num_classes=1000, in_channels=3, image_size=64)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    pruner = MagnitudePruner(model, layers, 0.8)
    pruner.update(pruner.final)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with Ops() as ops:
        pruner.before_step()
        pruner.after_step()
    print(f"per-step mask path on ResNet-50 ({len(pruner.masks.masks)} masked weights): {len(ops.ops)} aten ops "
          f"({sorted(set(ops.ops))}), {ops.ops.count('_local_scalar_dense')} host syncs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; 1 is stable on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    event_times([int(s) for s in args.sizes], torch.device(args.device))
    channel_event_syncs()
    step_ops()


if __name__ == "__main__":
    main()
