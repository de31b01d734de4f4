"""Gate-phase step time vs a plain training step, interleaved in one process (issue 10's target: <= 1.2).

- plain step: ``cross_entropy(model(x), y).backward()`` and an SGD (momentum) step on every weight;
- gate step: the same loss with the gates inserted (``GateSearch.running``), then ``GateSearch.step``:
  the objective, backward to the gates only (weights frozen), one reduce of the flat gate gradient,
  Adam and the clamp on one tensor, device counters (no host synchronisation).

Rounds alternate plain and gate blocks so that machine noise hits both; the ratio is the median of the
per-round ratios. Also prints aten ops and host syncs (``aten._local_scalar_dense``) per step, which do
not depend on the device.

    python benchmarks/gate_step.py [--arch resnet20] [--width 1.0] [--batch 64] [--image 32] \
        [--steps 10] [--rounds 7] [--threads 1] [--position bn] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_prune.gate_search import GateSearch
from lightning_prune.pruner import hook_optimizer
from lightning_prune.demo.models import build_network
from lightning_prune.structure import find_channel_groups


class OpCounter(TorchDispatchMode):
    """aten ops by name; ``sync`` counts reads of tensor values to the host (``aten._local_scalar_dense``)
    except of ``host_tensors`` (Adam's step counter lives on the host by design: reading it is no device sync)."""

    def __init__(self, host_tensors: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host = {id(t) for t in host_tensors}
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[func.__name__] += 1
        if func.__name__.startswith("_local_scalar_dense") and id(args[0]) not in self.host:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--position", default="bn")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    x = torch.randn(args.batch, 3, args.image, args.image, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    plain_model = build_network(args.arch, 10, 3, args.image, args.width).to(device).train()
    gate_model = build_network(args.arch, 10, 3, args.image, args.width).to(device)
    groups = find_channel_groups(gate_model, x[:1].cpu() if device.type == "cpu" else x[:1])
    search = GateSearch(gate_model, groups, position=args.position)
    optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(x), y).backward()
        optimizer.step()

    hook_optimizer(search.optimizer, search)  # the penalty's gradient before each Adam step, the clamp after

    def gate_step() -> None:
        search.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gate_model(x), y)
        loss.backward()
        search.optimizer.step()
        search.flag_nonfinite(loss.detach())

    def timed(step) -> float:  # noqa: ANN001
        sync()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - started) / args.steps

    with search.prepare():
        for step in (plain_step, gate_step, plain_step, gate_step):  # warm-up
            step()
        counts = {}
        host = tuple(state["step"] for state in search.optimizer.state.values())
        for name, step in (("plain", plain_step), ("gate", gate_step)):
            with OpCounter(host) as counter:
                step()
            counts[name] = (sum(counter.ops.values()), counter.syncs)
        plain, gate = [], []
        for _ in range(args.rounds):
            plain.append(timed(plain_step))
            gate.append(timed(gate_step))
        search.check_finite()
    ratios = [g / p for g, p in zip(gate, plain)]
    # Host-to-device copies per gated forward: on "meta" (a stand-in accelerator) every copy is an aten._to_copy.
    meta_model = build_network(args.arch, 10, 3, args.image, args.width).to("meta")
    meta_x = x.to("meta")
    meta_search = GateSearch(meta_model, groups, position=args.position)
    with meta_search.prepare(), OpCounter() as counter:
        meta_model(meta_x)
    print(
        f"{args.arch} width {args.width}, batch {args.batch}, {args.image}x{args.image}, {device}, threads {args.threads}, "
        f"gates at {args.position!r} ({search.gates.num_gates} gates, {len(groups)} groups); {args.rounds} rounds x {args.steps} steps"
    )
    print(f"plain step: median {statistics.median(plain) * 1e3:.1f} ms; aten ops {counts['plain'][0]}, host syncs {counts['plain'][1]}")
    print(f"gate step:  median {statistics.median(gate) * 1e3:.1f} ms; aten ops {counts['gate'][0]}, host syncs {counts['gate'][1]}")
    print(f"host-to-device copies per gated forward: {counter.ops['_to_copy.default']}")
    print(f"gate / plain: median {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
