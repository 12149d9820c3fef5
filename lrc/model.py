"""The documented public names ``lrc.model.load`` / ``lrc.model.save``: a model file or folder
read through its reference (:func:`lrc.modelref.resolve`: the folder's format picks the file),
written by :func:`lrc.graph.model.save` (atomically; external data above 2 GB)."""

from lrc.graph.model import save
from lrc.modelref import resolve


def load(path):
    """The model of a .onnx file or an exported folder, as onnx-ir (weights left on disk)."""
    return resolve(path).load()


__all__ = ["load", "save"]
