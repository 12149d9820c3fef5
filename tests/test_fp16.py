"""Float16 models end to end: locate, compress (factors fp16), quantise, eval, bench.

fp16 models are made the way users make them, with ONNX Runtime's converter
(``onnxruntime.transformers.float16.convert_float_to_float16``), in its three layouts: fp16
everywhere, fp16 inside with float32 inputs/outputs (``keep_io_types``), and fp16 weights a
float32 MatMul reads through ``Cast`` (``op_block_list=["MatMul"]``,
``force_fp16_initializers``).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

import lrc
from clirun import lrc as lrc_cli, one_line_error
from graphs import matmul_chain, run, to_proto
from lrc.errors import LrcError
from lrc.graph.locate import locate
from lrc.pipeline import CompressConfig, compress_file

float16 = pytest.importorskip("onnxruntime.transformers.float16")

LAYOUTS = ("fp16", "keep-io", "cast")


def to_fp16(model: onnx.ModelProto, layout: str) -> onnx.ModelProto:
    """``model`` converted by ORT's converter in ``layout`` (see the module docstring)."""
    kw = {"keep_io_types": layout != "fp16"}
    if layout == "cast":
        kw.update(op_block_list=["MatMul"], force_fp16_initializers=True)
    m16 = float16.convert_float_to_float16(model, **kw)
    # keep_io_types appends the input Casts at the end of the node list: ONNX Runtime runs
    # that, the onnx checker (which lrc runs on what it writes) does not. Sorted here so these
    # tests exercise fp16 handling; lrc.graph.model.load sorting on load is a separate change.
    g = ir.serde.deserialize_model(m16)
    g.graph.sort()
    return ir.serde.serialize_model(g)


def _rel(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(ref - got) / np.linalg.norm(ref))


def _x(layout, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, 5, d)).astype(np.float32)
    return x.astype(np.float16) if layout == "fp16" else x


def _lrc_inits(p: onnx.ModelProto) -> dict[str, int]:
    return {i.name: i.data_type for i in p.graph.initializer if ".lrc_" in i.name}


# ----------------------------------------------------------------------------------- locate
@pytest.mark.parametrize("layout", LAYOUTS)
def test_locate_finds_fp16_targets_in_every_layout(layout):
    ts = locate(ir.serde.deserialize_model(to_fp16(matmul_chain(), layout)))
    assert [t.role for t in ts] == ["attn.o", "ffn.up", "ffn.down"]
    assert all(t.eligible and t.dtype == "float16" for t in ts), [t.skip for t in ts]
    want = ir.DataType.FLOAT if layout == "cast" else ir.DataType.FLOAT16
    assert all(t.compute_dtype == want for t in ts)
    assert all((t.cast_to is not None) == (layout == "cast") for t in ts)


def test_cast_of_an_int_weight_is_listed_with_its_reason():
    m = matmul_chain()
    w = m.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w)
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.int8), w.name))
    m.graph.node.insert(0, onnx.helper.make_node("Cast", [w.name], ["w_f"], to=TensorProto.FLOAT))
    m.graph.node[1].input[1] = "w_f"
    ts = locate(ir.serde.deserialize_model(m))
    assert [t.role for t in ts] == ["attn.o", "ffn.up", "ffn.down"]
    assert ts[0].skip == "weight is Cast from int8 (not a float)"
    assert ts[1].eligible and ts[1].cast_to is None


# --------------------------------------------------------------------------------- compress
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compress_fp16_stores_fp16_factors_close_to_fp32(layout):
    d, hidden, rank = 64, 256, 16
    m32 = matmul_chain(d=d, hidden=hidden)
    m16 = to_fp16(m32, layout)
    x = _x(layout, d)
    new32, _ = lrc.compress(matmul_chain(d=d, hidden=hidden), rank=rank, method="svd")
    new16, rep = lrc.compress(m16, rank=rank, method="svd")
    p32, p16 = to_proto(new32), to_proto(new16)
    onnx.checker.check_model(p16, full_check=True)
    factors = _lrc_inits(p16)
    assert len(factors) == 6 and set(factors.values()) == {TensorProto.FLOAT16}
    assert {r["dtype"] for r in rep["rewritten"]} == {"float16"}
    assert any("float16" in n for n in rep["notes"])
    if layout == "cast":  # the factors reach the float32 MatMuls through Casts, like W did
        casts = [n for n in p16.graph.node if n.op_type == "Cast" and n.input[0] in factors]
        assert len(casts) == 6
    y32 = run(p32, {"x": x.astype(np.float32)})[0]
    y16 = run(p16, {"x": x})[0]
    assert y16.dtype == (np.float16 if layout == "fp16" else np.float32)
    assert _rel(y32, y16) < 1e-2  # fp16 rounding of weights, factors (and activations)
    # the file halves with the factors (graph bytes are the same, weights half as wide)
    ratio = len(p16.SerializeToString()) / len(p32.SerializeToString())
    assert 0.45 < ratio < 0.6, ratio


