"""Quantisation with a whitened low-rank correction of its error (lrc.quantmath,
lrc.graph.passes.quant, ``lrc compress --quantize``): each piece's defining property."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs import run, shared_input, tied_head
from lrc.factorize import whiten_factor
from lrc.errors import LrcError
from lrc.graph.passes.embedding import EmbeddingPass
from lrc.graph.passes.quant import QuantizePass, QuantSpec
from lrc.graph.passes.run import run_passes
from lrc.runtime.runtimes import target_forms
from lrc.quantmath import (correction_factors, dequantize, quantize_blockwise, quantize_columns,
                           whitened_error, whitened_norm2)

RNG = np.random.default_rng(0)


def _ort_blockwise(w, bits, bs):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    kb = -(-k // bs)
    packed = np.zeros((n, kb, bs * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, kb), np.uint8)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(
        packed, w, scales, zp, bs, n, k, True)
    return packed, scales


@pytest.mark.parametrize("bits,bs", [(4, 32), (4, 16), (8, 32)])
def test_blockwise_codes_are_onnxruntimes(bits, bs):
    """The codes and scales are those of ONNX Runtime's own quantiser (MlasQuantizeBlockwise),
    so lrc's 4-bit weights are ORT 4-bit's weights; dequantisation inverts the packing."""
    w = (RNG.standard_normal((128, 48)) * 0.05).astype(np.float32)
    packed, scales = _ort_blockwise(w, bits, bs)
    bq = quantize_blockwise(w, bits, bs)
    np.testing.assert_array_equal(bq.scales, scales)
    same = float(np.mean(bq.packed == packed))
    assert same > (0.9999 if bits == 8 else 1 - 1e-12), same  # 8-bit: rare ties round apart
    d = dequantize(bq)
    step = np.abs(np.repeat(bq.scales.T, bs, axis=0))  # [K, N] per-element step
    # round to nearest; the side opposite the block's extreme clips one code short of it
    assert np.all(np.abs(d - w) <= step + 1e-7)
    assert np.mean(np.abs(d - w) <= 0.5 * step + 1e-7) > 0.99


def test_correction_error_is_the_dropped_whitened_spectrum():
    """QERA's closed form: after a rank-r whitened correction the output error
    ‖X(E - AB)‖² equals the sum of the dropped σ² of SᵀE (G = XᵀX = SSᵀ); full rank restores
    W to float precision."""
    k, n, r = 64, 40, 8
    x = RNG.standard_normal((500, k)) * np.linspace(3, 0.1, k)
    g = x.T @ x
    w = RNG.standard_normal((k, n)).astype(np.float32)
    e = (w - dequantize(quantize_blockwise(w, 4, 16))).astype(np.float64)
    s = np.linalg.cholesky(g)
    sig = np.linalg.svd(s.T @ e, compute_uv=False)
    for shape_e in (e, e[:, :20], np.concatenate([e, e], axis=1)):  # tall, wide: both paths
        sg = np.linalg.svd(s.T @ shape_e, compute_uv=False)
        f = correction_factors(shape_e, g, r)
        left = whitened_norm2(shape_e - f.a.astype(np.float64) @ f.b, g)
        assert left == pytest.approx(float(np.sum(sg[r:] ** 2)), rel=1e-5)
        # the same factors as SVD-LLM's whitening applied to E
        h = whiten_factor(shape_e, g, r)
        np.testing.assert_allclose(f.a @ f.b, h.a @ h.b, atol=1e-5 * np.abs(h.a @ h.b).max())
    left = whitened_norm2(e - correction_factors(e, g, r).a.astype(np.float64)
                          @ correction_factors(e, g, r).b, g)
    assert left < 0.9 * whitened_norm2(e, g) and left == pytest.approx(np.sum(sig[r:] ** 2),
                                                                       rel=1e-5)
    full = correction_factors(e, g, min(k, n))
    w_hat = dequantize(quantize_blockwise(w, 4, 16)) + full.a @ full.b
    assert whitened_error(w, w_hat, g) < 1e-5


def _deq16(bq):
    """``dequantize(bq)`` with the scales as stored on disk by default: float16."""
    from dataclasses import replace

    return dequantize(replace(bq, scales=bq.scales.astype(np.float16).astype(np.float32)))


def _apply(model_proto, spec, corrector=None):
    m = ir.serde.deserialize_model(model_proto)
    p = QuantizePass(spec, corrector)
    run_passes([p, EmbeddingPass(spec, p.record)], m)
    return ir.serde.serialize_model(m), p.record


def _gram_corrector(g):
    """A corrector with one Gram matrix for every input (the pipeline's comes from
    calibration statistics)."""
    from types import SimpleNamespace

    from lrc import methods

    st = SimpleNamespace(xtx=g)
    return methods.make_corrector(["x2d", "z"], stats={"x2d": st, "z": st})[0]


@pytest.mark.parametrize("form", ["concat", "add"])
def test_int4_graph_matches_numpy_reference(form):
    """Q/K/V of one input share one correction A; ORT's MatMulNBits output equals
    X·(deq(W) + A·B) computed in numpy from the stored initializers, and the correction
    lowers the output error against the float model."""
    d = 32
    proto = shared_input(d=d, outs=(32, 16, 16))
    x = RNG.standard_normal((50, d)).astype(np.float32) * np.linspace(2, 0.2, d).astype(np.float32)
    z = RNG.standard_normal((50, d)).astype(np.float32)
    feeds = {"x2d": x, "z": z}
    ref = run(proto, feeds)
    plain, _ = _apply(proto, QuantSpec("int4", 16, 0, 0, embedding="float"))
    corr = _gram_corrector(x.T.astype(np.float64) @ x)
    q, rec = _apply(proto, QuantSpec("int4", 16, 0, 8, form, embedding="float"), corr)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 4
    assert ops.count("Concat") == (2 if form == "concat" else 0)  # one per input
    # the first three share one A product (joint correction of one input)
    assert {len(n.joint_with) for n in rec.nodes[:3]} == {2}
    got, base = run(q, feeds), run(plain, feeds)
    for i in range(3):
        e_q = np.linalg.norm(got[i] - ref[i])
        e_plain = np.linalg.norm(base[i] - ref[i])
        assert e_q < 0.8 * e_plain, (i, e_q, e_plain)
    # numpy reference from the stored tensors (accuracy_level 0: float compute)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    node = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    from lrc.quantmath import BlockQuant

    # the scales: float16 on disk, cast back to float32 in the graph (the default)
    casts = {n.output[0]: n.input[0] for n in q.graph.node if n.op_type == "Cast"}
    assert inits[casts[node.input[2]]].dtype == np.float16
    scales = inits[casts[node.input[2]]].astype(np.float32)
    bq = BlockQuant(inits[node.input[1]], scales.reshape(attrs["N"], -1),
                    attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"])
    w_eff = dequantize(bq)
    if form == "concat":
        a = next(inits[n.input[1]] for n in q.graph.node if n.op_type == "MatMul")
        want = np.concatenate([x, x @ a], axis=1) @ w_eff
    else:
        want = x @ w_eff + got[0] - x @ w_eff  # add form: checked against the float model above
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("embedding", ["int8", "int4"])
def test_float16_scales_on_disk_are_folded_back_by_onnxruntime(tmp_path, embedding):
    """A float32 model's block scales (MatMulNBits, GatherBlockQuantized: its own table, or the
    tied head's shared) are stored in float16 and cast back in the graph: ONNX Runtime folds
    the Cast when it loads the model (none left to run), the output is float32 scales' to
    float16's precision, the record counts the bytes on disk (the bytes a decoded token reads
    are float32's); scales=float32 writes them as ONNX Runtime's quantisers do."""
    import onnxruntime as ort

    import lrc

    src = tmp_path / "m.onnx"
    onnx.save(tied_head(vocab=4096, d=256), src)
    ids = np.array([[0, 7, 4095, 12]], np.int64)
    from lrc.graph.locate import bytes_read_per_token

    outs, stored, counted, read, n_scales = {}, {}, {}, {}, 0
    for sc in ("float16", "float32"):
        path = tmp_path / f"{sc}.onnx"
        _, rep = lrc.compress(src, out=path, quantize="int4", embedding=embedding, method="svd",
                              correct_rank="0", scales=sc)
        q = onnx.load(str(path))
        scales = [t for t in q.graph.initializer if "scales" in t.name]
        assert len(scales) == (2 if embedding == "int8" else 1)
        want = onnx.TensorProto.FLOAT16 if sc == "float16" else onnx.TensorProto.FLOAT
        assert {t.data_type for t in scales} == {want}
        if sc == "float32":
            n_scales = sum(int(np.prod(t.dims)) for t in scales)
        stored[sc] = sum(onnx.numpy_helper.to_array(t).nbytes for t in q.graph.initializer)
        tot = rep["quantize"]["totals"]
        counted[sc] = tot["weight_bytes_after"] + tot["embedding_bytes_after"]
        outs[sc] = run(q, {"ids": ids})[0]
        read[sc] = bytes_read_per_token(q)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{sc}-ort.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        assert "Cast" not in {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    assert stored["float32"] - stored["float16"] == 2 * n_scales
    assert counted["float32"] - counted["float16"] == 2 * n_scales
    assert read["float16"] == read["float32"]  # what the kernels read: float32 scales
    np.testing.assert_allclose(outs["float16"], outs["float32"], rtol=0, atol=2e-3 * np.abs(
        outs["float32"]).max())


def test_int8_dynamic_matches_numpy():
    """INT8: DynamicQuantizeMatMul with 7-bit per-column weights equals numpy's
    dynamic-quantised product (uint8 activations per tensor)."""
    proto = shared_input(d=16, outs=(16, 8, 8))
    x = RNG.standard_normal((20, 16)).astype(np.float32)
    feeds = {"x2d": x, "z": x}
    q, rec = _apply(proto, QuantSpec("int8", embedding="float"))
    assert [n.op_type for n in q.graph.node].count("DynamicQuantizeMatMul") == 4
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    wq, ws = quantize_columns(w, 63)
    assert np.abs(wq).max() <= 63
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    s = (hi - lo) / 255
    zp = np.clip(np.rint(-lo / s), 0, 255)
    xq = np.clip(np.rint(x / s) + zp, 0, 255)
    want = ((xq - zp) @ wq.astype(np.float64)) * s * ws
    np.testing.assert_allclose(run(q, feeds)[0], want, rtol=1e-4, atol=1e-4)


def test_embedding_table_becomes_gather_block_quantized():
    """A tied embedding: once the head is quantised the table is stored once, as int8 rows for
    GatherBlockQuantized; outputs equal numpy's dequantised lookup."""
    proto = tied_head(vocab=4096, d=256)
    ids = np.array([[0, 7, 4095]], np.int64)
    q, rec = _apply(proto, QuantSpec("int4", 32, 0, 0, embedding="int8"))
    ops = [n.op_type for n in q.graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert "embed.weight" not in {t.name for t in q.graph.initializer}
    assert rec.embeddings[0]["bytes_after"] < rec.embeddings[0]["bytes_before"] / 3
    e = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    table = _deq16(quantize_blockwise(e.T.copy(), 8, 32)).T
    head = _deq16(quantize_blockwise(e.T.copy(), 4, 32))
    np.testing.assert_allclose(run(q, {"ids": ids})[0], table[ids] @ head, rtol=1e-4,
                               atol=1e-4)


def test_factor_matmuls_are_quantised_not_corrected():
    """Low rank then --quantize: lrc's factor MatMuls become MatMulNBits too (never
    corrected: they are the low-rank part)."""
    import lrc

    proto = shared_input(d=32, outs=(32, 16, 16))
    m, rep = lrc.compress(proto, rank=4, quantize="int4", block_size=16, method="svd",
                          embedding="float")
    q = ir.serde.serialize_model(m)
    assert not [n for n in q.graph.node if n.op_type == "MatMul"]
    assert all(n["rank"] == 0 for n in rep["quantize"]["nodes"])
    assert len(rep["rewritten"]) == 4


@pytest.mark.parametrize("args,msg", [
    (["--quantize", "int3"], "--quantize must be one of"),
    (["--quantize", "int4", "--block-size", "24"], "--block-size must be a power of two"),
    (["--quantize", "int4", "--block-size", "8"], "--block-size must be a power of two"),
    (["--quantize", "int4", "--correct-rank", "-1"], "--correct-rank must be >= 0"),
    (["--correct-rank", "8"], "give --quantize too"),
    (["--quantize", "int4", "--correct-form", "fused"], "--correct-form must be"),
    (["--quantize", "int4", "--quantize-rest", "int8"], "drop --quantize-rest"),
    (["--quantize", "int4", "--correct-rank", "auto", "--correct-budget", "0"],
     "--correct-budget must be > 0"),
    (["--quantize", "int4", "--target-runtime", "tract"], "cannot be expressed for"),
    (["--quantize", "int8", "--target-runtime", "tvm"], "--target-runtime must be one of"),
    (["--rank", "4", "--quantize-rest", "int4", "--target-runtime", "any"], "not for"),
    # target-size with quantize: a budget below the smallest the model can be, before any work
    (["--quantize", "int4", "--target-size", "0.001"], "smallest this model can be"),
    (["--quantize", "int4", "--target-size", "1", "--correct-rank", "32"], "chooses the bits"),
    (["--quantize", "int4", "--block-size", "32,attn.o=48"], "power of two"),
    (["--quantize", "int4", "--scales", "bfloat16"], "float16"),
])
def test_cli_bad_quantize_options(tmp_path, args, msg):
    from test_cli import _one_line_error, lrc as cli

    src = tmp_path / "m.onnx"
    onnx.save(shared_input(d=32), src)
    out = tmp_path / "out.onnx"
    r = cli("compress", src, *args, "-o", out)
    line = _one_line_error(r, code=r.returncode or 1)
    assert r.returncode != 0 and msg in line, line
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1


def test_cli_quantize_writes_record(tmp_path):
    """``lrc compress --quantize int4 --correct-rank R --method svd``: the summary records per
    node the quantiser, rank and error; the output runs."""
    import json

    from test_cli import lrc as cli

    src = tmp_path / "m.onnx"
    onnx.save(shared_input(d=32, outs=(32, 16, 16)), src)
    out = tmp_path / "q.onnx"
    r = cli("compress", src, "--quantize", "int4", "--block-size", "16", "--correct-rank", "4",
            "--method", "svd", "-o", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "q.onnx.lrc.json").read_text())["quantize"]
    assert len(rec["nodes"]) == 4 and rec["nodes"][0]["rank"] == 4
    assert rec["spec"]["scheme"] == "int4" and rec["spec"]["block_size"] == 16
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    assert run(str(out), {"x2d": x, "z": x})[0].shape == (3, 32)



