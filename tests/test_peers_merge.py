"""benchmarks/peers.py --update: how a run's rows merge into an earlier JSON."""

from __future__ import annotations

import pytest

from benchmods import load
from ggufs import finish


def _peers():
    return load("peers")


def _res(rows, date, seconds=10):
    return {"model": "smollm2", "max_tokens": 2048, "date": date, "machine": f"box {date}",
            "checks": [f"check {date}"], "steps_s": {}, "seconds": seconds, "rows": rows}


def test_a_skipped_row_keeps_what_was_tried_and_a_new_result_replaces():
    peers = _peers()
    old = _res([{"name": "lora", "why": "did not finish in 40 min", "compress_s": 2400.1},
                {"name": "awq", "x_news": 1.2, "bytes": 5, "compress_s": 90.0},
                {"name": "gptq", "why": "not run (opt in)"}], "d1")
    new = _res([{"name": "lora", "why": "not run (opt in with --peers nncf-lora)"},
                {"name": "awq", "x_news": 1.1, "bytes": 5, "compress_s": 80.0},
                {"name": "gptq", "why": "not run (still)"},
                {"name": "kquant", "x_news": 1.3, "bytes": 7, "compress_s": 3.0}], "d2")
    m = peers.merged(old, new)
    rows = {r["name"]: r for r in m["rows"]}
    assert [r["name"] for r in m["rows"]] == ["lora", "awq", "gptq", "kquant"]
    assert rows["lora"]["why"] == "did not finish in 40 min" and rows["lora"]["date"] == "d1"
    assert rows["awq"]["x_news"] == 1.1 and rows["awq"]["date"] == "d2"
    assert rows["gptq"]["why"] == "not run (still)"
    assert m["checks"] == ["check d1", "check d2"] and m["seconds"] == 20


def _gguf(path, tensors):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (values, qtype) in tensors.items():
        data = gguf.quants.quantize(values, qtype)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    finish(w)
    return path


def test_on_source_grid_counts_the_weights_that_come_back_at_the_sources_values(tmp_path):
    """A GGUF quantised again on the source's own format is the source again (on_grid); on
    another grid only the tensors that kept their values count."""
    import numpy as np

    gguf = pytest.importorskip("gguf")

    peers = _peers()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 64)).astype(np.float32), rng.standard_normal((8, 64)).astype(np.float32)
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    src = _gguf(tmp_path / "src.gguf", {"a": (a, q8), "b": (b, q8)})
    # the source's dequantised values, quantised again on its own format: the same codes
    deq = {t.name: gguf.quants.dequantize(t.data, t.tensor_type)
           for t in gguf.GGUFReader(str(src)).tensors}
    again = _gguf(tmp_path / "again.gguf", {"a": (deq["a"], q8), "b": (deq["b"], q8)})
    other = _gguf(tmp_path / "other.gguf", {"a": (deq["a"], q8), "b": (deq["b"], q4)})
    same, half = peers.on_source_grid([again, other], src)
    assert same["weights_identical"] == 1.0 and same["on_grid"] and same["tensors_in_source_type"] == "2/2"
    assert 0.5 <= half["weights_identical"] < 0.6 and not half["on_grid"]
    assert half["tensors_in_source_type"] == "1/2"
    note = peers.grid_note([{"name": "llama.cpp Q4_K_M (x)", "on_source_grid": same},
                            {"name": "llama.cpp Q4_0", "on_source_grid": half}])
    assert "llama.cpp Q4_K_M 100.000%" in note and "llama.cpp Q4_K_M is the source file's format" in note
    assert peers.grid_note([{"name": "NNCF"}]) == ""