@pytest.mark.parametrize("layout", ("fp16", "cast"))
def test_rank_full_on_fp16_is_close_to_the_original(layout):
    m16 = to_fp16(matmul_chain(d=32, hidden=64), layout)
    x = _x(layout, 32, seed=1)
    ref = run(m16, {"x": x})[0]
    new, rep = lrc.compress(m16, rank="full")
    assert rep["totals"]["rewritten"] == 3
    got = run(to_proto(new), {"x": x})[0]
    assert _rel(ref, got) < 5e-3  # exact math; only the fp16 rounding of A and B


# --------------------------------------------------------------------------------- quantise
@pytest.mark.parametrize("layout", ("fp16", "cast"))
@pytest.mark.parametrize("correct", (0, 8))
def test_quantize_int4_on_fp16(layout, correct):
    d, hidden = 64, 128
    x = _x(layout, d, seed=2)
    kw = dict(quantize="int4", correct_rank=str(correct), method="svd")
    new32, _ = lrc.compress(matmul_chain(d=d, hidden=hidden), **kw)
    new16, rep = lrc.compress(to_fp16(matmul_chain(d=d, hidden=hidden), layout), **kw)
    p16 = to_proto(new16)
    onnx.checker.check_model(p16, full_check=True)
    nbits = [n for n in p16.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 and not [n for n in p16.graph.node if n.op_type == "MatMul"
                                    and n.input[1] in {i.name for i in p16.graph.initializer}
                                    and "lrc_corr" not in n.name]
    inits = {i.name: i for i in p16.graph.initializer}
    want = TensorProto.FLOAT16 if layout == "fp16" else TensorProto.FLOAT
    # scales: float16 on disk either way; a float32 node reads them cast back to its dtype
    casts = {n.output[0]: n for n in p16.graph.node if n.op_type == "Cast"}
    assert {inits[n.input[2]].data_type for n in nbits if n.input[2] in inits} == (
        {want} if layout == "fp16" else set())
    read = [casts[n.input[2]] for n in nbits if n.input[2] in casts]
    assert len(read) == (0 if layout == "fp16" else 3)
    assert {inits[c.input[0]].data_type for c in read} <= {TensorProto.FLOAT16}
    assert {next(a.i for a in c.attribute if a.name == "to") for c in read} <= {want}
    if correct:
        corr = [i for n, i in inits.items() if ".lrc_corr" in n]
        assert corr and {i.data_type for i in corr} == {want}
    y32 = run(to_proto(new32), {"x": x.astype(np.float32)})[0]
    y16 = run(p16, {"x": x})[0]
    assert _rel(y32, y16) < 2e-2  # the same codes but where fp16 rounding flips one
    ref = run(matmul_chain(d=d, hidden=hidden), {"x": x.astype(np.float32)})[0]
    assert _rel(ref, y16) < 0.25
    assert rep["quantize"]["skipped"] == []


def test_quantize_int8_on_fp16_is_refused():
    with pytest.raises(LrcError, match="float16.*DynamicQuantizeMatMul.*int4 or int8-weight"):
        lrc.compress(to_fp16(matmul_chain(), "fp16"), quantize="int8")
    # weights stored fp16 but multiplied in float32 (Cast): int8 works
    new, rep = lrc.compress(to_fp16(matmul_chain(), "cast"), quantize="int8")
    assert [n["scheme"] for n in rep["quantize"]["nodes"]] == ["int8"] * 3


# ------------------------------------------------------------------ the CLI, one line of error
@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_cli_fp16_compress_and_int8_refusal(tmp_path):
    src = tmp_path / "m16.onnx"
    onnx.save(to_fp16(matmul_chain(d=32, hidden=64), "fp16"), src)
    r = lrc_cli("compress", src, "--rank", "8", "--method", "svd", "-o", tmp_path / "r8.onnx")
    assert r.returncode == 0, r.stderr
    assert set(_lrc_inits(onnx.load(tmp_path / "r8.onnx")).values()) == {TensorProto.FLOAT16}
    r = lrc_cli("compress", src, "--quantize", "int8", "-o", tmp_path / "q.onnx")
    assert "float16" in one_line_error(r)
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------ a real export: the tiny LLaMA
from fixtures_export import ort_feed, tiny_llama  # noqa: E402,F401  (module fixture)


@pytest.fixture(scope="module")
def llama16(tiny_llama, tmp_path_factory):
    """The tiny LLaMA export converted to fp16 (fp16 inputs/outputs, KV cache fp16)."""
    _, folder = tiny_llama
    out = tmp_path_factory.mktemp("llama16") / "onnx"
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, out / f.name)
    onnx.save(to_fp16(onnx.load(folder / "model.onnx"), "fp16"), out / "model.onnx")
    return folder, out


