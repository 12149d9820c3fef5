"""The documented public names ``lrc.model.load`` / ``lrc.model.save``; their home is
:mod:`lrc.graph.model`."""

from lrc.graph.model import load, save

__all__ = ["load", "save"]
