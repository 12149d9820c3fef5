"""Passes run by onnx-ir's pass manager, with lrc's user errors kept as they are."""

from __future__ import annotations

import onnx_ir as ir

from lrc.errors import LrcError


def run_passes(passes: list, model: ir.Model) -> ir.passes.PassResult:
    """Run ``passes`` in order with onnx-ir's pass manager (each pass's ``requires`` and
    ``ensures`` checked); a user error inside a pass comes out as that LrcError, not wrapped."""
    try:
        return ir.passes.PassManager(passes, steps=1)(model)
    except ir.passes.PassError as e:
        cause = e.__cause__
        while cause is not None:
            if isinstance(cause, (LrcError, KeyboardInterrupt, MemoryError)):
                raise cause from None
            cause = cause.__cause__
        raise


__all__ = ["run_passes"]
