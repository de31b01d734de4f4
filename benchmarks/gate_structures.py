"""Structure similarity (Pruning from Scratch, Sec. 4) on the digits data, upsampled to 32x32.

For each seed, two structures at the same FLOPs ratio (fvcore: one multiply-add = one FLOP):

- random-weight gates: the gate phase of ``GatePruningFromScratch`` (``gate_search.GateSearch``: weights
  at their random init, Adam on the gates, the authors' objective and snapshot rule), then the
  global threshold search;
- network slimming (Liu et al. 2017): the dense net trained with an L1 penalty ``lambda * sum |gamma|``
  on the BatchNorm scales, channels ranked by ``|gamma|`` (summed over a group's BatchNorms), the same
  threshold search. Its structure is also taken after the first epochs, to show it converging.

Prints the Pearson correlation matrices between the seeds' channel-ratio vectors and their mean
off-diagonal entries (the paper: slimming structures correlate strongly and more so with training,
random-weight gate structures are diverse), and writes the heat maps.

    python benchmarks/gate_structures.py [--seeds 4] [--arch vgg16] [--width 0.25] [--epochs 8] \
        [--gate-epochs 10] [--flops-ratio 0.5] [--l1 1e-4] [--out outputs/gate_structures]

(vgg16 at width 0.25: 13 prunable layers, so a structure is a 13-entry vector; ~2.5 min on 2 cores.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.correlation import mean_off_diagonal, plot_correlation, structure_correlation
from lightning_prune.demo.data import DigitsDataModule
from lightning_prune.channel_search import search_threshold
from lightning_prune.flops import FlopsPredictor
from lightning_prune.gate_search import GateSearch
from lightning_prune.pruner import hook_optimizer
from lightning_prune.demo.models import build_network
from lightning_prune.structure import ChannelGroup, channel_ratio_vector, find_channel_groups


def bn_scale_scores(model: nn.Module, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Network slimming's channel importance: |gamma| of the group's BatchNorms, summed per group channel."""
    scores = []
    for group in groups:
        score = torch.zeros(group.size)
        for member in group.members:
            module = model.get_submodule(member.module)
            if member.kind == "channel" and isinstance(module, nn.BatchNorm2d):
                score.index_add_(0, member.channels, module.weight.detach().abs()[member.positions].cpu())
        scores.append(score)
    return scores


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy in eval mode (the authors' snapshot metric); training mode restored."""
    model.eval()
    correct = total = 0
    for inputs, targets in batches:
        correct += int((model(inputs).argmax(1) == targets).sum())
        total += len(targets)
    model.train()
    return correct / total


def structure(groups: list[ChannelGroup], scores: list[torch.Tensor], predictor: FlopsPredictor, ratio: float) -> list[float]:
    return channel_ratio_vector(groups, search_threshold(scores, ratio, predictor).plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=8, help="network slimming training epochs")
    parser.add_argument("--gate-epochs", type=int, default=10)
    parser.add_argument("--flops-ratio", type=float, default=0.5)
    parser.add_argument("--l1", type=float, default=1e-4, help="network slimming's L1 weight on BN scales")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/gate_structures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DigitsDataModule(batch_size=64, image_size=32, channels=3, seed=0)
    data.setup()
    x = data.example_input()
    checkpoints = sorted({1, max(1, args.epochs // 2), args.epochs})
    gate_vectors: list[list[float]] = []
    slim_vectors: dict[int, list[list[float]]] = {epoch: [] for epoch in checkpoints}
    started = time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = build_network(args.arch, 10, 3, 32, args.width)
        groups = find_channel_groups(model, x)
        predictor = FlopsPredictor(model, x, groups)
        loader = DigitsDataModule(batch_size=64, image_size=32, channels=3, seed=seed)
        loader.setup()
        search = GateSearch(model, groups, position="bn", mode="max")
        hook_optimizer(search.optimizer, search)  # the penalty's gradient before each Adam step, the clamp after
        with search.prepare():
            for _ in range(args.gate_epochs):
                for inputs, targets in loader.train_dataloader():
                    search.optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(inputs), targets)
                    loss.backward()
                    search.optimizer.step()
                    search.flag_nonfinite(loss.detach())
                search.check_finite()
                search.validated(accuracy(model, loader.val_dataloader()))
        gate_vectors.append(channel_ratio_vector(groups, search.search(predictor, args.flops_ratio).plan))

        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
        batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        model.train()
        for epoch in range(1, args.epochs + 1):
            for inputs, targets in loader.train_dataloader():
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), targets).backward()
                for bn in batchnorms:  # subgradient of lambda * |gamma|
                    bn.weight.grad.add_(args.l1 * torch.sign(bn.weight.detach()))
                optimizer.step()
            scheduler.step()
            if epoch in slim_vectors:
                slim_vectors[epoch].append(structure(groups, bn_scale_scores(model, groups), predictor, args.flops_ratio))
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)

    labels = [f"seed {s}" for s in range(args.seeds)]
    gate_matrix = plot_correlation(gate_vectors, labels, out / "random_gates.png", "Random-weight gate structures")
    print(f"\n{args.arch} width {args.width}, FLOPs ratio {args.flops_ratio}, {args.seeds} seeds; "
          f"gate phase {args.gate_epochs} epochs, network slimming l1 {args.l1}")
    np.set_printoptions(precision=2, suppress=True)
    print("random-weight gates: correlation matrix\n", gate_matrix)
    print(f"random-weight gates: mean off-diagonal correlation {mean_off_diagonal(gate_matrix):.3f}")
    print("random-weight gates: mean channel-ratio vector", np.mean(gate_vectors, axis=0))
    print("network slimming (last epoch): mean channel-ratio vector", np.mean(slim_vectors[args.epochs], axis=0))
    for epoch, vectors in slim_vectors.items():
        matrix = structure_correlation(vectors)
        if epoch == args.epochs:
            plot_correlation(vectors, labels, out / "network_slimming.png", f"Network slimming structures (epoch {epoch})")
            print(f"network slimming (epoch {epoch}): correlation matrix\n", matrix)
        print(f"network slimming after epoch {epoch}: mean off-diagonal correlation {mean_off_diagonal(matrix):.3f}")
    print(f"heat maps in {out}/; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