def _logits(path, seq=12):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    f = ort_feed(s, np.random.default_rng(0).integers(3, 256, (1, seq)))
    for i in s.get_inputs():
        if i.type == "tensor(float16)":
            f[i.name] = f[i.name].astype(np.float16)
    return s.run(["logits"], f)[0].astype(np.float32)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_tiny_llama_fp16_svd_llm(llama16, tmp_path):
    """Calibration runs the fp16 graph (fp16 activations, statistics in float64); the factors
    are fp16 and the compressed model is close to the fp32 one compressed the same way."""
    f32, f16 = llama16
    cfg = dict(ratio=0.6, method="svd-llm", calib_tokens=2048)
    c32, c16 = tmp_path / "c32.onnx", tmp_path / "c16.onnx"
    s32 = compress_file(f32, c32, CompressConfig.of(**cfg))
    s16 = compress_file(f16, c16, CompressConfig.of(**cfg))
    assert s16["totals"]["rewritten"] == s32["totals"]["rewritten"] > 0
    assert {r["method"] for r in s16["rewritten"]} == {r["method"] for r in s32["rewritten"]}
    assert all(r["method"].startswith("svd-llm") for r in s16["rewritten"])
    assert set(_lrc_inits(onnx.load(c16)).values()) == {TensorProto.FLOAT16}
    dense32, y32, y16 = (_logits(p) for p in (f32 / "model.onnx", c32, c16))
    # fp16 rounding (weights, activations, statistics) moves the result far less than the
    # compression itself does
    assert _rel(y32, y16) < 0.1 * _rel(dense32, y32) + 2e-2, (_rel(y32, y16), _rel(dense32, y32))
    # the weights halve (the file less: the converter adds Casts, the graph is a large part)
    assert 0.45 < _weight_bytes(c16) / _weight_bytes(c32) < 0.55