def test_per_node_overrides():
    """``--quantize int4,attn.o=int8-weight --correct-rank 4,attn.k=0``: the selector's nodes
    get their own scheme and rank; a different rank splits the joint group."""
    from lrc.config import parse_spec

    spec = parse_spec("int4,attn.o=int8-weight", "4,attn.k=0", block_size=16, accuracy_level=0,
                      embedding="float")
    assert spec.scheme == "int4" and spec.correct_rank == 4 and len(spec.overrides) == 2
    proto = shared_input(d=32, outs=(32, 16, 16))
    x = RNG.standard_normal((40, 32)).astype(np.float32)
    q, rec = _apply(proto, spec, _gram_corrector(x.T.astype(np.float64) @ x))
    by = {n.role: n for n in rec.nodes}
    assert by["attn.o"].bits == 8 and by["attn.o"].rank == 4
    assert by["attn.k"].rank == 0 and by["attn.q"].rank == 4
    assert by["attn.q"].joint_with == ["/model/layers.0/self_attn/v_proj/MatMul"]
    assert run(q, {"x2d": x, "z": x})[3].shape == (40, 32)


@pytest.mark.parametrize("q,r,msg", [
    ("int4,head=int5", "0", "must be one of"), ("int4", "8,head=x", "must be an integer"),
    ("int4", "8,bogus=4", "unknown role"), ("int4", "8,9", "one default value"),
])
def test_bad_overrides(q, r, msg):
    from lrc.errors import LrcError
    from lrc.config import parse_spec

    with pytest.raises(LrcError, match=msg):
        parse_spec(q, r)


def test_bytes_read_per_token_skips_gather_tables():
    """The decode bytes bound counts what a token reads: a quantised tied head shrinks it
    8x for 4-bit, the embedding table read by GatherBlockQuantized not at all."""
    from lrc.graph.locate import bytes_read_per_token

    proto = tied_head(vocab=4096, d=256)
    dense = bytes_read_per_token(proto)
    assert dense == 4096 * 256 * 4  # the Transpose reads the table (the head)
    q, _ = _apply(proto, QuantSpec("int4", 32, 0, 0, embedding="int8"))
    got = bytes_read_per_token(q)
    assert got == 4096 * 256 // 2 + 4096 * (256 // 32) * 4  # 4-bit codes + fp32 scales


