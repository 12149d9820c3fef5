"""The low-rank pass on each graph pattern: numbers checked in ONNX Runtime before and after."""

import numpy as np
import onnx
import pytest

import lrc
from graphs import (gemm, matmul_chain, no_targets, odd_cases, run, shared_weight, tied_head,
                    to_proto)


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a.astype(np.float64)))


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_matmul_full_rank_is_exact_and_names_kept():
    m = matmul_chain()
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    new, rep = lrc.compress(m, rank="full")
    p = to_proto(new)
    onnx.checker.check_model(p, full_check=True)
    assert _rel(ref, run(p, {"x": x})[0]) < 1e-5
    assert rep["totals"]["rewritten"] == 3
    assert [r["role"] for r in rep["rewritten"]] == ["attn.o", "ffn.up", "ffn.down"]
    # each original node keeps its output tensor, and A·B is two MatMuls, never folded
    assert {r["output"] for r in rep["rewritten"]} == {"h0", "h1", "y"}
    assert _ops(p).count("MatMul") == 6
    # the dense weights are gone
    names = {i.name for i in p.graph.initializer}
    assert "model.layers.0.mlp.up_proj.weight" not in names


def test_low_rank_error_matches_svd_tail():
    m = matmul_chain(d=16, hidden=32)
    new, rep = lrc.compress(m, rank=4, allow_larger=True)
    w = onnx.numpy_helper.to_array(m.graph.initializer[1])
    s = np.linalg.svd(w, compute_uv=False)
    rec = next(r for r in rep["rewritten"] if r["role"] == "ffn.up")
    assert rec["rank"] == 4
    assert rec["rel_error"] == pytest.approx(np.sqrt((s[4:] ** 2).sum() / (s ** 2).sum()), rel=1e-3)
    assert rec["params_after"] == 4 * (16 + 32)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,with_c", [(1.0, 1.0, True), (0.5, 2.0, True), (1.5, 1.0, False)])
