"""Tests of lrc.measure.bench (and the runtime pieces it times with) on tiny synthetic ONNX
graphs built with onnx.helper (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrc.errors import LrcError
from lrc.graph.model import file_size
from lrc.measure import bench as B
from lrc.present.bench import format_tables
from lrc.runtime.profile import amdahl_bound
from lrc.runtime.providers import PROVIDERS, resolve_ep
from lrc.runtime.runner import Runner
from lrc.runtime.session import open_session

OPSET = [helper.make_opsetid("", 17)]


def _save(graph, path: Path, external: bool = False) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def make_chain(path: Path, dim: int, layers: int, rank: int | None = None, seed: int = 0,
               external: bool = False) -> Path:
    """x[batch, seq, dim] -> (MatMul W_i -> Relu) x layers; with ``rank``: MatMul(MatMul(x, A), B)."""
    rng = np.random.default_rng(seed)
    inits, nodes, cur = [], [], "x"
    for i in range(layers):
        if rank is None:
            w = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"layer{i}/MatMul"))
        else:
            a = (rng.standard_normal((dim, rank)) / np.sqrt(dim)).astype(np.float32)
            b = (rng.standard_normal((rank, dim)) / np.sqrt(rank)).astype(np.float32)
            inits += [numpy_helper.from_array(a, f"A{i}"), numpy_helper.from_array(b, f"B{i}")]
            nodes.append(helper.make_node("MatMul", [cur, f"A{i}"], [f"t{i}"], name=f"layer{i}/MatMul_A"))
            nodes.append(helper.make_node("MatMul", [f"t{i}", f"B{i}"], [f"m{i}"], name=f"layer{i}/MatMul_B"))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"layer{i}/Relu"))
        cur = out
    g = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        inits)
    return _save(g, path, external)


def make_decoder(path: Path, vocab: int = 50, hidden: int = 32, heads: int = 2, seed: int = 0,
                 past: str = "past_key_values.0", present: str = "present.0") -> Path:
    """One attention layer in optimum's decoder layout (input_ids, attention_mask, position_ids,
    past_key_values.0.key/value -> logits, present.0.key/value); ``past`` / ``present`` rename
    the cache (e.g. ``past.0`` / ``present.0``)."""
    pk, pv, ok, ov = f"{past}.key", f"{past}.value", f"{present}.key", f"{present}.value"
    rng = np.random.default_rng(seed)
    hd = hidden // heads

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    inits = [w("E", vocab, hidden), w("P", 512, hidden), w("Wq", hidden, hidden), w("Wk", hidden, hidden),
             w("Wv", hidden, hidden), w("Wo", hidden, hidden), w("Wlm", hidden, vocab),
             numpy_helper.from_array(np.array([0, 0, heads, hd], np.int64), "split_shape"),
             numpy_helper.from_array(np.array([0, 0, hidden], np.int64), "merge_shape"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    n = helper.make_node
    nodes = [
        n("Gather", ["E", "input_ids"], ["tok"], name="embed"),
        n("Gather", ["P", "position_ids"], ["pos"], name="pos_embed"),
        n("Add", ["tok", "pos"], ["x"], name="add_pos"),
    ]
    for p, wname in (("q", "Wq"), ("k", "Wk"), ("v", "Wv")):
        nodes += [n("MatMul", ["x", wname], [f"{p}_lin"], name=f"attn/{p}_proj/MatMul"),
                  n("Reshape", [f"{p}_lin", "split_shape"], [f"{p}_4d"], name=f"attn/{p}_reshape"),
                  n("Transpose", [f"{p}_4d"], [f"{p}_h"], perm=[0, 2, 1, 3], name=f"attn/{p}_transpose")]
    nodes += [
        n("Concat", [pk, "k_h"], [ok], axis=2, name="cat_k"),
        n("Concat", [pv, "v_h"], [ov], axis=2, name="cat_v"),
        n("Transpose", [ok], ["kT"], perm=[0, 1, 3, 2], name="attn/kT"),
        n("MatMul", ["q_h", "kT"], ["scores"], name="attn/qk/MatMul"),
        n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
        n("Sub", ["one", "maskf"], ["inv"], name="mask_inv"),
        n("Mul", ["inv", "neg"], ["bias2d"], name="mask_bias"),
        n("Unsqueeze", ["bias2d", "ax12"], ["bias4d"], name="mask_unsq"),
        n("Add", ["scores", "bias4d"], ["scores_m"], name="mask_add"),
        n("Softmax", ["scores_m"], ["probs"], axis=-1, name="softmax"),
        n("MatMul", ["probs", ov], ["ctx_h"], name="attn/pv/MatMul"),
        n("Transpose", ["ctx_h"], ["ctx_t"], perm=[0, 2, 1, 3], name="attn/ctx_transpose"),
        n("Reshape", ["ctx_t", "merge_shape"], ["ctx"], name="attn/ctx_reshape"),
        n("MatMul", ["ctx", "Wo"], ["o"], name="attn/o_proj/MatMul"),
        n("Add", ["x", "o"], ["h"], name="residual"),
        n("MatMul", ["h", "Wlm"], ["logits"], name="lm_head/MatMul"),
    ]
    kv = ["batch_size", heads, "past_sequence_length", hd]
    kv_out = ["batch_size", heads, "past_sequence_length + 1", hd]
    g = helper.make_graph(
        nodes, "tiny_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info(pk, TensorProto.FLOAT, kv),
         helper.make_tensor_value_info(pv, TensorProto.FLOAT, kv)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]),
         helper.make_tensor_value_info(ok, TensorProto.FLOAT, kv_out),
         helper.make_tensor_value_info(ov, TensorProto.FLOAT, kv_out)],
        inits)
    return _save(g, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_models")
    big = make_chain(d / "big.onnx", dim=384, layers=4, seed=1)
    lowrank = make_chain(d / "lowrank.onnx", dim=384, layers=4, rank=48, seed=2)
    small = make_chain(d / "small.onnx", dim=32, layers=2, seed=3)
    dec_dir = d / "decoder"
    dec_dir.mkdir()
    dec = make_decoder(dec_dir / "model.onnx")
    return {"big": big, "lowrank": lowrank, "small": small, "decoder_dir": dec_dir, "decoder": dec}


def _check_stats(row):
    assert row["n"] >= 1
    assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert row["mean_ms"] > 0


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_encoders_interleaved(models):
    res = B.bench([models["big"], models["lowrank"], models["small"]], threads=1, seq_lens=(64,),
                  warmup=3, runs=25)
    json.dumps(res)  # JSON-serialisable
    assert res["schema"] == B.SCHEMA
    assert res["settings"]["interleaved"] and res["settings"]["allow_spinning"] is False
    m = res["machine"]
    assert m["onnxruntime"] == ort.__version__ and m["cpu"] and m["logical_cores"] >= 1
    names = [e["name"] for e in res["models"]]
    assert names == ["big", "lowrank", "small"]
    for e in res["models"]:
        assert e["kind"] == "encoder"
        assert e["size_bytes"] > 0
        s = e["sessions"]["cpu"]
        assert s["load_s"] > 0 and "rss_after_first_run_mb" in s
    rows = {r["model"]: r for r in res["runs"]}
    assert len(res["runs"]) == 3
    for r in rows.values():
        _check_stats(r)
        assert r["n"] == 25 and r["phase"] == "encoder" and r["batch"] == 1 and r["seq"] == 64
        assert r["runtime"] == "ort" and r["ep"] == "cpu"  # the default: ORT's CPU EP only
    assert rows["big"]["speedup"] == 1.0
    # 384x384 x4 layers does ~290x the FLOPs of 32x32 x2 layers: it must be measured slower
    assert rows["big"]["p50_ms"] > rows["small"]["p50_ms"]
    assert rows["small"]["speedup"] > 1.0
    # each round's times kept; the paired speedup and its interval against the first model
    assert all(len(r["rounds_ms"]) == 25 for r in rows.values())
    assert "paired_speedup" not in rows["big"]
    lo, hi = rows["small"]["speedup_ci95"]
    assert 1.0 < lo <= rows["small"]["paired_speedup"] <= hi
    # rho from the graph: rank 48 of 384 -> 2*48/384 = 0.25 of the weight-MatMul params
    lr = res["models"][1]
    assert lr["weight_matmul_params"] == 4 * 2 * 384 * 48
    assert lr["flop_ratio"] == pytest.approx(0.25) and lr["flop_ratio_source"] == "graph"
    f = res["amdahl"]["matmul_fraction"]["encoder"]
    assert 0.0 < f <= 1.0
    assert lr["amdahl_bound"]["encoder"] == pytest.approx(1.0 / ((1 - f) + f * 0.25))
    assert res["models"][0]["amdahl_bound"] is None

    from rich.console import Console

    con = Console(record=True, width=200)
    tables = format_tables(res)
    assert len(tables) >= 3
    for t in tables:
        con.print(t)
    text = con.export_text()
    assert "lowrank" in text and "p50 ms" in text and "Amdahl" in text


def test_paired_speedup_sees_through_drift():
    """Rounds timed back to back: a 3 % difference under a drift of 2x between rounds is found,
    with an interval that excludes 1; the same times are an interval around 1."""
    def noisy(seed):
        return 1 + 0.01 * np.random.default_rng(seed).standard_normal(40)

    drift = np.linspace(1.0, 2.0, 40)
    ref, new = list(drift * noisy(1)), list(drift / 1.03 * noisy(2))
    p = B.paired_speedup(ref, new)
    assert p["paired_speedup"] == pytest.approx(1.03, rel=0.01)
    assert 1.0 < p["speedup_ci95"][0] < 1.03 < p["speedup_ci95"][1]
    same = B.paired_speedup(ref, list(drift * noisy(3)))
    assert same["speedup_ci95"][0] < 1.0 < same["speedup_ci95"][1]
    assert B.paired_speedup(ref[:4], new[:4]) is None


def test_decoder_prefill_and_decode(models):
    res = B.bench([models["decoder_dir"]], threads=1, seq_lens=(16,), batch_sizes=(1, 2), decode_tokens=4,
                  warmup=1, runs=5)
    assert res["models"][0]["kind"] == "decoder"
    assert res["models"][0]["name"] == "decoder"
    phases = {(r["phase"], r["batch"]) for r in res["runs"]}
    assert phases == {("prefill", 1), ("decode", 1), ("prefill", 2), ("decode", 2)}
    for r in res["runs"]:
        _check_stats(r)
        assert r["speedup"] == 1.0
        if r["phase"] == "decode":
            assert r["decode_tokens"] == 4
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000.0 / r["p50_ms"])
    assert set(res["amdahl"]["matmul_fraction"]) == {"prefill", "decode"}


def test_decoder_feeds_grow_cache(models):
    r = Runner(open_session(models["decoder"]), "d")
    assert r.is_decoder and r.present_to_past == {"present.0.key": "past_key_values.0.key",
                                                  "present.0.value": "past_key_values.0.value"}
    assert r.vocab == 50  # from the embedding Gather
    f = r.feeds(2, 8)
    assert f["past_key_values.0.key"].shape == (2, 2, 0, 16)
    assert 1 <= f["input_ids"].min() and f["input_ids"].max() < 50
    step = r.feeds(2, 1, past_len=8, with_past=False)
    assert "past_key_values.0.key" not in step and step["attention_mask"].shape == (2, 9)
    assert step["position_ids"].tolist() == [[8], [8]]
    r.prepare(1, 8, 3)
    dt, d = r.one_round()
    assert dt > 0 and d > 0
    _, outs = r.run_bound(r.prefill_values)
    assert outs["present.0.key"].shape() == [1, 2, 8, 16]
    _, outs = r.decode_step(r.step_values[0], outs)
    assert outs["present.0.key"].shape() == [1, 2, 9, 16]


def test_missing_ep_is_one_line_error(models):
    avail = set(ort.get_available_providers())
    missing = next((p.alias for p in PROVIDERS if p.name not in avail), None)
    if missing is None:  # pragma: no cover
        pytest.skip("every known EP is available here")
    with pytest.raises(LrcError) as ei:
        B.bench([models["small"]], eps=(missing,), runs=1, warmup=0)
    assert "not available" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(LrcError, match="unknown execution provider"):
        resolve_ep("no-such-ep")


def test_missing_model_is_lrc_error(tmp_path):
    with pytest.raises(LrcError):
        B.bench([tmp_path / "nope.onnx"])


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_baselines_run(models, tmp_path):
    res = B.bench([models["big"]], threads=1, seq_lens=(32,), warmup=1, runs=3, baselines=True,
                  workdir=tmp_path, amdahl=False)
    kinds = {e["baseline"]: e for e in res["models"]}
    assert {"int8-dynamic", "int4-matmulnbits", "ort-optimized"} <= set(kinds), res["notes"]
    measured = {r["model"] for r in res["runs"]}
    for kind in ("int8-dynamic", "int4-matmulnbits", "ort-optimized"):
        e = kinds[kind]
        assert Path(e["path"]).is_file() and e["size_bytes"] > 0
        assert e["name"] in measured
        assert e["amdahl_bound"] is None  # no bound for quantised baselines
    ops = {n.op_type for n in onnx.load(kinds["int8-dynamic"]["path"]).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    ops = {n.op_type for n in onnx.load(kinds["int4-matmulnbits"]["path"]).graph.node}
    assert "MatMulNBits" in ops
    # 4-bit weights are much smaller than float32 ones
    assert kinds["int4-matmulnbits"]["size_bytes"] < 0.3 * res["models"][0]["size_bytes"]
    assert any("ort-optimized" in n for n in res["notes"])  # no config.json: says what it did


def test_external_data_size_and_summary_ratio(tmp_path):
    p = make_chain(tmp_path / "ext.onnx", dim=64, layers=2, external=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file()
    assert file_size(p) == p.stat().st_size + data.stat().st_size
    assert B.summary_flop_ratio({"totals": {"params_after": 30, "params_before": 120}}) == 0.25
    assert B.summary_flop_ratio({"flop_ratio": 0.5}) == 0.5
    assert B.summary_flop_ratio({"totals": {}}) is None
    (tmp_path / "ext.onnx.lrc.json").write_text(json.dumps({"totals": {"params_after": 1, "params_before": 4}}))
    assert B.summary_flop_ratio(B.summary_for(p)) == 0.25
    assert amdahl_bound(0.8, 0.5) == pytest.approx(1 / 0.6)


def test_empty_folder_is_lrc_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrcError, match="no .onnx"):
        B.bench([tmp_path / "empty"])


@pytest.mark.slow
def test_optimum_tiny_llama(tmp_path):
    """A real optimum export (text-generation-with-past) of a tiny random Llama."""
    transformers = pytest.importorskip("transformers")
    exporters = pytest.importorskip("optimum.exporters.onnx")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    exporters.main_export(str(tmp_path / "hf"), str(tmp_path / "onnx"), task="text-generation-with-past")
    res = B.bench([tmp_path / "onnx"], threads=1, seq_lens=(32,), decode_tokens=4, warmup=1, runs=5)
    assert res["models"][0]["kind"] == "decoder"
    assert {r["phase"] for r in res["runs"]} == {"prefill", "decode"}
    assert all(r["p50_ms"] > 0 for r in res["runs"])
    assert set(res["amdahl"]["matmul_fraction"]) == {"prefill", "decode"}


def test_bench_labels_inputs_as_they_are(tmp_path):
    """An image-shaped input is reported as its shape (1x3x8x8), not as "seq 128"."""
    from lrc.measure.bench import bench

    w = numpy_helper.from_array(np.ones((192, 4), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "img", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = tmp_path / "img.onnx"
    onnx.save(m, p)
    res = bench([p], runs=2, warmup=1, amdahl=False, memory=False)
    assert {r["input"] for r in res["runs"]} == {"1x3x8x8"}
    text = tables_text(res)
    assert "1x3x8x8" in text and "seq" not in text


def tables_text(res: dict) -> str:
    """What ``lrc bench`` prints for ``res``, as plain text."""
    from rich.console import Console

    from lrc.present.bench import format_tables

    con = Console(record=True, width=200)
    for t in format_tables(res):
        con.print(t)
    return con.export_text()
