"""lrc.runtime.decodecost: the per-node MatMul times target-size's decode budget is priced with."""

import json

import pytest

from lrc.runtime.decodecost import DecodeCost, decode_cost


def test_measured_times_are_positive_and_a_correction_costs_time(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path))
    c = decode_cost(threads=1, runs=3, stream_bytes=16e6)  # a small stream: fast
    assert set(c.node) == {"4/32", "4/64", "4/128", "8/32", "f32"}
    assert all(c0 >= 0 and c1 > 0 for c0, c1 in c.node.values())
    plain = c.group(576, [960], 4, 32)
    assert plain > 0
    assert c.group(576, [960], 4, 32, rank=32, a_bits=4) > plain  # X·A, the Concat, K + 32
    assert c.group(576, [1536, 1536], 4, 32) > c.group(576, [1536], 4, 32)
    # over a prompt: the same kinds, every one slower than at one token, a correction dearer
    assert set(c.prefill) == set(c.node) and c.tokens == 128
    pre = c.group(576, [960], 4, 32, prefill=True)
    assert pre > plain and c.group(576, [960], 4, 32, rank=32, a_bits=4, prefill=True) > pre
    # the second call reads the machine's cache file instead of measuring
    files = list((tmp_path / "decode").glob("*.json"))
    assert len(files) == 1
    fake = DecodeCost(node={"4/32": (1.0, 0.0)}, concat=2.0, threads=1, where="test")
    files[0].write_text(json.dumps(fake.__dict__))
    again = decode_cost(threads=1)
    assert again.group(8, [8], 4, 32, rank=8, a_bits=4) == pytest.approx(1 + 1 + 2)
    assert again.matmul(8, 8, 4, 128) == 1.0  # a kind not measured: block 32's time