def test_gemm_variants_full_rank(trans_b, alpha, beta, with_c):
    m = gemm(trans_b=trans_b, alpha=alpha, beta=beta, with_c=with_c)
    x = np.random.default_rng(1).standard_normal((7, 12)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    new, rep = lrc.compress(m, rank="full")
    p = to_proto(new)
    onnx.checker.check_model(p, full_check=True)
    assert rep["totals"]["rewritten"] == 1
    assert _rel(ref, run(p, {"x": x})[0]) < 1e-5
    g = next(n for n in p.graph.node if n.op_type == "Gemm")
    assert {a.name: a for a in g.attribute}["transB"].i == 0


def test_gemm_trans_a_is_skipped_with_reason():
    m = gemm(trans_a=1)
    _, rep = lrc.compress(m, rank="full")
    assert rep["totals"]["rewritten"] == 0
    assert "transA" in rep["skipped"][0]["reason"]


def test_tied_embedding_head_keeps_gather_working():
    m = tied_head()
    ids = np.array([[1, 2, 3, 49]], dtype=np.int64)
    ref = run(m, {"ids": ids})[0]
    new, rep = lrc.compress(m, rank="full")
    p = to_proto(new)
    rec = rep["rewritten"][0]
    assert rec["role"] == "head" and rec["shape"] == [16, 50]
    assert "another node" in (rec["note"] or "")
    assert rep["totals"]["params_kept_shared"] == 50 * 16 and rec["tied"]
    assert any("tied" in n for n in rep["notes"])
    assert _rel(ref, run(p, {"ids": ids})[0]) < 1e-5
    ops = _ops(p)
    assert "Gather" in ops and "Transpose" not in ops  # dead Transpose removed, Gather kept
    assert "embed.weight" in {i.name for i in p.graph.initializer}


def test_shared_initializer_factored_once():
    m = shared_weight()
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    ref = run(m, {"x1": x, "x2": 2 * x})
    new, rep = lrc.compress(m, rank=6)
    p = to_proto(new)
    assert rep["totals"]["rewritten"] == 2
    assert rep["rewritten"][0]["shared_with"] == ["b/MatMul"]
    # one pair of factors for both nodes
    assert len(p.graph.initializer) == 2
    assert rep["totals"]["params_before"] == 16 * 24  # counted once
    out = run(p, {"x1": x, "x2": 2 * x})
    np.testing.assert_allclose(2 * out[0], out[1], rtol=1e-4, atol=1e-5)
    assert _rel(ref[0], out[0]) < 0.9


def test_fp16_weights_stay_fp16():
    m = matmul_chain(dtype=np.float16)
    x = np.random.default_rng(3).standard_normal((1, 4, 16)).astype(np.float16)
    ref = run(m, {"x": x})[0]
    new, rep = lrc.compress(m, rank="full")
    p = to_proto(new)
    for i in p.graph.initializer:
        assert i.data_type == onnx.TensorProto.FLOAT16
    assert any("float16" in n for n in rep["notes"])
    assert _rel(ref, run(p, {"x": x})[0]) < 1e-2  # fp16 rounding of the factors


def test_ineligible_patterns_have_reasons():
    _, rep = lrc.compress(odd_cases(), rank="full")
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert rep["totals"]["rewritten"] == 0
    assert "3-D" in reasons["batched"]
    assert "left" in reasons["leftconst"]
    assert "graph input" in reasons["overridable"]


def test_nothing_eligible():
    new, rep = lrc.compress(no_targets(), rank=4)
    assert rep["totals"]["targets"] == 0


def test_unprofitable_rank_left_dense_with_note():
    _, rep = lrc.compress(matmul_chain(d=16, hidden=32), rank=15)
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "would not shrink" in reasons["/model/layers.0/self_attn/o_proj/MatMul"]
    _, rep = lrc.compress(matmul_chain(d=16, hidden=32), rank=16)
    assert all(">= min" in s["reason"] for s in rep["skipped"])


def test_compress_twice_does_not_refactor_factors():
    new, _ = lrc.compress(matmul_chain(), rank=4, allow_larger=True)
    _, rep2 = lrc.compress(new, rank=2, allow_larger=True)
    assert rep2["totals"]["rewritten"] == 0
    assert all("already" in s["reason"] for s in rep2["skipped"])


@pytest.mark.parametrize("form", ["dynamic", "qdq"])
def test_int8_factors(form):
    m = matmul_chain(d=32, hidden=64)
    x = np.random.default_rng(5).standard_normal((2, 8, 32)).astype(np.float32)
    fp, _ = lrc.compress(matmul_chain(d=32, hidden=64), rank=12)
    ref = run(to_proto(fp), {"x": x})[0]
    new, rep = lrc.compress(m, rank=12, int8=True, int8_form=form)
    p = to_proto(new)
    onnx.checker.check_model(p, full_check=True)
    ops = _ops(p)
    if form == "dynamic":
        assert ops.count("MatMulInteger") == 6 and "MatMul" not in ops
        # the A-factors of one input share one DynamicQuantizeLinear
        assert ops.count("DynamicQuantizeLinear") == 6
    else:
        assert ops.count("DequantizeLinear") == 6 and ops.count("MatMul") == 6
    ints = [i for i in p.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(ints) >= 6
    assert rep["int8"]["factors"] == 6 and rep["int8"]["rel_error"] < 0.02
    assert _rel(ref, run(p, {"x": x})[0]) < 0.05
    assert {o.name for o in p.graph.output} == {"y"}


def test_int8_shares_quantisation_of_a_shared_input():
    m = shared_weight()
    new, _ = lrc.compress(m, rank=4, int8=True)
    ops = _ops(to_proto(new))
    # two different inputs x1, x2 -> two DQL for A; two intermediate -> two DQL for B
    assert ops.count("DynamicQuantizeLinear") == 4


# --------------------------------------------------------------------------- --group-inputs

QKV = ("q_proj", "k_proj", "v_proj")


def _weight(proto, name):
    from onnx import numpy_helper

    return next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == name)


@pytest.mark.parametrize("gemm_last", [False, True])
def test_group_inputs_factors_qkv_jointly(gemm_last):
    """Q/K/V reading one input get one A (one MatMul reads X) and a B each; the result is the
    truncated SVD of the norm-balanced [Wq Wk Wv], checked against numpy; params add up."""
    from graphs import shared_input

    m = shared_input(gemm_last=gemm_last)
    r = np.random.default_rng(0)
    feeds = {"x2d": r.standard_normal((7, 16)).astype(np.float32),
             "z": r.standard_normal((7, 16)).astype(np.float32)}
    ref = run(m, feeds)
    new, rep = lrc.compress(m, ratio=0.9, group_inputs=True, method="svd")
    p = to_proto(new)
    onnx.checker.check_model(p, full_check=True)
    rows = {x["name"].split("/")[-2]: x for x in rep["rewritten"]}
    q, k, v, o = (rows[n] for n in (*QKV, "o_proj"))
    readers = [n for n in p.graph.node if "x2d" in n.input]
    assert len(readers) == 1 and readers[0].op_type == "MatMul"
    # joint rank for the 16 x 32 matrix at 0.9 of its params: floor(0.9*512/48) = 9
    # (separately q would get 7 and k, v 4 each)
    assert q["rank"] == k["rank"] == v["rank"] == 9
    assert sorted(q["joint_with"]) == sorted([k["name"], v["name"]]) and not o["joint_with"]
    assert q["params_after"] + k["params_after"] + v["params_after"] == 9 * (16 + 32)
    assert rep["totals"]["params_after"] == 9 * 48 + o["params_after"]
    # numbers: the rank-9 SVD of [Wq/|Wq| Wk/|Wk| Wv/|Wv|], norms put back per block
    ws = []
    for n in QKV:
        w = _weight(m, f"model.layers.0.self_attn.{n}.weight").astype(np.float64)
        ws.append(w.T if (gemm_last and n == "v_proj") else w)
    scales = [np.linalg.norm(w) for w in ws]
    u, s, vt = np.linalg.svd(np.concatenate([w / c for w, c in zip(ws, scales)], axis=1),
                             full_matrices=False)
    approx = (u[:, :9] * s[:9]) @ vt[:9]
    out = run(p, feeds)
    off = 0
    for i, (w, c) in enumerate(zip(ws, scales)):
        want = feeds["x2d"].astype(np.float64) @ (approx[:, off:off + w.shape[1]] * c)
        if gemm_last and i == 2:
            want = want + _weight(m, "vbias")
        off += w.shape[1]
        assert np.abs(out[i] - want).max() < 1e-4 * np.abs(want).max()
        assert 0 < _rel(ref[i], out[i]) < 0.5
    assert _rel(ref[3], out[3]) < 0.5  # o_proj factored on its own


def test_group_inputs_leaves_rank_settings_and_shared_weights_alone():
    from graphs import shared_input

    _, rep = lrc.compress(shared_input(), rank=4, group_inputs=True, method="svd")
    assert rep["totals"]["rewritten"] == 4
    assert not any(x["joint_with"] for x in rep["rewritten"])  # rank N: per matrix
    _, rep = lrc.compress(shared_weight(), ratio=0.5, group_inputs=True, method="svd")
    assert not any(x["joint_with"] for x in rep["rewritten"])
