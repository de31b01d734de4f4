"""AutoPrune's per-step cost against its inherent cost, and its aten op / host-sync counts per step.

    python benchmarks/autoprune_step.py [--arch resnet20] [--batch 32] [--size 32] [--rounds 5] [--steps 10]
        [--baseline OLD/lightning_prune/auxiliary.py]

Three steps are timed, interleaved round by round in one process (so machine load hits all alike):

- dense: forward + backward + SGD step (momentum, weight decay) on a training batch;
- inherent: dense + one extra forward + backward on a held-out batch (what AutoPrune cannot avoid:
  the gradient of its auxiliary parameters ``M`` comes from a held-out batch);
- autoprune: what ``AutoPruneCallback`` does per step, through its core object
  (:class:`lightning_prune.auxiliary.AuxiliaryParameters`): the gated model's training step with
  ``before_step``/``after_step`` around the optimizer step, then ``learn`` on a held-out batch.

With ``--baseline``, a fourth step, "baseline", is AutoPrune's step through the ``AuxiliaryParameters`` of
that file (e.g. ``git show <commit>:lightning_prune/auxiliary.py > /tmp/old_auxiliary.py``), interleaved in
the same run, so before/after times come from one process.

Reported: median step times, autoprune / inherent and autoprune / dense, and per step the number of
aten ops, AutoPrune's own passes over ``M`` (the summed size of each op's largest operand, minus the
inherent step's, divided by the number of entries of ``M``: one elementwise kernel over all of ``M`` is
one pass) and the host synchronisations (``aten._local_scalar_dense``: what ``.item()``, ``float(t)``,
``bool(t)``, ``int(t)`` call; plus device-to-host copies), counted with a ``TorchDispatchMode``; the
counts do not depend on the device, so they hold for a GPU run. Run on an older checkout of the
package (``PYTHONPATH=<old checkout>``), it measures that version's per-step code (the callback's
former ``_auxiliary_step`` is reproduced below for it).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_prune.auxiliary import AuxiliaryParameters
from lightning_prune.demo.models import build_network
from lightning_prune.targets import select_modules

CONSISTENCY = dict(sensitivity=True, correlation=True, direction=True)
REG = 1.25


class OpCounter(TorchDispatchMode):
    """Counts aten ops, host synchronisations and the elements of ``M``-shaped operands touched: per op the
    largest operand shaped like ``M`` (``shapes``: the pruned weights, their flat views, the flat ``M``), or
    for a ``_foreach`` op the sum over its first list; views (no data touched) are not counted."""

    def __init__(self, shapes: set[tuple[int, ...]] = frozenset()) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.shapes, self.elements = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = str(func.overloadpacket)
        self.ops[name] += 1
        result = func(*args, **(kwargs or {}))
        if func.is_view or name in ("aten.split_with_sizes", "aten.split", "aten.unbind"):  # no data touched
            return result
        operands = args[0] if name.startswith("aten._foreach") else (args, kwargs, result)
        sizes = [t.numel() for t in tree_leaves(operands) if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes]
        self.elements += sum(sizes) if name.startswith("aten._foreach") else max(sizes, default=0)
        return result

    @property
    def syncs(self) -> int:
        return self.ops["aten._local_scalar_dense"] + self.ops["aten.item"]


def make_batch(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def dense_step(model, optimizer, batch) -> None:  # noqa: ANN001
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def inherent_step(model, optimizer, batch, held_out) -> None:  # noqa: ANN001
    dense_step(model, optimizer, batch)
    loss = F.cross_entropy(model(held_out[0]), held_out[1])
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def legacy_auxiliary_step(aux: AuxiliaryParameters, model, held_out) -> None:  # noqa: ANN001
    """The per-step code of the callback before the flat core (``_auxiliary_step`` of the earlier version)."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with torch.enable_grad(), aux.tracking() as tensors:
        loss = F.cross_entropy(model(held_out[0]), held_out[1])
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    grads = [torch.zeros_like(t) if g is None else g.detach().float() for t, g in zip(tensors, grads)]
    flat = torch.cat([g.flatten() for g in grads])
    if not bool(torch.isfinite(flat).all()):
        raise FloatingPointError
    loss_grads, offset = {}, 0
    for key, g in zip(aux.values, grads):
        loss_grads[key] = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
    aux.step(loss_grads, REG, **CONSISTENCY)


