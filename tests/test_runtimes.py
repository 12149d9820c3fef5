"""Runtimes beside ONNX Runtime (lrc.runtime.runtimes): every runtime runs tiny graphs to ORT's
outputs, bench and verify take --runtime, and what a runtime lacks is one line, never a traceback."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import matmul_chain, shared_input
from lrc.errors import LrcError
from lrc.measure import bench as B
from lrc.measure.verify import verify
from lrc.runtime import feeds as F
from lrc.runtime import runtimes as RT
from clirun import lrc, one_line_error as _one_line_error
from test_bench import make_chain, make_decoder

OTHERS = ("openvino", "tract")  # both installed in the dev environment: nothing here skips
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("runtimes")
    chain = d / "chain.onnx"
    onnx.save(matmul_chain(d=16, hidden=64), chain)
    multi = d / "multi.onnx"  # four outputs of three shapes: tract's renamed outputs by index
    onnx.save(shared_input(d=16, outs=(16, 8, 12)), multi)
    (d / "dec").mkdir()
    dec = make_decoder(d / "dec" / "model.onnx")
    big = make_chain(d / "big.onnx", dim=96, layers=3, seed=1)
    low = make_chain(d / "low.onnx", dim=96, layers=3, rank=8, seed=2)
    # com.microsoft Inverse: ONNX Runtime runs it, OpenVINO and tract do not
    g = helper.make_graph([helper.make_node("Inverse", ["x"], ["y"], domain="com.microsoft")], "inv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    inv = d / "inverse.onnx"
    onnx.save(m, inv)
    return {"chain": chain, "multi": multi, "dec": dec, "dec_dir": d / "dec", "big": big,
            "low": low, "inverse": inv}


def test_registry():
    assert RT.runtime_names() == ["ort", "openvino", "tract"]
    for name in RT.runtime_names():
        rt = RT.get_runtime(name)
        assert rt.installed() and rt.version()
        assert "f32" in rt.precisions
    assert RT.get_runtime("openvino").install == "pip install 'lrc[openvino]'"
    assert RT.get_runtime("tract").install == "pip install 'lrc[tract]'"
    with pytest.raises(LrcError, match="unknown runtime 'tvm'"):
        RT.get_runtime("tvm")


@pytest.mark.parametrize("runtime", OTHERS)
@pytest.mark.parametrize("graph", ["chain", "multi"])
def test_runtime_equals_ort(files, runtime, graph):
    ref = RT.load(files[graph], "ort", threads=1)
    feeds = F.random_feeds(ref.sess, dims={"batch": 2, "seq": 5, "n": 7}, seed=1)
    want = ref.run(feeds)
    m = RT.load(files[graph], runtime, threads=1)
    assert [o.name for o in m.get_outputs()] == [o.name for o in ref.get_outputs()]
    got = m.run(feeds)
    assert len(got) == len(want)
    for a, b in zip(want, got):  # graph-output order: shapes and values match one by one
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    d = m.describe()
    assert d["runtime"] == runtime and d["precision"] == "f32" and d["version"]


@pytest.mark.parametrize("runtime", OTHERS)
def test_decoder_with_cache_equals_ort(files, runtime):
    """Prefill with an empty cache, then a decode step on the cache it returned."""
    ref = RT.load(files["dec"], "ort", threads=1)
    m = RT.load(files["dec"], runtime, threads=1)
    rng = np.random.default_rng(0)
    pre = F.random_token_feeds(ref.sess, 1, 6, rng=rng, vocab=50)
    want, got = ref.run(pre), m.run(pre)
    names = [o.name for o in ref.get_outputs()]
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    step = F.random_token_feeds(ref.sess, 1, 1, past_len=6, rng=rng, vocab=50, with_past=False)
    cache = {past: want[names.index(pres)] for pres, past in F.present_to_past(ref.sess).items()}
    want2, got2 = ref.run({**step, **cache}), m.run({**step, **cache})
    assert got2[names.index("present.0.key")].shape == (1, 2, 7, 16)
    for a, b in zip(want2, got2):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_missing_runtime_is_one_line(monkeypatch):
    gone = dataclasses.replace(RT.get_runtime("openvino"), module="lrc_no_such_module_xyz")
    with pytest.raises(LrcError) as ei:
        gone.check()
    msg = str(ei.value)
    assert "\n" not in msg and "pip install 'lrc[openvino]'" in msg and "not installed" in msg
    monkeypatch.setitem(RT._BY_NAME, "openvino", gone)
    with pytest.raises(LrcError, match=r"pip install 'lrc\[openvino\]'"):
        B.bench(["no-such-model.onnx"], runtimes=("ort", "openvino"))  # before reading models


def test_precision_is_pinned_and_checked(files):
    with pytest.raises(LrcError, match="runs at f32"):
        RT.load(files["chain"], "tract", precision="f16")
    with pytest.raises(LrcError, match="precision 'f8'"):
        RT.load(files["chain"], "openvino", precision="f8")
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in caps:  # the CPU computes bf16: pinned, stated, and measurably not f32
        m = RT.load(files["chain"], "openvino", precision="bf16")
        assert m.describe()["precision"] == "bf16"
    else:  # asked for what the CPU lacks: refused, never silently f32
        with pytest.raises(LrcError, match="cannot compute in bf16"):
            RT.load(files["chain"], "openvino", precision="bf16")


@pytest.mark.parametrize("runtime", OTHERS)
def test_unsupported_op_is_clear(files, runtime):
    with pytest.raises(LrcError) as ei:
        RT.load(files["inverse"], runtime).run({"x": np.eye(3, dtype=np.float32)})
    msg = str(ei.value)
    assert "\n" not in msg and "Stack backtrace" not in msg and ".cpp" not in msg
    assert msg.startswith(("OpenVINO cannot", "tract cannot")) and "Inverse" in msg
    assert "com.microsoft ops: Inverse" in msg
    r = lrc("verify", files["inverse"], files["inverse"], "--runtime", runtime)
    assert "Inverse" in _one_line_error(r)


def test_bench_on_every_runtime(files):
    res = B.bench([files["big"], files["low"]], runtimes=("ort", "openvino", "tract"), threads=1,
                  seq_lens=(32,), warmup=1, runs=5, memory=False, amdahl=False)
    json.dumps(res)
    s = res["settings"]
    assert s["runtimes"] == ["ort", "openvino", "tract"] and s["precision"] == "f32"
    assert [t["key"] for t in s["targets"]] == ["cpu", "openvino", "tract"]
    assert all(t["describe"]["precision"] == "f32" for t in s["targets"])
    by = {(r["runtime"], r["model"]): r for r in res["runs"]}
    assert len(by) == 6
    for rt in ("ort", "openvino", "tract"):
        assert by[(rt, "big")]["speedup"] == 1.0  # ratios to the first model, per runtime
        # the ratio of medians to the first model on the same runtime (not a timing assertion:
        # at 96 wide a rank-8 pair's 1/6 of the FLOPs can drown in per-call overhead on CI)
        low, big = by[(rt, "low")], by[(rt, "big")]
        assert low["speedup"] == pytest.approx(big["p50_ms"] / low["p50_ms"]) and low["speedup"] > 0
        assert by[(rt, "big")]["n"] == 5
    assert set(res["models"][0]["sessions"]) == {"cpu", "openvino", "tract"}
    from test_bench import tables_text

    text = tables_text(res)
    assert "Latency (OpenVINO" in text and "Latency (tract" in text and "f32" in text


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_bench_decoder_decode_on_every_runtime(files):
    res = B.bench([files["dec_dir"]], runtimes=("ort", "openvino", "tract"), threads=1,
                  seq_lens=(8,), decode_tokens=3, warmup=0, runs=2, memory=False, amdahl=False)
    phases = {(r["runtime"], r["phase"]) for r in res["runs"]}
    assert phases == {(rt, ph) for rt in ("ort", "openvino", "tract") for ph in ("prefill", "decode")}
    assert not [n for n in res["notes"] if "not measured" in n]


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_bench_skips_what_a_runtime_cannot_run(files):
    res = B.bench([files["big"], files["inverse"]], runtimes=("tract",), threads=1,
                  seq_lens=(4,), warmup=0, runs=2, memory=False, amdahl=False)
    assert {r["model"] for r in res["runs"]} == {"big"}
    assert any("[tract] inverse not measured" in n and "Inverse" in n for n in res["notes"])
    # the reference itself fails: nothing to measure is an error, not an empty result
    with pytest.raises(LrcError, match="nothing could be measured"):
        B.bench([files["inverse"]], runtimes=("openvino",), runs=1, warmup=0, memory=False,
                amdahl=False)
    with pytest.raises(LrcError, match="add ort to runtime"):
        B.bench([files["big"]], eps=("cuda",), runtimes=("tract",))


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_cli_bench_and_verify_with_runtime(files, tmp_path):
    out = tmp_path / "b.json"
    r = lrc("bench", files["big"], files["low"], "--runtime", "ort,openvino,tract", "--runs", "3",
            "--warmup", "1", "--seq", "16", "--threads", "1", "--save", out)
    assert r.returncode == 0, r.stderr
    assert "Latency (OpenVINO" in r.stdout and "Latency (tract" in r.stdout
    rows = json.loads(out.read_text())["runs"]
    assert {x["runtime"] for x in rows} == {"ort", "openvino", "tract"}
    for rt in OTHERS:
        r = lrc("verify", files["chain"], files["chain"], "--runtime", rt, "--rtol", "1e-5")
        assert r.returncode == 0, r.stderr
        assert "NEW on" in r.stdout and "f32" in r.stdout and "cosine" in r.stdout
    line = _one_line_error(lrc("bench", files["big"], "--runtime", "ort,tvm"))
    assert "unknown runtime 'tvm'" in line


def test_verify_new_on_runtime_against_ort(files, tmp_path):
    # a different NEW: the error is the rewrite's, measured with NEW on tract
    res = verify(files["big"], files["low"], runtime="tract", dims={"batch": 1, "seq": 4})
    assert res["runtimes"]["new"].startswith("tract") and "f32" in res["runtimes"]["new"]
    ref = verify(files["big"], files["low"], dims={"batch": 1, "seq": 4})
    assert res["outputs"]["y"]["max_abs"] == pytest.approx(ref["outputs"]["y"]["max_abs"], rel=1e-3)
    dims = {"past_sequence_length": 4, "sequence_length": 3, "total_sequence_length": 7}
    same = verify(files["dec"], files["dec"], runtime="openvino", dims=dims)
    assert set(same["outputs"]) == {"logits", "present.0.key", "present.0.value"}
    assert same["worst_rel"] < 1e-5 and same["structure"]["openvino_load"] == "ok"
