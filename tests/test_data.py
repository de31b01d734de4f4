"""The bundled digits data module: deterministic, disjoint splits; shapes for every built-in network."""

import pytest
import torch

from lightning_prune import DigitsDataModule, ImageClassifier
from lightning_prune.demo.models import ARCHITECTURES


def test_splits_are_disjoint_deterministic_and_cover_the_data():
    a, b = DigitsDataModule(seed=3, aux_fraction=0.5), DigitsDataModule(seed=3, aux_fraction=0.5)
    a.setup(), b.setup()
    sizes = [len(s) for s in (a.train_set, a.val_set, a.test_set, a.aux_set)]
    assert sum(sizes) == 1797
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    rows = torch.cat([s.tensors[0].flatten(1) for s in (a.train_set, a.val_set, a.test_set, a.aux_set)])
    assert torch.unique(rows, dim=0).shape[0] >= 1797 - 30  # the data set holds a few duplicate images


def test_aux_dataloader_serves_the_held_out_split_only_when_asked_for():
    without = DigitsDataModule(aux_fraction=0.0)
    without.setup()
    assert without.aux_dataloader() is None
    data = DigitsDataModule(aux_fraction=0.5, batch_size=2000)
    data.setup()
    (aux_images, _), (train_images, _) = next(iter(data.aux_dataloader())), next(iter(data.train_dataloader()))
    assert abs(len(aux_images) - len(train_images)) <= 1  # the paper's 1:1 split of the training images
    train_rows = {tuple(row.tolist()) for row in train_images.flatten(1)}
    shared = sum(tuple(row.tolist()) in train_rows for row in aux_images.flatten(1))
    assert shared <= 15  # disjoint indices; only the data set's few duplicate images may coincide


def test_training_order_is_a_function_of_seed_and_epoch():
    data = DigitsDataModule(seed=1)
    data.setup()
    loader = data.train_dataloader()
    first = [y for _, y in loader]
    loader.sampler.set_epoch(1)
    second = [y for _, y in loader]
    loader.sampler.set_epoch(0)
    assert [torch.equal(p, q) for p, q in zip(first, [y for _, y in loader])] == [True] * len(first)
    assert not all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_built_in_network_classifies_upsampled_digits(arch):
    data = DigitsDataModule(image_size=32, channels=3, batch_size=4)
    data.setup()
    x, _ = next(iter(data.train_dataloader()))
    model = ImageClassifier(arch, in_channels=3, image_size=32, width=0.25)
    assert model(x).shape == (4, 10)


def test_bad_data_arguments_name_the_argument():
    with pytest.raises(ValueError, match="`val_fraction`"):
        DigitsDataModule(val_fraction=1.2)
    with pytest.raises(ValueError, match="`batch_size`"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="`arch`"):
        ImageClassifier("alexnet")