def _llama_like(d=32, f=64, seed=7):
    """RMSNorm's Mul by γ feeding Q/K/gate/up (and a Shape), act(gate)*up feeding down."""
    from onnx import TensorProto, helper

    from graphs import _model, init, vin

    r = np.random.default_rng(seed)
    w = {n: (r.standard_normal(s) * 0.2).astype(np.float32) for n, s in (
        ("q_proj", (d, d)), ("k_proj", (d, d // 2)), ("gate_proj", (d, f)), ("up_proj", (d, f)),
        ("down_proj", (f, d)))}
    gamma = (1 + r.standard_normal(d) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Mul", ["xn", "gamma"], ["h"], name="/model/layers.0/norm/Mul"),
             helper.make_node("Shape", ["h"], ["hs"])]
    for n in ("q_proj", "k_proj", "gate_proj", "up_proj"):
        grp = "self_attn" if n[0] in "qk" else "mlp"
        nodes.append(helper.make_node("MatMul", ["h", n], [f"y_{n}"],
                                      name=f"/model/layers.0/{grp}/{n}/MatMul"))
    nodes += [helper.make_node("Sigmoid", ["y_gate_proj"], ["a"]),
              helper.make_node("Mul", ["a", "y_up_proj"], ["m"]),
              helper.make_node("MatMul", ["m", "down_proj"], ["y_down"],
                               name="/model/layers.0/mlp/down_proj/MatMul")]
    outs = [vin("y_q_proj", ["n", d]), vin("y_k_proj", ["n", d // 2]), vin("y_down", ["n", d]),
            vin("hs", [2], TensorProto.INT64)]
    return _model(nodes, [vin("xn", ["n", d])], outs,
                  [init("gamma", gamma)] + [init(k, v) for k, v in w.items()])


def test_smoothquant_folding_keeps_the_float_model():
    """SmoothPass divides the norm's γ (and up's columns) by s and multiplies the readers'
    rows by s: the float model computes the same outputs, no node is added, and the int8 model
    with smoothing is closer to the float one on activations with outlier channels."""
    from lrc.graph.passes.smooth import SmoothPass

    proto = _llama_like()
    x = RNG.standard_normal((64, 32)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel, as LLM norms produce
    ref = run(proto, {"xn": x})
    h = x * onnx.numpy_helper.to_array(proto.graph.initializer[0])
    acts = {"h": np.sqrt(np.mean(h ** 2, axis=0)),
            "m": np.ones(64)}
    m = ir.serde.deserialize_model(proto)
    sp = SmoothPass(acts, 0.5)
    run_passes([sp], m)
    smoothed = ir.serde.serialize_model(m)
    assert len(smoothed.graph.node) == len(proto.graph.node)
    assert {r["tensor"] for r in sp.record["smoothed"]} == {"h", "m"}
    for a, b in zip(run(smoothed, {"xn": x})[:3], ref[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    plain, _ = _apply(proto, QuantSpec("int8", embedding="float"))
    smooth_q, _ = _apply(smoothed, QuantSpec("int8", embedding="float"))
    e_plain = np.linalg.norm(run(plain, {"xn": x})[0] - ref[0])
    e_smooth = np.linalg.norm(run(smooth_q, {"xn": x})[0] - ref[0])
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)


def test_awq_scales_lower_the_codes_output_error_on_outlier_channels():
    """AWQ's search: with outlier input channels some α > 0 lowers tr(DᵀGD) of the 4-bit
    codes well below α = 0's; the returned error is never above α = 0's; with nothing to gain
    (equal channels) it may stay at α = 0, which means no scaling (s = 1)."""
    from lrc.quantmath import awq_scales

    w = (RNG.standard_normal((128, 96)) * 0.1).astype(np.float32)
    a = np.ones(128)
    a[[3, 40, 77]] = 30.0  # outlier channels, as LLM norms produce
    x = RNG.standard_normal((800, 128)) * a
    s, alpha, before, after = awq_scales(a, w, x.T @ x, 4, 32)
    assert alpha > 0 and after < 0.7 * before, (alpha, after / before)
    assert s[3] > s[0]  # the outliers' rows are scaled up
    flat = RNG.standard_normal((800, 128))
    s, alpha, before, after = awq_scales(np.ones(128), w, flat.T @ flat, 4, 32)
    assert after <= before and (alpha > 0 or np.all(s == 1))


def test_awq_folding_keeps_the_float_model_and_lowers_the_int4_error():
    """SmoothPass(alpha="auto"): the float model is unchanged, each smoothed tensor records its
    searched α, and the 4-bit model is closer to the float one than without the scaling."""
    from lrc.graph.passes.smooth import SmoothPass

    proto = _llama_like(d=64, f=128)
    x = RNG.standard_normal((256, 64)).astype(np.float32)
    x[:, [3, 17]] *= 40
    ref = run(proto, {"xn": x})
    h = x * onnx.numpy_helper.to_array(proto.graph.initializer[0])
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    w = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    mm = sig(h @ w["gate_proj"]) * (h @ w["up_proj"])
    grams = {"h": h.T.astype(np.float64) @ h, "m": mm.T.astype(np.float64) @ mm}
    acts = {"h": np.sqrt(np.mean(h ** 2, axis=0)), "m": np.sqrt(np.mean(mm ** 2, axis=0))}
    m = ir.serde.deserialize_model(proto)
    sp = SmoothPass(acts, "auto", grams=grams, bits=4, block_size=16)
    run_passes([sp], m)
    smoothed = ir.serde.serialize_model(m)
    done = {r["tensor"]: r for r in sp.record["smoothed"]}
    assert "h" in done and done["h"]["alpha"] > 0 and done["h"]["error_ratio"] < 1, sp.record
    for a, b in zip(run(smoothed, {"xn": x})[:3], ref[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    spec = QuantSpec("int4", 16, 0, 0, embedding="float")
    e_plain = np.linalg.norm(run(_apply(proto, spec)[0], {"xn": x})[0] - ref[0])
    e_awq = np.linalg.norm(run(_apply(smoothed, spec)[0], {"xn": x})[0] - ref[0])
    assert e_awq < 0.8 * e_plain, (e_awq, e_plain)


def test_smooth_auto_through_the_pipeline(tmp_path):
    """``lrc.compress(..., quantize="int4", smooth="auto")`` on calibration inputs with outlier
    channels: the report lists the searched α per smoothed input and the 4-bit model is closer
    to the float one than the same compression without it."""
    from lrc.pipeline import CompressConfig, compress_model

    proto = _llama_like(d=64, f=128)
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    (tmp_path / "in").mkdir()
    r = np.random.default_rng(5)
    for i in range(3):
        x = r.standard_normal((128, 64)).astype(np.float32)
        x[:, [3, 17]] *= 40
        np.savez(tmp_path / "in" / f"b{i}.npz", xn=x)
    x = r.standard_normal((64, 64)).astype(np.float32)
    x[:, [3, 17]] *= 40
    ref = run(proto, {"xn": x})[0]
    errs = {}
    for key, kw in (("rtn", {}), ("awq", {"smooth": "auto"}),
                    ("awq+gptq+r8", {"smooth": "auto", "base_quant": "gptq", "correct_rank": 8})):
        model, report = compress_model(str(src), CompressConfig.of(
            quantize="int4", block_size=16, calib_inputs=[tmp_path / "in"], **kw))
        out = ir.serde.serialize_model(model)
        errs[key] = np.linalg.norm(run(out, {"xn": x})[0] - ref)
        if kw:
            done = report["smooth"]["smoothed"]
            assert done and all(d["alpha"] > 0 for d in done), report["smooth"]
    assert errs["awq"] < 0.8 * errs["rtn"], errs
    assert errs["awq+gptq+r8"] < errs["awq"], errs  # GPTQ and the correction on the scaled Gram


def test_smoothing_folds_into_a_skip_norms_gamma_only():
    """ORT's SkipSimplifiedLayerNormalization (the builder's graphs): the scales fold into
    its gamma (input 2), not into its pre-norm bias (input 3) or the skip; the residual sum
    it also outputs is untouched and the float model is unchanged."""
    from onnx import helper

    from graphs import _model, init, vin
    from lrc.graph.passes.smooth import SmoothPass

    d = 32
    r = np.random.default_rng(3)
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma", "bias"],
                              ["h", "", "", "sum"], domain="com.microsoft", epsilon=1e-6,
                              name="/model/layers.0/input_layernorm/SkipLayerNorm"),
             helper.make_node("MatMul", ["h", "q"], ["y"],
                              name="/model/layers.0/self_attn/q_proj/MatMul")]
    proto = _model(nodes, [vin("x", ["n", d]), vin("skip", ["n", d])],
                   [vin("y", ["n", d]), vin("sum", ["n", d])],
                   [init("gamma", (1 + r.standard_normal(d) * 0.3).astype(np.float32)),
                    init("bias", (r.standard_normal(d) * 0.1).astype(np.float32)),
                    init("q", (r.standard_normal((d, d)) * 0.2).astype(np.float32))])
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    feeds = {"x": r.standard_normal((8, d)).astype(np.float32),
             "skip": r.standard_normal((8, d)).astype(np.float32)}
    ref = run(proto, feeds)
    acts = {"h": np.linspace(0.1, 5, d)}
    m = ir.serde.deserialize_model(proto)
    sp = SmoothPass(acts, 0.5)
    run_passes([sp], m)
    out = ir.serde.serialize_model(m)
    assert [r["tensor"] for r in sp.record["smoothed"]] == ["h"], sp.record
    after = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    before = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(after["bias"], before["bias"])
    assert not np.allclose(after["gamma"], before["gamma"])
    for a, b in zip(run(out, feeds), ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_ranks_spend_the_budget_where_the_error_is():
    """``--correct-rank auto``: whole blocks go where the whitened error spectrum gains most
    per byte, within the budget (default: a uniform rank 32's bytes); a projection with far
    more error gets more rank, and the total error falls at least as far as uniform's."""
    from lrc.config import parse_spec

    proto = shared_input(d=64, outs=(64, 32, 32))
    # the o_proj's weight gets much larger error: scale it up, its input an outlier mix
    x = RNG.standard_normal((400, 64)).astype(np.float32) * np.linspace(4, 0.1, 64).astype(np.float32)
    corr = _gram_corrector(x.T.astype(np.float64) @ x)
    uni, rec_u = _apply(proto, parse_spec("int4", "16", block_size=16, accuracy_level=0,
                                          embedding="float"), corr)
    base = sum(n.weight_bytes_after for n in _apply(proto, parse_spec(
        "int4", "0", block_size=16, accuracy_level=0, embedding="float"))[1].nodes)
    budget = sum(n.weight_bytes_after for n in rec_u.nodes) - base  # uniform rank 16's bytes
    auto, rec_a = _apply(proto, parse_spec("int4", "auto", block_size=16, accuracy_level=0,
                                           embedding="float", budget_mb=budget / 1e6), corr)
    assert any("correct_rank=auto" in n for n in rec_a.notes)
    ranks = {n.role: n.rank for n in rec_a.nodes}
    assert all(r % 16 == 0 for r in ranks.values()) and max(ranks.values()) > 0
    assert sum(n.weight_bytes_after for n in rec_a.nodes) - base <= budget + 1
    err = {k: sum(n.werr_after ** 2 for n in r.nodes) for k, r in (("u", rec_u), ("a", rec_a))}
    assert err["a"] <= err["u"] * 1.02, err
    with pytest.raises(LrcError, match="goes with correct_rank=auto"):
        parse_spec("int4", "16", budget_mb=1.0)


# ------------------------------------------------------------------ sequential correction


def _sequential(proto, spec, batches):
    """``(quantised proto, pass)`` with the sequential correction on feeds ``batches``."""
    from lrc import methods
    from lrc.calibration.sequential import sequential_quant

    m = ir.serde.deserialize_model(proto)
    grams: dict = {}
    qp = QuantizePass(spec, methods.make_corrector([], stats=grams)[0], weights={})
    st = sequential_quant(m, qp, grams, batches)
    assert st.stages > 1 and grams and qp.weights
    run_passes([qp], m)
    return ir.serde.serialize_model(m), qp


def _one_shot(proto, spec, batches, tmp_path):
    """The plain whitened correction, Grams from the original model's inputs."""
    from lrc import methods
    from lrc.calibration.stats import collect_stats
    from lrc.graph.passes.quant import quant_targets

    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    m = ir.serde.deserialize_model(proto)
    names = sorted({t.node.inputs[0].name for t in quant_targets(m)[0]})
    corr = methods.make_corrector(names, stats=collect_stats(path, names, batches))[0]
    return _apply(proto, spec, corr)[0]


def test_sequential_full_rank_reproduces_the_model():
    """Full-rank correction (add form: float factors) restores each target exactly, so the
    quantised model's inputs equal the original's and every fitted target is W itself: the
    whole model comes back to float precision — the stages, the targets and the pass agree."""
    from test_update import calib_batches, rel_err, residual_mlp
    from test_update import run as run_y

    proto = residual_mlp(d=32, hidden=64, gate=True)
    batches = calib_batches(n=3, d=32)
    q, qp = _sequential(proto, QuantSpec("int4", 16, accuracy_level=0, correct_rank=64,
                                            correct_form="add"),
                        batches)
    assert rel_err(run_y(q, batches), run_y(proto, batches)) < 1e-4
    assert all(n.rank in (32, 64) for n in qp.record.nodes)  # rank capped at min(K, N)


def test_sequential_beats_one_shot_correction(tmp_path):
    """At a low rank the stage-by-stage correction (targets fitted to what the quantised model
    feeds them, residual stream made up by down_proj) leaves the network's output closer to
    the original's than the one-shot whitened correction, on held-out inputs too (float
    compute and float factors: what the stages simulate is what the graph computes; on
    SmolLM2 with the concat form and int8 activations it measured KL 0.093 vs 0.104)."""
    from test_update import calib_batches, rel_err, residual_mlp
    from test_update import run as run_y

    proto = residual_mlp(blocks=4, d=32, hidden=64, gate=True)
    batches, held = calib_batches(n=6, d=32), calib_batches(n=3, d=32, seed=7)
    spec = QuantSpec("int4", 16, accuracy_level=0, correct_rank=4, correct_form="add")
    seq, qp = _sequential(proto, spec, batches)
    one = _one_shot(proto, spec, batches, tmp_path)
    assert {n.form for n in qp.record.nodes} == {"add"} and not qp.solved  # all written
    for feeds in (batches, held):
        ref = run_y(proto, feeds)
        e_seq, e_one = rel_err(run_y(seq, feeds), ref), rel_err(run_y(one, feeds), ref)
        assert e_seq < 0.9 * e_one, (e_seq, e_one)


# ------------------------------------------------------------------ --target-runtime forms


def _on(runtime, proto, feeds, tmp_path):
    """Outputs of ``proto`` on ``runtime`` (lrc.runtime.runtimes), in graph-output order."""
    from lrc.runtime.runtimes import load

    p = tmp_path / f"{runtime}.onnx"
    onnx.save(proto, p)
    return load(p, runtime).run(feeds)


def test_openvino_target_is_standard_block_dequantize(tmp_path):
    """``--target-runtime openvino``: int4 with the concat correction becomes MatMul on a
    block-wise DequantizeLinear of int4 codes (opset 21, no com.microsoft op) holding exactly
    the numbers of ORT's MatMulNBits form: OpenVINO's outputs equal that form's float compute
    (ORT itself fuses the pattern back into MatMulNBits with int8 activations: close)."""
    proto = shared_input(d=32, outs=(32, 16, 16))
    x = RNG.standard_normal((50, 32)).astype(np.float32) * np.linspace(2, 0.2, 32).astype(np.float32)
    feeds = {"x2d": x, "z": RNG.standard_normal((50, 32)).astype(np.float32)}
    corr = _gram_corrector(x.T.astype(np.float64) @ x)
    ort_q, _ = _apply(proto, QuantSpec("int4", 16, 0, 16, embedding="float", scales="float32"),
                      corr)
    std, rec = _apply(proto, QuantSpec("int4", 16, 0, 16, embedding="float", target="openvino", forms=target_forms("openvino")),
                      corr)
    ops = [n.op_type for n in std.graph.node]
    assert ops.count("DequantizeLinear") == 4 and "MatMulNBits" not in ops
    assert {o.domain for o in std.opset_import} == {""} and std.opset_import[0].version == 21
    assert {n.form for n in rec.nodes} == {"concat"}
    onnx.checker.check_model(std, full_check=True)
    want = run(ort_q, feeds)
    for g, w in zip(_on("openvino", std, feeds, tmp_path), want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    for g, w in zip(run(std, feeds), want):
        assert np.linalg.norm(g - w) < 0.02 * np.linalg.norm(w)


def test_tract_target_is_per_column_int8(tmp_path):
    """``--target-runtime tract``: int8-weight is MatMul on a per-column DequantizeLinear
    (opset 13), int8 is DynamicQuantizeLinear + MatMulInteger, the embedding a per-row
    DequantizeLinear before the Gather; tract runs them as ORT does; int4 is refused."""
    proto = tied_head(vocab=4096, d=256)
    ids = np.array([[0, 7, 4095]], np.int64)
    e = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    q8, s8 = quantize_columns(e.T, 127)  # the table's rows = the head's columns: one code set
    deq = q8.astype(np.float32) * s8
    for scheme, op in (("int8-weight", "DequantizeLinear"), ("int8", "MatMulInteger")):
        q, rec = _apply(proto, QuantSpec(scheme, target="tract", forms=target_forms("tract")))
        ops = [n.op_type for n in q.graph.node]
        assert op in ops and "Gather" in ops and not any(
            o.domain == "com.microsoft" for o in q.opset_import), ops
        assert rec.embeddings and rec.embeddings[0]["bytes_after"] < \
            rec.embeddings[0]["bytes_before"] / 3
        got = _on("tract", q, {"ids": ids}, tmp_path)[0]
        if scheme == "int8-weight":  # float compute on the stored codes
            np.testing.assert_allclose(got, deq.T[ids] @ deq, rtol=1e-4, atol=1e-3)
        else:  # integer GEMM on dynamically quantised activations: ORT's result
            np.testing.assert_allclose(got, run(q, {"ids": ids})[0], rtol=1e-4, atol=1e-3)
        ref = e[ids] @ e.T
        assert np.linalg.norm(got - ref) < 0.05 * np.linalg.norm(ref)
    with pytest.raises(LrcError, match="tract.*4-bit"):
        QuantSpec("int4", target="tract", forms=target_forms("tract"))
    with pytest.raises(LrcError, match="per-row DequantizeLinear.*use int8 or float"):
        QuantSpec("int8", embedding="int4", target="any", forms=target_forms("any"))


def test_a_base_quantiser_is_one_registry_entry(monkeypatch):
    """A data-aware base quantiser registered in lrc.quantmath.BASE_QUANTIZERS chooses the codes
    the correction corrects, given the Gram of each group's input; RTN (the default) is
    ONNX Runtime's own codes."""
    from lrc.quantmath import BASE_QUANTIZERS, BaseQuantizer, quantize_blockwise

    seen = []

    def halved(w, bits, block_size, gram):  # a toy: RTN of the weight, recording the Gram
        seen.append(None if gram is None else gram.shape)
        return quantize_blockwise(w, bits, block_size)

    monkeypatch.setitem(BASE_QUANTIZERS, "toy", BaseQuantizer("toy", "a test", halved, True))
    proto = shared_input(d=64, outs=(64, 32, 32))
    x = RNG.standard_normal((200, 64)).astype(np.float32)
    corr = _gram_corrector(x.T.astype(np.float64) @ x)
    rtn, rec_r = _apply(proto, QuantSpec("int4", 16, 0, 8, embedding="float"), corr)
    toy, rec_t = _apply(proto, QuantSpec("int4", 16, 0, 8, embedding="float", base="toy"), corr)
    assert seen and all(s == (64, 64) for s in seen)
    assert [n.werr_after for n in rec_t.nodes] == [n.werr_after for n in rec_r.nodes]
    with pytest.raises(LrcError, match="needs calibration statistics"):
        _apply(proto, QuantSpec("int4", 16, 0, 0, embedding="float", base="toy"))
    with pytest.raises(LrcError, match="base_quant must be one of"):
        QuantSpec("int4", base="nope")


def test_builder_tied_layout_embedding_and_checks(tmp_path):
    """ONNX Runtime GenAI's model builder ties embedding and head through Transpose of the
    head's weight, and uses ONNX Runtime's own SimplifiedLayerNormalization in the ONNX domain:
    lrc quantises the head, then the embedding from the transposed table (the float weight is
    gone), and checks the output with the onnx checker for everything but that op, which the
    ONNX Runtime load checks."""
    from graphs import builder_tied

    import lrc

    src = tmp_path / "m.onnx"
    onnx.save(builder_tied(), src)
    with pytest.raises(Exception, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(str(src), full_check=True)
    out = tmp_path / "q.onnx"
    path, rep = lrc.compress(src, out=out, quantize="int4", method="svd", embedding="int4")
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    assert "GatherBlockQuantized" in ops and "Transpose" not in ops
    assert "lm_head.MatMul.weight" not in {t.name for t in q.graph.initializer}
    assert rep["quantize"]["embeddings"][0]["shape"] == [32768, 32]  # the table, not the weight
    assert "SimplifiedLayerNormalization" in rep["checks"]["runtime_ops"]
    ids = np.array([[3, 500, 32767]], np.int64)
    want = run(builder_tied(), {"input_ids": ids})[0]
    got = run(q, {"input_ids": ids})[0]
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.98  # 4-bit everywhere, close


def test_output_held_to_the_check_its_input_passes(tmp_path):
    """A graph that fails strict shape inference on its own (the model builder's declares a
    Constant's shape wrongly) is checked without it — decided before the work, said in the
    report — instead of failing after the work for what lrc did not do."""
    from graphs import builder_tied

    import lrc

    m = builder_tied()
    # a Constant of shape [1] declared of rank 0, as the builder writes its constants
    m.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["one"], value=onnx.helper.
                                                 make_tensor("v", onnx.TensorProto.FLOAT, [1],
                                                             [1.0])))
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("one", onnx.TensorProto.FLOAT,
                                                                 []))
    head = next(n for n in m.graph.node if n.name == "/lm_head/MatMul")
    head.input[0] = "h1"
    m.graph.node.insert(len(m.graph.node) - 1, onnx.helper.make_node("Mul", ["h", "one"], ["h1"]))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    _, rep = lrc.compress(src, out=tmp_path / "q.onnx", quantize="int4", method="svd")
    assert rep["checks"]["checker"] == "ok" and rep["checks"]["shape_inference"] == "skipped"
    assert rep["checks"]["checker_level"].startswith("checker: the input itself fails")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_correction_factor_a(bits):
    """The concat form's A stored in block codes (a MatMulNBits of X·A), B refitted to the
    quantised A: the correction keeps most of its gain, in far fewer bytes of A."""
    proto = shared_input(d=64, outs=(64, 32, 32))
    x = RNG.standard_normal((400, 64)).astype(np.float32) * np.linspace(3, 0.2, 64).astype(np.float32)
    corr = _gram_corrector(x.T.astype(np.float64) @ x)
    flt, rec_f = _apply(proto, QuantSpec("int4", 16, 0, 16, embedding="float"), corr)
    q, rec_q = _apply(proto, QuantSpec("int4", 16, 0, 16, embedding="float", correct_a_bits=bits),
                      corr)
    ops = [n.op_type for n in q.graph.node]
    corrected_inputs = 2  # Q/K/V's shared input, and z
    assert ops.count("MatMulNBits") == len(rec_q.nodes) + corrected_inputs  # X·A is one too
    assert "MatMul" not in ops
    err = lambda rec: np.sqrt(np.mean([n.werr_after ** 2 for n in rec.nodes]))  # noqa: E731
    before = np.sqrt(np.mean([n.werr_before ** 2 for n in rec_q.nodes]))
    assert err(rec_q) < before * 0.8 and err(rec_q) < err(rec_f) * (1.3 if bits == 4 else 1.05)
    size = lambda rec: sum(n.weight_bytes_after for n in rec.nodes)  # noqa: E731
    assert size(rec_q) < size(rec_f)
    feeds = {"x2d": x[:8], "z": x[8:16]}
    want = run(proto, feeds)
    got = run(q, feeds)
    for a, b in zip(want, got):  # what the record says is what the graph computes
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.2


@pytest.mark.parametrize("layout,rank,form", [("builder", 0, "concat"), ("builder", 16, "concat"),
                                              ("optimum", 16, "concat"), ("builder", 16, "add")])
def test_int4_embedding_shares_the_tied_heads_codes(tmp_path, layout, rank, form):
    """With the embedding in the head's bits, the table is the tied head's own MatMulNBits
    codes (the first K/block blocks of each row, a concat correction's after them): no second
    copy on disk, the lookup of the table's own RTN codes."""
    from graphs import builder_tied

    import lrc
    from lrc.graph.expose import expose
    from lrc.quantmath import dequantize, quantize_blockwise

    m = builder_tied() if layout == "builder" else tied_head(vocab=32768, d=32)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    _, rep = lrc.compress(src, out=tmp_path / "q.onnx", embedding="int4", quantize="int4",
                          method="svd", block_size=16, correct_rank=str(rank), correct_form=form)
    emb = rep["quantize"]["embeddings"][0]
    assert emb["bytes_after"] == 0 and emb["shared_with"].startswith("/lm_head/MatMul")
    q = onnx.load(str(tmp_path / "q.onnx"))
    names = {t.name for t in q.graph.initializer}
    assert not any("gbq" in n for n in names)  # no table of its own
    table = (onnx.numpy_helper.to_array(next(t for t in m.graph.initializer
                                             if "weight" in t.name and t.dims[0] in (32, 32768))))
    rows = table.T if layout == "builder" else table  # [V, d]
    ids = np.array([[3, 500, 32767, 7]], np.int64)
    want = _deq16(quantize_blockwise(np.ascontiguousarray(rows[ids[0]].T), 4, 16)).T
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    fetch = expose(q, [gbq.output[0]], prune=True)
    got = run(q, {"input_ids" if layout == "builder" else "ids": ids})
    got = got[[o.name for o in q.graph.output].index(fetch[0])]
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)


def test_an_already_quantised_model_is_refused_before_any_work(tmp_path):
    """ONNX Runtime GenAI's int4 build (every MatMul a MatMulNBits) given to quantize: one line
    naming what to give instead, before calibration."""
    from graphs import builder_tied

    import lrc

    src = tmp_path / "m.onnx"
    onnx.save(builder_tied(), src)
    lrc.compress(src, out=tmp_path / "q.onnx", quantize="int4", method="svd", embedding="int4")
    with pytest.raises(LrcError, match=r"quantised already \(GatherBlockQuantized x1, "
                                       r"MatMulNBits x3\): no float weights"):
        lrc.compress(tmp_path / "q.onnx", quantize="int4", correct_rank="32")


def test_attribute_tensors_in_external_data_are_carried(tmp_path):
    """A Constant whose value lives in the input's external data (a 0.5B export's did) is
    written into the output, which the checker and ONNX Runtime then read."""
    import lrc
    from lrc.graph.model import structural_check

    m = onnx.load_model_from_string(shared_input(d=32, outs=(32, 16, 16)).SerializeToString())
    big = onnx.helper.make_tensor("big", onnx.TensorProto.FLOAT, [32, 32],
                                  RNG.standard_normal(32 * 32).astype(np.float32).tobytes(),
                                  raw=True)
    m.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["c"], value=big))
    first = next(n for n in m.graph.node if n.op_type in ("MatMul", "Gemm"))
    m.graph.node.insert(1, onnx.helper.make_node("Add", [first.input[0], "c"], ["xc"]))
    first.input[0] = "xc"
    d = tmp_path / "in"
    d.mkdir()
    onnx.save_model(m, str(d / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=0, convert_attribute=True)
    src = onnx.load(str(d / "model.onnx"), load_external_data=False)
    const = next(n for n in src.graph.node if n.op_type == "Constant")
    assert const.attribute[0].t.data_location == onnx.TensorProto.EXTERNAL
    for name, kw in (("single.onnx", {}), ("ext.onnx", {"external_data": True})):
        out = tmp_path / name
        lrc.compress(d / "model.onnx", out=out, rank=8, method="svd", **kw)
        structural_check(out)
        q = onnx.load(str(out), load_external_data=False)
        c = next(n for n in q.graph.node if n.op_type == "Constant")
        assert c.attribute[0].t.data_location != onnx.TensorProto.EXTERNAL


def _correlated(k=128, n=96, t=2048, seed=3):
    """A weight and inputs whose channels are correlated and unequal (a dead one included)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * (rng.random(k) ** 3)[None, :]
    x = rng.standard_normal((t, k)) @ mix + 0.1 * rng.standard_normal((t, k))
    x[:, 7] = 0
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return w, x, x.T @ x


@pytest.mark.parametrize("bits,bs", [(4, 32), (4, 64), (8, 32)])
def test_data_aware_base_quantisers_lower_the_output_error(bits, bs):
    """search (each block's scale chosen against the input-weighted error) and gptq
    (error-feedback rounding with the Gram) give codes ``dequantize`` reads, with less output
    error ``‖X·(W - Ŵ)‖`` than round to nearest; gptq less than search."""
    from lrc.quantmath import BASE_QUANTIZERS

    w, x, g = _correlated()
    err = {name: np.linalg.norm(x @ (w - dequantize(b.quantize(w, bits, bs, g))))
           for name, b in BASE_QUANTIZERS.items()}
    assert err["gptq"] < err["search"] < err["rtn"]
    assert err["gptq-rtn"] < err["rtn"]
    # the searched scales include ONNX Runtime's: its input-weighted error is never worse
    d = np.diag(g)
    wd = {name: float((d[:, None] * (w - dequantize(BASE_QUANTIZERS[name].quantize(
        w, bits, bs, g))) ** 2).sum()) for name in ("rtn", "search")}
    assert wd["search"] <= wd["rtn"]


def test_gptq_with_uncorrelated_equal_inputs_is_round_to_nearest():
    """With ``XᵀX = I`` no row's error can be pushed anywhere useful: GPTQ with ONNX Runtime's
    scales gives exactly ONNX Runtime's codes, in the same layout (a head-wide matrix too)."""
    from lrc.quantmath import BASE_QUANTIZERS, COLUMNS

    w = RNG.standard_normal((96, COLUMNS + 40)).astype(np.float32)
    a = quantize_blockwise(w, 4, 32)
    b = BASE_QUANTIZERS["gptq-rtn"].quantize(w, 4, 32, np.eye(96))
    assert np.array_equal(a.packed, b.packed) and np.array_equal(a.scales, b.scales)
    packed, scales = _ort_blockwise(np.ascontiguousarray(w[:, :64]), 4, 32)
    assert np.array_equal(b.packed[:64], packed)


@pytest.mark.parametrize("scipy", [True, False])
def test_gptq_inverse_cholesky_factor(monkeypatch, scipy):
    """GPTQ's ``U``: upper triangular with ``UᵀU = (G + λI)⁻¹`` (λ a tenth of the mean
    diagonal), a dead input (zero diagonal) given 1 first, with or without scipy."""
    import sys

    from lrc.quantmath import GPTQ_DAMP, _inverse_cholesky

    if not scipy:
        monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    x = RNG.standard_normal((200, 48)) * RNG.uniform(0.2, 3, 48)
    g = x.T @ x
    g[5, :] = g[:, 5] = 0.0
    u, dead = _inverse_cholesky(g)
    assert list(np.flatnonzero(dead)) == [5]
    h = g.copy()
    h[5, 5] = 1.0
    h += GPTQ_DAMP * np.mean(np.diag(h)) * np.eye(48)
    assert np.allclose(u, np.triu(u)) and np.all(np.diag(u) > 0)
    assert np.allclose(u.T @ u, np.linalg.inv(h), rtol=1e-8, atol=1e-12)


def test_base_quant_option_through_the_pass_and_the_api():
    """``base_quant='gptq'`` on a calibrated compression: the correction corrects GPTQ's codes
    and the whitened error left is below RTN's with the same rank."""
    g = _correlated(k=64, n=64)[2]
    proto = shared_input(d=64, outs=(64, 32, 32))
    corr = _gram_corrector(g)
    _, rec_r = _apply(proto, QuantSpec("int4", 16, 0, 8, embedding="float"), corr)
    _, rec_g = _apply(proto, QuantSpec("int4", 16, 0, 8, embedding="float", base="gptq"), corr)
    assert sum(n.werr_after for n in rec_g.nodes) < sum(n.werr_after for n in rec_r.nodes)


def test_a_tied_head_shared_with_the_embedding_keeps_rtn_codes(tmp_path):
    """With a data-aware base quantiser and an int4 embedding that shares the tied head's codes,
    the head keeps round-to-nearest codes (the table reads them row by row), said in a note
    written for people (no option marks)."""
    proto = tied_head()
    g = np.eye(16) * 2.0
    spec = QuantSpec("int4", 16, 0, 0, embedding="int4", base="search")
    from types import SimpleNamespace

    from lrc import methods

    corr = methods.make_corrector(["h"], stats={"h": SimpleNamespace(xtx=g)})[0]
    _, rec = _apply(proto, spec, corr)
    notes = [n for n in rec.notes if "round-to-nearest" in n]
    assert len(notes) == 1 and "\x1f" not in notes[0] and "search" in notes[0]


# ------------------------------------------------------------------ target-size allocation


def test_allocator_spends_bytes_where_measured_loss_falls_most():
    """lrc.allocate: every group starts at its cheapest choice; upgrades go where a byte
    removes most sensitivity x error; the budget holds; dominated choices are never taken."""
    from lrc.allocate import Choice, allocate

    def menu(scale):
        return [Choice(4, 128, 0, 100, 1.0 * scale), Choice(4, 32, 0, 120, 0.6 * scale),
                Choice(4, 32, 32, 140, 0.2 * scale), Choice(8, 32, 0, 220, 0.25 * scale)]

    menus = [menu(1), menu(1)]
    lo = allocate(menus, [1.0, 10.0], 200)
    assert lo.picks == [0, 0] and lo.nbytes == 200 == lo.min_bytes
    mid = allocate(menus, [1.0, 10.0], 240)  # 40 bytes: both go to the sensitive group
    assert mid.picks == [0, 2] and mid.nbytes == 240
    big = allocate(menus, [1.0, 10.0], 10_000)
    assert big.picks == [2, 2]  # int8 (dearer, worse than rank 32) never taken
    assert big.loss < mid.loss < lo.loss
    tight = allocate(menus, [1.0, 10.0], 150)
    assert tight.min_bytes > 150  # the caller refuses such a budget


def test_allocator_holds_a_time_budget_by_pricing_seconds():
    """lrc.allocate with seconds_budget: a correction's fixed time counts; the choices fit both
    budgets, the cheapest way by loss; the time only binds when it must; an unreachable time
    budget gives the fastest allocation, said."""
    from lrc.allocate import Choice, allocate

    def menu(scale):  # rank 32 is the best per byte but costs 3 units of time; int8 costs 2
        return [Choice(4, 32, 0, 120, 0.6 * scale, 10.0), Choice(4, 32, 32, 140, 0.2 * scale, 13.0),
                Choice(8, 32, 0, 220, 0.25 * scale, 12.0)]

    menus = [menu(1), menu(1), menu(1)]
    sens = [1.0, 5.0, 10.0]
    free = allocate(menus, sens, 10_000)
    assert free.picks == [1, 1, 1] and free.seconds == 39.0 and free.lam == 0
    assert allocate(menus, sens, 10_000, 39.0).picks == [1, 1, 1]  # not binding: the same
    two = allocate(menus, sens, 10_000, 36.0)  # room for two corrections: the sensitive ones
    assert two.picks == [0, 1, 1] and two.seconds <= 36.0 and two.lam > 0 and two.seconds_met
    one = allocate(menus, sens, 10_000, 33.0)
    assert one.picks == [0, 0, 1] and one.loss > two.loss > free.loss
    none = allocate(menus, sens, 10_000, 25.0)  # below every group's fastest choice
    assert not none.seconds_met and none.seconds == 30.0
    both = allocate(menus, sens, 400, 36.0)  # the byte budget still holds
    assert both.nbytes <= 400 and both.seconds <= 36.0


def test_allocator_holds_decode_and_prefill_budgets_together():
    """lrc.allocate with a prefill budget beside the decode one: each is priced (``lam``,
    ``mu``); a choice slow only at prefill (a correction) and one slow only at decode (8 bits
    here) are each given up where the loss they remove is least; both budgets hold."""
    from lrc.allocate import Choice, allocate

    def menu(scale):  # rank 32: 1 unit of decode, 3 of prefill; int8: 3 of decode, 1 of prefill
        return [Choice(4, 32, 0, 120, 0.6 * scale, 10.0, 10.0),
                Choice(4, 32, 32, 140, 0.2 * scale, 11.0, 13.0),
                Choice(8, 32, 0, 150, 0.3 * scale, 13.0, 11.0)]

    menus = [menu(1), menu(1), menu(1)]
    sens = [1.0, 5.0, 10.0]
    free = allocate(menus, sens, 10_000)
    assert free.picks == [1, 1, 1] and free.prefill == 39.0
    pre = allocate(menus, sens, 10_000, prefill_budget=35.0)  # two corrections -> int8
    assert pre.prefill <= 35.0 and pre.mu > 0 and pre.lam == 0 and pre.prefill_met
    assert pre.picks == [2, 2, 1] and pre.loss > free.loss  # the least sensitive two
    both = allocate(menus, sens, 10_000, 33.0, 35.0)  # int8 is slow to decode: plain codes
    assert both.picks == [0, 0, 1] and both.seconds_met and both.prefill_met
    assert both.loss > pre.loss
    # a point that both budgets rule out: the fastest found, said
    never = allocate(menus, sens, 10_000, 29.0, 29.0)
    assert not never.seconds_met and not never.prefill_met


def _probe_weighting(weights, w0):
    """A stand-in for the ORT probe: KL = weight x squared change of each replaced weight."""
    def make():
        def probe(values):
            return sum(weights.get(k, 1.0) * float(np.sum((v - w0[k]) ** 2))
                       for k, v in values.items())
        return probe
    return make


def _sized_case():
    """A Q/K/V-like group and an o projection, inputs with a decaying scale: the model, its
    weights, the calibration inputs and their Gram corrector."""
    proto = shared_input(d=128, outs=(128, 64, 64))
    w0 = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    x = RNG.standard_normal((600, 128)).astype(np.float32) * np.linspace(3, 0.2, 128).astype(
        np.float32)
    return proto, w0, x, _gram_corrector(x.T.astype(np.float64) @ x)


def _initializer_bytes(proto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


def test_target_size_allocates_bits_blocks_and_ranks_by_measured_sensitivity():
    """QuantizePass with target_mb: the written initializers fit the budget; the group the probe
    finds most sensitive gets the richest choice; the record lists every group's choice."""
    proto, w0, x, corr = _sized_case()
    total = _initializer_bytes
    # (float32 scales, as ONNX Runtime's quantisers write them: the budget below is theirs)
    small = total(_apply(proto, QuantSpec("int4", 128, 0, 0, embedding="float",
                                          scales="float32"))[0])
    budget = small + 14_000  # ~2 KB of it the graph's own bytes (names, nodes)
    got = {}
    for hot in ("o_proj", "q_proj"):
        spec = QuantSpec("int4", 32, 0, 32, embedding="float", target_mb=budget / 1e6,
                         scales="float32")
        m = ir.serde.deserialize_model(proto)
        p = QuantizePass(spec, corr, probe=_probe_weighting(
            {f"model.layers.0.self_attn.{hot}.weight": 1e4}, w0))
        run_passes([p], m)
        out = ir.serde.serialize_model(m)
        assert small < total(out) <= budget
        assert any("target_size=" in n for n in p.record.notes)
        got[hot] = {"o_proj" if "o_proj" in a["members"][0] else "q_proj": a["bytes"]
                    for a in p.record.allocation}
        assert all(np.all(np.isfinite(o)) for o in run(out, {"x2d": x[:8], "z": x[8:16]}))
    # each group is given more bytes when the probe finds it the sensitive one
    assert got["o_proj"]["o_proj"] > got["q_proj"]["o_proj"], got
    assert got["q_proj"]["q_proj"] > got["o_proj"]["q_proj"], got


def test_target_size_probes_in_a_worker_beside_the_codes():
    """target-size's probe runs in a worker thread while the main thread makes the next group's
    codes; each group's KL is still its own (the same choices as probing in line: a probe whose
    value depends on the group), and the record says where the time went."""
    import threading

    proto, w0, x, corr = _sized_case()
    seen = []
    weights = {"model.layers.0.self_attn.o_proj.weight": 1e4}

    def make():
        inner = _probe_weighting(weights, w0)()

        def probe(values):
            seen.append((threading.current_thread().name, sorted(values)))
            return inner(values)
        return probe

    spec = QuantSpec("int4", 32, 0, 32, embedding="float", target_mb=0.13, scales="float32")
    p = QuantizePass(spec, corr, probe=make)
    p.plan(ir.serde.deserialize_model(proto))
    assert seen and all(name.startswith("lrc-probe") for name, _ in seen)
    # one probe per group, in the groups' order, each read back as that group's sensitivity
    assert len(seen) == len(p.record.allocation)
    for (_, names), a in zip(seen, p.record.allocation):
        assert any("o_proj" in n for n in names) == ("o_proj" in a["members"][0])
    o = next(a for a in p.record.allocation if "o_proj" in a["members"][0])
    q = next(a for a in p.record.allocation if "q_proj" in a["members"][0])
    assert o["sensitivity"] > 100 * q["sensitivity"]  # the weighted group's own KL
    t = p.record.plan_seconds
    assert t["probe_runs"] == len(seen) + 1 and t["total"] >= t["codes"] >= 0


def test_target_size_with_a_decode_budget_keeps_the_predicted_time():
    """QuantizePass with decode_budget: each choice is charged its predicted seconds (a
    DecodeCost); at 1.0x plain int4/32's time neither a correction (a node) nor 8 bits (twice
    the bytes read) fits, the bytes still hold, the record says what was planned; without it
    the slower, better choices are taken."""
    from lrc.runtime.decodecost import DecodeCost

    proto, w0, _, corr = _sized_case()
    cost = DecodeCost(node={"4/32": (1e-5, 1e-11), "4/64": (1e-5, 1e-11), "4/128": (1e-5, 1e-11),
                            "8/32": (1e-5, 2e-11)}, concat=1e-6, threads=1, where="test")
    total = _initializer_bytes
    big = total(_apply(proto, QuantSpec("int4", 32, 0, 0, embedding="float"))[0]) + 40_000
    picks = {}
    for budget in (None, 1.0):
        spec = QuantSpec("int4", 32, 0, 32, embedding="float", target_mb=big / 1e6,
                         decode_budget=budget)
        m = ir.serde.deserialize_model(proto)
        p = QuantizePass(spec, corr, probe=_probe_weighting({}, w0), decode_cost=lambda: cost)
        run_passes([p], m)
        assert total(ir.serde.serialize_model(m)) <= big
        picks[budget] = [a["choice"] for a in p.record.allocation]
        if budget:
            d = p.record.decode
            assert d["planned_ms"] <= d["plain_ms"] * 1.0 + 1e-9 and d["met"]
            assert any("decode_budget=1" in n for n in p.record.notes)
            assert all("decode_us" in a for a in p.record.allocation)
        else:
            assert p.record.decode is None
    assert any("+r" in c or c.startswith("int8") for c in picks[None]), picks  # slower, better
    assert not any("+r" in c or c.startswith("int8") for c in picks[1.0]), picks
    # the prefill budget: priced from the cost's prompt times; at 1.0x a correction (two more
    # nodes) does not fit there either, the record and the note say so
    cost.prefill, cost.prefill_concat, cost.tokens = {k: (5e-5, 1.4e-9) for k in cost.node}, \
        5e-5, 128
    cost.prefill["8/32"] = (5e-5, 2.1e-9)
    spec = QuantSpec("int4", 32, 0, 32, embedding="float", target_mb=big / 1e6,
                     prefill_budget=1.0)
    m = ir.serde.deserialize_model(proto)
    p = QuantizePass(spec, corr, probe=_probe_weighting({}, w0), decode_cost=lambda: cost)
    run_passes([p], m)
    d = p.record.decode["prefill"]
    assert d["met"] and d["planned_ms"] <= d["plain_ms"] + 1e-9 and d["tokens"] == 128
    assert any("prefill_budget=1" in n and "128-token prompt" in n for n in p.record.notes)
    assert not any("+r" in a["choice"] or a["choice"].startswith("int8")
                   for a in p.record.allocation), p.record.allocation


def test_target_size_counts_the_shared_embeddings_error_in_the_heads_choices():
    """A tied head whose int4 codes the embedding shares: its sensitivity is measured with the
    head alone changed, and the embedding's own output error at each block size (which no
    correction reaches) is probed apart and added to every choice of the head at that block."""
    from types import SimpleNamespace

    from graphs import builder_tied

    from lrc import methods
    from lrc.graph.passes.embedding import EmbeddingPass

    proto = builder_tied(vocab=8192, d=128, hidden=128)  # a table of 1M values
    w0 = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    head_w = "lm_head.MatMul.weight"
    alias = head_w + "::embedding"
    w0[alias] = w0[head_w]
    x = RNG.standard_normal((600, 128)) * np.linspace(3, 0.2, 128)
    st = SimpleNamespace(xtx=x.T @ x)
    corr = methods.make_corrector(["n", "a", "h"], stats={"n": st, "a": st, "h": st})[0]

    class Probe:  # KL = weight x squared change; the embedding's side weighs 50x the head's
        embedding_inputs = {head_w: alias}
        calls = []

        def __call__(self, values):
            self.calls.append(sorted(values))
            return sum((50.0 if k == alias else 1.0) * float(np.sum((v - w0[k]) ** 2))
                       for k, v in values.items())

    probe = Probe()
    spec = QuantSpec("int4", 32, 0, 32, embedding="int4", target_mb=0.8)
    m = ir.serde.deserialize_model(proto)
    p = QuantizePass(spec, corr, probe=lambda: probe)
    run_passes([p, EmbeddingPass(spec, p.record, p.tied_codes)], m)
    head = next(a for a in p.record.allocation if a["members"] == ["/lm_head/MatMul"])
    assert sorted(head["embedding_kl"]) == [32, 64, 128]
    assert head["embedding_kl"][32] < head["embedding_kl"][128]
    assert [alias] in probe.calls and [head_w] in probe.calls  # each side alone
    assert not any(alias in c and head_w in c for c in probe.calls)
    # the head's predicted loss (sensitivity x err) holds at least its embedding's error
    block = int(head["choice"].split("/")[1].split("+")[0])
    assert head["err"] * head["sensitivity"] >= head["embedding_kl"][block] * (1 - 1e-9)
    q = ir.serde.serialize_model(m)
    assert "GatherBlockQuantized" in [n.op_type for n in q.graph.node]


def test_bare_int4_on_a_language_model_is_sized_by_the_recipe(tmp_path):
    """recipe best: ``--quantize int4`` alone on a language model with calibration text is
    ``--target-size 1.2x``: 1.2 times the model in int4 blocks of 32 with an int4 table, bits,
    blocks, ranks and the head's form allocated by the probe; a correction, a block size or
    recipe plain given keep round-to-nearest codes; ``Nx`` without quantize is one line."""
    import json

    from test_evaluate import tiny_tokenizer

    import lrc
    from graphs import builder_tied
    from lrc.graph.passes.quant import int4_form_bytes

    lm = tmp_path / "lm"
    lm.mkdir()
    proto = builder_tied(vocab=8192, d=128, hidden=128)  # a table of 1M values
    onnx.save(proto, lm / "model.onnx")
    tiny_tokenizer().save(str(lm / "tokenizer.json"))
    base = int4_form_bytes(ir.serde.deserialize_model(proto),
                           QuantSpec("int4", 32, 0, 0, embedding="int8"))
    codes = 8192 * 128 // 2 + 8192 * 4 * 4 + 2 * (128 * 128 // 2 + 128 * 4 * 4)
    assert codes < base < codes + 60_000  # the codes, the norm, the graph's own bytes
    out, _ = lrc.compress(str(lm), out=tmp_path / "q", quantize="int4", calib_tokens=512)
    rec = json.loads((tmp_path / "q" / "lrc.json").read_text())
    assert "1.2x" in rec["recipe"]["applied"]["target_size"]
    assert rec["config"]["target_size"] == round(1.2 * base / 1e6, 3)
    assert {a["members"][0] for a in rec["quantize"]["allocation"]} >= {"/lm_head/MatMul"}
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("model.onnx*"))
    assert size <= 1.2 * base * 1.02
    # the decode budget is off unless given; given, the recipe's size takes it
    assert "decode" not in rec["quantize"]
    lrc.compress(str(lm), out=tmp_path / "qd", quantize="int4", calib_tokens=512,
                 decode_budget=1.2)
    rec = json.loads((tmp_path / "qd" / "lrc.json").read_text())
    assert rec["quantize"]["decode"]["budget"] == 1.2 and rec["quantize"]["decode"]["met"]
    with pytest.raises(LrcError, match="decode_budget goes with"):  # plain: no allocator
        lrc.compress(str(lm), quantize="int4", recipe="plain", decode_budget=1.2, dry_run=True)
    for given in ({"recipe": "plain"}, {"correct_rank": 0}, {"block_size": 32},
                  {"calib_tokens": 512, "base_quant": "gptq"}):
        _, plan = lrc.compress(str(lm), quantize="int4", dry_run=True, **given)
        assert plan["config"]["target_size"] is None, given
    with pytest.raises(LrcError, match="relative to the model's int4 form"):
        lrc.compress(str(lm), target_size="1.2x", dry_run=True)


def test_target_size_with_update_solves_the_same_choices_stage_by_stage(tmp_path):
    """``--target-size`` with ``--update`` (recipe best's default when a size is given; not for
    the bare int4's own 1.2x): the allocator chooses on the original model (the choices it
    makes without update), then the sequential correction solves each choice on the inputs
    the quantised model produces; the file fits the size, and its numbers differ from the
    one-shot correction's (fitted targets, not the weights). A size given as ``Nx`` with
    quantisation options is resolved, not read as MB after the write."""
    import json

    from test_evaluate import tiny_tokenizer

    import lrc
    from graphs import builder_tied

    lm = tmp_path / "lm"
    lm.mkdir()
    onnx.save(builder_tied(vocab=8192, d=128, hidden=128), lm / "model.onnx")
    tiny_tokenizer().save(str(lm / "tokenizer.json"))
    kw = dict(quantize="int4", target_size="1.3x", calib_tokens=512, base_quant="gptq",
              correct_a_bits=4, embedding="int4")
    lrc.compress(str(lm), out=tmp_path / "one", update=False, **kw)
    lrc.compress(str(lm), out=tmp_path / "seq", **kw)
    one, seq = (json.loads((tmp_path / d / "lrc.json").read_text()) for d in ("one", "seq"))
    assert "stage by stage" in seq["recipe"]["applied"]["update"]
    assert "update" not in one.get("recipe", {}).get("applied", {})
    _, bare = lrc.compress(str(lm), quantize="int4", calib_tokens=512, dry_run=True)
    assert not bare["config"]["update"]
    assert "update" not in bare.get("recipe", {}).get("applied", {})
    picks = [[(a["members"], a["choice"]) for a in r["quantize"]["allocation"]]
             for r in (one, seq)]
    assert picks[0] == picks[1] and len(picks[0]) == 3
    assert any("+r" in c for _, c in picks[0])  # something corrected, so solved by stages
    assert "stage by stage" in json.dumps(seq["calibration"]), seq["calibration"]
    sizes = [sum(f.stat().st_size for f in (tmp_path / d).glob("model.onnx*"))
             for d in ("one", "seq")]
    assert sizes[1] == sizes[0] <= seq["config"]["target_size"] * 1e6
    down = [[n for n in r["quantize"]["nodes"] if "down" in n["name"]][0] for r in (one, seq)]
    assert down[0]["werr_after"] != down[1]["werr_after"]


def test_per_node_block_sizes():
    """--block-size 32,SEL=B: the selected projections are written with their own blocks."""
    from lrc.config import parse_spec

    proto = shared_input(d=128, outs=(128, 64, 64))
    out, rec = _apply(proto, parse_spec("int4", "0", block_size="32,attn.o=128",
                                        embedding="float", accuracy_level=0))
    blocks = {n.role: n.block_size for n in rec.nodes}
    assert blocks["attn.o"] == 128 and blocks["attn.q"] == 32, blocks
    with pytest.raises(LrcError, match="power of two"):
        parse_spec("int4", "0", block_size="32,attn.o=48")


def test_target_size_measures_with_numpy_blas_on_one_thread():
    """While target-size measures (ONNX Runtime's probe between numpy's BLAS calls) numpy's
    BLAS runs on one thread, and gets its threads back after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from lrc.graph.passes.quant import one_blas_thread

    def blas():
        return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"}

    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    before = blas()
    with one_blas_thread():
        inside = blas()
    after = blas()
    assert inside and set(inside.values()) == {1}
    assert {f: after[f] for f in before} == before  # the threads back (scipy's may be new)


def test_one_blas_thread_reaches_scipys_blas_loaded_after_it():
    """scipy's OpenBLAS is a library of its own: in a fresh interpreter where only numpy's is
    loaded, the limit still holds for scipy's (what GPTQ's triangular solves use) inside."""
    import subprocess
    import sys

    pytest.importorskip("threadpoolctl")
    pytest.importorskip("scipy.linalg")
    code = ("import numpy, threadpoolctl\n"
            "from lrc.graph.passes.quant import one_blas_thread\n"
            "with one_blas_thread():\n"
            "    import scipy.linalg\n"
            "    print(sorted({(i['filepath'], i['num_threads']) for i in "
            "threadpoolctl.threadpool_info() if i['user_api'] == 'blas'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    libs = eval(out)
    assert len(libs) >= 2 and {n for _, n in libs} == {1}, libs


def test_a_grams_factors_are_made_once_per_gram_object():
    """target-size asks GPTQ's ``U`` and the whitening factor of one group's Gram for every
    choice: made once per Gram object (the same values), made again for another object (even
    with equal values: nothing is keyed on contents), and an entry whose Gram died matches no
    new array."""
    import gc

    from lrc.quantmath import _inverse_cholesky, correction_factors, factored

    x = RNG.standard_normal((300, 40))
    g = x.T @ x
    calls = []

    def make(a):
        calls.append(1)
        return np.linalg.cholesky(a)

    first = factored("test", g, make)
    assert factored("test", g, make) is first and len(calls) == 1
    other = g.copy()
    assert factored("test", other, make) is not first and len(calls) == 2
    assert np.array_equal(factored("test", other, make), first) and len(calls) == 2
    del other
    gc.collect()
    assert factored("test", g.copy(), make) is not first and len(calls) == 3
    # GPTQ's factor and the correction's whitening: the same values as made afresh
    u1, _ = _inverse_cholesky(g)
    assert _inverse_cholesky(g)[0] is u1
    e = RNG.standard_normal((40, 24))
    f1, f2 = correction_factors(e, g, 4), correction_factors(e, g.copy(), 4)
    assert np.array_equal(f1.a, f2.a) and np.array_equal(f1.b, f2.b)
