"""Export a trained model for deployment, as its torch.nn twin (``aefast export``).

aefast's fused ops are custom operators that ONNX runtimes and plain PyTorch installs do not
know. Every aefast model has a torch.nn-only twin in :mod:`aefast.reference.models` that loads the
same state_dict and computes the same outputs, so the twin is what gets exported: wrapped with
its :class:`aefast.tasks.AnomalyMap` as a :class:`aefast.tasks.Detector`, whose
``forward(x) -> (reconstruction, anomaly map (N, H, W), image score (N,))``.

Formats (:data:`FORMATS`):

* ``onnx``: ``torch.onnx.export(..., dynamo=True)`` (torch's exporter from torch.export, which
  needs the ``onnxscript`` package; the older TorchScript-based exporter has no ``max_unpool2d``),
  opset 18+, batch size dynamic; pool indices become ONNX MaxPool's second output and MaxUnpool;
* ``torch_export``: ``torch.export.export`` saved with ``torch.export.save`` (``.pt2``; load it
  with ``torch.export.load(path).module()``), batch size dynamic;
* ``torchscript``: ``torch.jit.trace`` saved with ``torch.jit.save`` (``.ts``), traced at the
  example's shape.

The image size is fixed at export time (the pool geometry depends on it); the batch is not.
"""
from __future__ import annotations

import os

import torch

FORMATS = ("onnx", "torch_export", "torchscript")
FILE_NAMES = {"onnx": "detector.onnx", "torch_export": "detector.pt2", "torchscript": "detector.ts"}
OUTPUT_NAMES = ["reconstruction", "anomaly_map", "score"]


def torch_twin(name: str, kwargs: dict, state_dict: dict) -> torch.nn.Module:
    """The torch.nn-only twin of model ``name`` (aefast.models.MODELS) built with ``kwargs`` and
    loaded (strictly) with ``state_dict``, in eval mode."""
    from aefast.reference import models as ref

    if name not in ref.MODELS:
        raise ValueError(f"aefast.export: no torch.nn twin for model {name!r}; choose one of {sorted(ref.MODELS)}")
    twin = ref.MODELS[name](**kwargs)
    twin.load_state_dict(state_dict, strict=True)
    return twin.eval()


def twin_detector(name: str, kwargs: dict, state_dict: dict, scorer=None):
    """A :class:`aefast.tasks.Detector` around the torch.nn twin: what gets exported."""
    from aefast.tasks import Detector

    if name in ("segnet", "fcn"):
        raise ValueError(f"aefast.export: {name!r} is a segmentation model; export takes a reconstruction model "
                         "(its anomaly map is the reconstruction error)")
    return Detector(torch_twin(name, kwargs, state_dict), scorer).eval()


class _TupleOutputs(torch.nn.Module):
    """The detector with a plain tuple out: torch.export.save cannot serialise a NamedTuple's spec, and a
    deployed file should not need aefast's classes to be read anyway."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return tuple(self.detector(x))


def export_detector(detector: torch.nn.Module, example: torch.Tensor, out_dir: str, formats=("onnx", "torch_export")
                    ) -> dict:
    """Writes ``detector`` (a Detector around a torch.nn twin) in each of ``formats`` to ``out_dir``;
    returns {format: path}. ``example`` (N, C, H, W) fixes the image size and dtype."""
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"aefast.export: formats must be a non-empty subset of {FORMATS}, got {formats}")
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError("aefast.export: example must be an (N, C, H, W) tensor")
    os.makedirs(out_dir, exist_ok=True)
    detector = _TupleOutputs(detector).eval()
    # batch 2 at least: torch.export specialises a dimension of size 1
    example = example[:1].expand(max(2, example.shape[0]), *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1)
    paths = {}
    with torch.no_grad():
        for fmt in formats:
            path = os.path.join(out_dir, FILE_NAMES[fmt])
            if fmt == "onnx":
                torch.onnx.export(detector, (example,), path, dynamo=True, input_names=["images"],
                                  output_names=OUTPUT_NAMES, dynamic_shapes={"x": {0: batch}}, external_data=False,
                                  verbose=False)
            elif fmt == "torch_export":
                program = torch.export.export(detector, (example,), dynamic_shapes={"x": {0: batch}})
                torch.export.save(program, path)
            else:
                torch.jit.save(torch.jit.trace(detector, (example,), check_trace=False), path)
            paths[fmt] = path
    return paths


__all__ = ["FILE_NAMES", "FORMATS", "OUTPUT_NAMES", "export_detector", "torch_twin", "twin_detector"]