def autoprune_setup(model, optimizer, core: type = AuxiliaryParameters) -> tuple[Any, Callable[[Any, Any], None]]:  # noqa: ANN001
    aux = core(model, list(select_modules(model)), "element", ste="leaky_relu", slope=0.5, init=1.0)
    # a core from before the Pruner protocol (``--baseline``) names its verbs attach/freeze/restore_frozen
    verbs = ("prepare", "before_step", "after_step") if hasattr(aux, "prepare") else ("attach", "freeze", "restore_frozen")
    prepare, before_step, after_step = (getattr(aux, verb) for verb in verbs)
    prepare()
    aux.build_optimizer("sgd", 1.5e-2)
    flat = hasattr(aux, "learn")
    if flat:  # the callback registers these on every optimizer of the Trainer
        optimizer.register_step_pre_hook(lambda *args: before_step())
        optimizer.register_step_post_hook(lambda *args: after_step())

    def step(batch: Any, held_out: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        if flat:
            optimizer.step()
            aux.learn(lambda: F.cross_entropy(model(held_out[0]), held_out[1]), REG, **CONSISTENCY)
        else:
            before_step()
            optimizer.step()
            after_step()
            legacy_auxiliary_step(aux, model, held_out)

    return aux, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", help="an older auxiliary.py to time in the same run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_network(args.arch, 10, 3, args.size).to(args.device)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    batch, held_out = (tuple(t.to(args.device) for t in make_batch(args.batch, args.size, seed)) for seed in (1, 2))
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    dense_model, dense_opt = build()
    inherent_model, inherent_opt = build()
    pruned_model, pruned_opt = build()
    aux, autoprune = autoprune_setup(pruned_model, pruned_opt)
    steps: dict[str, Callable[[], None]] = {
        "dense": lambda: dense_step(dense_model, dense_opt, batch),
        "inherent": lambda: inherent_step(inherent_model, inherent_opt, batch, held_out),
        "autoprune": lambda: autoprune(batch, held_out),
    }
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_auxiliary", args.baseline)
        baseline_module = sys.modules["baseline_auxiliary"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline_module)
        baseline_model, baseline_opt = build()
        _, baseline = autoprune_setup(baseline_model, baseline_opt, baseline_module.AuxiliaryParameters)
        steps["baseline"] = lambda: baseline(batch, held_out)
    for step in steps.values():  # warm-up (allocations, lazily built buffers)
        step()
        step()
    weights = [dense_model.get_submodule(name).weight for name in select_modules(dense_model)]  # not the gated net: reading its
    # `.weight` would compute the gates (and h(M)) outside the counted step
    entries = sum(value.numel() for value in aux.values.values())
    shapes = {tuple(w.shape) for w in weights} | {(w.numel(),) for w in weights} | {(entries,)}
    counts = {}
    for name, step in steps.items():
        with OpCounter(shapes) as counter:
            step()
        counts[name] = (sum(counter.ops.values()), counter.syncs, counter.elements)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(values) for name, values in times.items()}
    params = sum(p.numel() for p in dense_model.parameters())
    print(f"{args.arch} ({params:,} parameters), batch {args.batch}x3x{args.size}x{args.size}, {args.device}, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'step':<10} {'median ms':>10} {'aten ops':>9} {'host syncs':>11} {'own passes over M':>18}")
    for name in steps:
        own = (counts[name][2] - counts["inherent"][2]) / entries if name in ("autoprune", "baseline") else float("nan")
        print(f"{name:<10} {median[name] * 1e3:>10.1f} {counts[name][0]:>9} {counts[name][1]:>11} {own:>18.1f}")
    for name in [name for name in ("autoprune", "baseline") if name in steps]:
        print(f"{name} / inherent: {median[name] / median['inherent']:.3f}; {name} / dense: {median[name] / median['dense']:.3f}; "
              f"own ops per step ({name} - inherent): {counts[name][0] - counts['inherent'][0]}, "
              f"host syncs: {counts[name][1] - counts['inherent'][1]}")


if __name__ == "__main__":
    main()
