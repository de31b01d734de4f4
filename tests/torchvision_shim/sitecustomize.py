"""Test-environment shim (never part of the package): ``tests/conftest.py`` imports it and puts this folder
first on ``PYTHONPATH``, so DDP-spawned workers and CLI subprocesses load it as their ``sitecustomize``.

PyPI's torchvision 0.28.0 (the release matching torch 2.13.0) is a CUDA build whose compiled operators
cannot load beside this machine's CPU build of torch, so `import torchvision` fails in its meta
registrations ("operator torchvision::nms does not exist"), and so does everything importing
torchmetrics (pytorch_lightning does). Defining the two operator schemas first lets the pure-Python
model zoo import; torch is imported only when torchvision is about to be.
The detection operators themselves stay unavailable (no test uses them).
"""

import sys


class _DefineSchemasBeforeTorchvision:
    """A meta-path finder that finds nothing: it defines the schemas once, then steps aside."""

    library = None

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision" and cls.library is None:
            import torch

            cls.library = torch.library.Library("torchvision", "DEF")
            try:
                cls.library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                cls.library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:  # a torchvision whose compiled operators load defines them itself
                pass
        return None


if not any(getattr(finder, "__name__", "") == _DefineSchemasBeforeTorchvision.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _DefineSchemasBeforeTorchvision)
