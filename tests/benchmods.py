"""A script of benchmarks/ as a module, for the tests of its pure parts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """``benchmarks/NAME.py``, imported under ``lrc_bench_NAME`` (its top level runs)."""
    spec = importlib.util.spec_from_file_location(f"lrc_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