def _weight_bytes(path) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(path).graph.initializer)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_tiny_llama_fp16_eval_and_bench(llama16, tmp_path):
    f32, f16 = llama16
    r = lrc_cli("compress", f16, "--rank", "full", "--method", "svd", "-o", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    r = lrc_cli("eval", f32, f16, tmp_path / "full", "--max-tokens", "512", "--context", "64",
             "--save", tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    text = json.dumps(ev)
    assert "NaN" not in text and "Infinity" not in text
    # the fp16 dense model against the fp32 one, and rank full against the fp16 one:
    # both are fp16 rounding only (a random tiny model: perplexity ~ vocab size)
    results = ev["results"] if "results" in ev else ev
    kls = [float(v) for v in _find(results, "kl")]
    assert kls and all(-1e-6 < k < 1e-2 for k in kls), kls  # float32 sums: ~-1e-8 is zero
    ppl = [float(v) for v in _find(results, "perplexity")]
    assert ppl and max(ppl) < 1.01 * min(ppl), ppl
    r = lrc_cli("bench", f16, tmp_path / "full", "--runs", "3", "--seq", "16",
             "--save", tmp_path / "bench.json")
    assert r.returncode == 0, r.stderr
    b = json.loads((tmp_path / "bench.json").read_text())
    assert len(b["models"]) == 2 and b["runs"]
    assert all(run_["p50_ms"] > 0 for run_ in b["runs"])


def _find(obj, key):
    """Every value stored under ``key`` anywhere in a JSON-like object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, (int, float)):
                yield v
            else:
                yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)


@pytest.mark.parametrize("layout", (None, *LAYOUTS))
def test_bench_sees_fp16_weights(layout, tmp_path):
    """``lrc bench --baselines`` skips ORT's quantize_dynamic on fp16 weights (it writes a
    model ORT refuses to load) instead of failing the whole benchmark."""
    from lrc.measure.bench import _float16_weights

    m = matmul_chain() if layout is None else to_fp16(matmul_chain(), layout)
    onnx.save(m, tmp_path / "m.onnx")
    assert _float16_weights(tmp_path / "m.onnx") == (layout is not None)


def test_quantize_fp16_embedding_table_becomes_gbq_with_fp16_scales():
    from onnx import helper

    rng = np.random.default_rng(4)
    vocab, d, out = 16384, 64, 32  # vocab x d reaches lrc.graph.passes.quant.EMBED_MIN
    table = rng.standard_normal((vocab, d)).astype(np.float16)
    w = (rng.standard_normal((d, out)) / 8).astype(np.float16)
    g = helper.make_graph(
        [helper.make_node("Gather", ["model.embed_tokens.weight", "ids"], ["h"],
                          name="/model/embed_tokens/Gather"),
         helper.make_node("MatMul", ["h", "model.layers.0.mlp.up_proj.weight"], ["y"],
                          name="/model/layers.0/mlp/up_proj/MatMul")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", "s", out])],
        [onnx.numpy_helper.from_array(table, "model.embed_tokens.weight"),
         onnx.numpy_helper.from_array(w, "model.layers.0.mlp.up_proj.weight")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    ids = rng.integers(0, vocab, (2, 7))
    ref = run(m, {"ids": ids})[0]
    new, rep = lrc.compress(m, quantize="int4")
    p = to_proto(new)
    onnx.checker.check_model(p, full_check=True)
    gbq = [n for n in p.graph.node if n.op_type == "GatherBlockQuantized"]
    inits = {i.name: i for i in p.graph.initializer}
    assert len(gbq) == 1 and inits[gbq[0].input[2]].data_type == TensorProto.FLOAT16
    (emb,) = rep["quantize"]["embeddings"]
    assert emb["bytes_before"] == vocab * d * 2
    got = run(p, {"ids": ids})[0]
    assert got.dtype == np.float16 and _rel(ref, got) < 0.2


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_export_dtype_float16(tiny_llama, tmp_path):
    """``lrc export --dtype float16``: the folder's weights are float16, its inputs and outputs
    float32 (feeds and KV caches as for the float32 export), the logits close to float32's; it
    compresses data-aware with float16 factors."""
    _, f32 = tiny_llama
    hf = f32.parent / "hf"
    out = tmp_path / "e16"
    r = lrc_cli("export", hf, "-o", out, "--dtype", "float16", "--exporter", "optimum")
    assert r.returncode == 0, r.stderr
    assert "float16" in r.stdout
    # converted in the staged folder, before it appeared: recorded with the export
    assert "float16" in json.loads((out / "lrc.json").read_text())["export"]["converted"]
    m = onnx.load(out / "model.onnx")
    big = [t for t in m.graph.initializer if np.prod(t.dims) >= 256]
    assert big and {t.data_type for t in big} == {TensorProto.FLOAT16}
    assert {i.type.tensor_type.elem_type for i in m.graph.input
            if i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)} \
        <= {TensorProto.FLOAT}
    y32, y16 = _logits(f32 / "model.onnx"), _logits(out / "model.onnx")
    assert _rel(y32, y16) < 1e-2, _rel(y32, y16)
    r = lrc_cli("compress", out, "-o", tmp_path / "c16", "--ratio", "0.6", "--calib-tokens", "1024")
    assert r.returncode == 0, r.stderr
    assert set(_lrc_inits(onnx.load(tmp_path / "c16" / "model.onnx")).values()) == \
        {TensorProto.FLOAT16}
    assert one_line_error(lrc_cli("export", hf, "-o", tmp_path / "x", "--dtype", "int3"))
