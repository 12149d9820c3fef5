"""Sequential joint update (lrc.update) on a small synthetic residual network."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrc.calibration.sequential import (joint_factor, lookup_factorizer, plan_targets,
                                        sequential_factors, stages)
from lrc.calibration.stats import collect_stats
from lrc.factorize import whiten_factor
from lrc.graph.expose import layout
from lrc.graph.model import as_model
from lrc.graph.passes.lowrank import LowRankPass
from lrc.graph.policy import Policy, make_setting

try:  # the exported tiny LLaMA needs torch + optimum: skip only that test without them
    from fixtures_export import tiny_llama  # noqa: F401 (fixture)
except BaseException:  # pytest.importorskip raises Skipped, a BaseException
    @pytest.fixture
    def tiny_llama():
        pytest.skip("torch / transformers / optimum not installed")

D, H, BLOCKS = 24, 64, 3


def residual_mlp(blocks=BLOCKS, d=D, hidden=H, seed=0, gate=False) -> onnx.ModelProto:
    """x -> [h = h + down(relu(up(h)))] x blocks -> y, LLaMA-style node names; with ``gate``
    the block is ``down(relu(gate(h)) * up(h))`` (gate and up read one input)."""
    r = np.random.default_rng(seed)
    nodes, inits = [], []
    h = "x"
    for b in range(blocks):
        # weights with a decaying spectrum, so truncation error is moderate
        up = (r.standard_normal((d, hidden)) * np.linspace(1.5, 0.1, hidden)) / np.sqrt(d)
        down = (r.standard_normal((hidden, d)) * np.linspace(1.5, 0.1, d)) / np.sqrt(hidden)
        wu, wd = f"model.layers.{b}.mlp.up_proj.weight", f"model.layers.{b}.mlp.down_proj.weight"
        inits += [numpy_helper.from_array(up.astype(np.float32), wu),
                  numpy_helper.from_array(down.astype(np.float32), wd)]
        p = f"/model/layers.{b}/mlp"
        if gate:
            wg = f"model.layers.{b}.mlp.gate_proj.weight"
            g = (r.standard_normal((d, hidden)) * np.linspace(1.5, 0.1, hidden)) / np.sqrt(d)
            inits.append(numpy_helper.from_array(g.astype(np.float32), wg))
            nodes += [
                helper.make_node("MatMul", [h, wg], [f"{p}/gate"], name=f"{p}/gate_proj/MatMul"),
                helper.make_node("Relu", [f"{p}/gate"], [f"{p}/gact"], name=f"{p}/act/Relu"),
                helper.make_node("MatMul", [h, wu], [f"{p}/up"], name=f"{p}/up_proj/MatMul"),
                helper.make_node("Mul", [f"{p}/gact", f"{p}/up"], [f"{p}/act"], name=f"{p}/Mul"),
            ]
        nodes += [] if gate else [
            helper.make_node("MatMul", [h, wu], [f"{p}/up"], name=f"{p}/up_proj/MatMul"),
            helper.make_node("Relu", [f"{p}/up"], [f"{p}/act"], name=f"{p}/act/Relu"),
        ]
        nodes += [
            helper.make_node("MatMul", [f"{p}/act", wd], [f"{p}/down"], name=f"{p}/down_proj/MatMul"),
            helper.make_node("Add", [h, f"{p}/down"], [f"/model/layers.{b}/out"],
                             name=f"/model/layers.{b}/Add"),
        ]
        h = f"/model/layers.{b}/out"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="/model/out"))
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def calib_batches(n=6, seq=32, d=D, seed=1):
    """Anisotropic inputs: one fixed mixing matrix, samples drawn with ``seed``."""
    mix = np.random.default_rng(0).standard_normal((d, d)) * np.linspace(2.0, 0.05, d)
    r = np.random.default_rng(seed)
    return [{"x": (r.standard_normal((2, seq, d)) @ mix.T).astype(np.float32)} for _ in range(n)]


def run(model_or_proto, feeds):
    proto = model_or_proto if isinstance(model_or_proto, onnx.ModelProto) else \
        __import__("onnx_ir").serde.serialize_model(model_or_proto)
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [s.run(["y"], f)[0] for f in feeds]


def rel_err(a, b):
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(y ** 2)) for y in b)
    return (num / den) ** 0.5


def compress_update(proto, pol, batches, **kw):
    model = as_model(onnx.ModelProto.FromString(proto.SerializeToString()))
    factors, st = sequential_factors(model, pol, batches, **kw)
    lr = LowRankPass(pol, factorizer=lookup_factorizer(factors))
    lr(model)
    return model, lr.record, st


def compress_whiten(proto, pol, batches, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    model = as_model(onnx.ModelProto.FromString(proto.SerializeToString()))
    names = sorted({t.node.inputs[0].name for t, _ in plan_targets(model, pol)})
    stats = collect_stats(path, names, batches)
    lr = LowRankPass(pol, factorizer=lambda t, w, r: whiten_factor(w, stats[t.node.inputs[0].name].xtx, r))
    lr(model)
    return model


def test_stages_follow_the_graph():
    model = as_model(residual_mlp())
    pol = Policy(default=make_setting(rank=6))
    plan = plan_targets(model, pol)
    assert len(plan) == 2 * BLOCKS
    lay = layout(model.graph)
    cuts = stages(lay, plan)
    # up reads the residual stream, down reads relu(up): one stage each
    assert [len(s.targets) for s in cuts] == [1] * (2 * BLOCKS)
    # the residual stream and relu output cross the cut before each down_proj
    cut = cuts[1].cut
    names = {v.name for v in lay.crossing(cut)}
    assert names == {"x", "/model/layers.0/mlp/act"}


def test_update_beats_whitening_on_calibration_outputs(tmp_path):
    proto = residual_mlp()
    batches = calib_batches()
    ref = run(proto, batches)
    pol = Policy(default=make_setting(rank=6))
    upd, rec, st = compress_update(proto, pol, batches)
    assert len(rec.rewritten) == 2 * BLOCKS and st.stages == 2 * BLOCKS
    assert all(r.method == "svd-llm+update" for r in rec.rewritten)
    wht = compress_whiten(proto, pol, batches, tmp_path)
    e_upd = rel_err(run(upd, batches), ref)
    e_wht = rel_err(run(wht, batches), ref)
    assert e_upd < 0.95 * e_wht, (e_upd, e_wht)
    # every projection was fitted on shifted inputs except the very first one
    shifts = [v["input_shift"] for v in st.per_target.values()]
    assert shifts[0] == 0.0 and all(s > 0 for s in shifts[1:])
    # held-out inputs from the same distribution: still better
    held = calib_batches(n=3, seed=7)
    ref_h = run(proto, held)
    assert rel_err(run(upd, held), ref_h) < rel_err(run(wht, held), ref_h)


def test_full_rank_reproduces_the_model():
    proto = residual_mlp()
    batches = calib_batches(n=3)
    pol = Policy(default=make_setting(rank="full"), allow_larger=True)
    upd, rec, st = compress_update(proto, pol, batches)
    assert len(rec.rewritten) == 2 * BLOCKS
    out, ref = run(upd, batches), run(proto, batches)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert all(v["input_shift"] < 1e-5 for v in st.per_target.values())


def test_joint_factor_is_the_exact_least_squares_fit():
    r = np.random.default_rng(3)
    xo = r.standard_normal((400, 10)) @ r.standard_normal((10, 10))
    xc = xo + 0.3 * r.standard_normal((400, 10))
    w = r.standard_normal((10, 7))
    f = joint_factor(w, xc.T @ xc, xc.T @ xo, 3, damp=0.0)
    ab = f.a.astype(np.float64) @ f.b
    best = np.linalg.norm(xc @ ab - xo @ w)
    # no rank-3 perturbation does better (local check) and whitening is worse
    g = whiten_factor(w, xc.T @ xc, 3)
    assert best < np.linalg.norm(xc @ (g.a @ g.b) - xo @ w)
    for _ in range(20):
        a2 = f.a + 1e-3 * r.standard_normal(f.a.shape)
        b2 = f.b + 1e-3 * r.standard_normal(f.b.shape)
        assert np.linalg.norm(xc @ (a2 @ b2) - xo @ w) >= best - 1e-9
    # the unconstrained optimum at full rank is plain least squares
    full = joint_factor(w, xc.T @ xc, xc.T @ xo, 7, damp=0.0)
    lstsq = np.linalg.lstsq(xc, xo @ w, rcond=None)[0]
    np.testing.assert_allclose(full.a @ full.b, lstsq, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("transposed", [False, True])
def test_segments_rewrite_like_lowrankpass(transposed):
    """Gemm(transB=1) weights: the segment rewrite and LowRankPass give the same outputs."""
    r = np.random.default_rng(5)
    w1 = r.standard_normal((D, H)).astype(np.float32)
    w2 = r.standard_normal((H, D)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="/model/layers.0/mlp/up_proj/Gemm",
                              transB=1 if transposed else 0),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
                          [numpy_helper.from_array(w1.T.copy() if transposed else w1, "w1"),
                           numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    batches = [{"x": r.standard_normal((50, D)).astype(np.float32)} for _ in range(3)]
    pol = Policy(default=make_setting(rank=5))
    upd, rec, st = compress_update(proto, pol, batches)
    assert len(rec.rewritten) == 2
    # the down_proj input shift seen by the update equals the real one in the final model
    model0 = as_model(proto)
    up = next(t for t, _ in plan_targets(model0, pol) if t.role == "ffn.up")
    assert up.transposed == transposed
    assert st.per_target["/model/layers.0/mlp/down_proj/MatMul"]["input_shift"] > 0
    out = run(upd, batches)
    ref = run(proto, batches)
    assert rel_err(out, ref) < 1.0


# ------------------------------------------------------------------ exported decoder (KV cache)


def _words(n, seed):
    r = np.random.default_rng(seed)
    return [" ".join(f"w{int(i)}" for i in r.integers(3, 256, size=n)) for _ in range(4)]


def _tiny_logits(folder):
    """``(reference logits, logits(ir model))`` of the exported folder on one word sequence."""
    from lrc.runtime.feeds import text_feeds
    from lrc.runtime.session import open_session as session

    sess = session(folder)
    ids = np.array([[1] + [int(w[1:]) for w in _words(60, 9)[0].split()]], dtype=np.int64)
    feeds = text_feeds(sess, ids)

    def logits(model):
        proto = __import__("onnx_ir").serde.serialize_model(model)
        s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(["logits"], feeds)[0]

    return sess.run(["logits"], feeds)[0], logits


def test_tiny_llama_export_full_rank_and_low_rank(tiny_llama):
    """The real optimum layout (KV-cache inputs, rotary, masks crossing every cut): token-id
    calibration through lrc.feeds; full rank reproduces the logits; low rank runs end to end."""
    from lrc.calibration.sequential import sequential_update

    _, folder = tiny_llama
    texts = _words(300, 0)
    ref, logits = _tiny_logits(folder)

    full = Policy(default=make_setting(rank="full"), allow_larger=True, exclude=["head"])
    model, rep = sequential_update(folder, full, calib_texts=texts, n_tokens=512, seq_len=64)
    assert len(rep["rewritten"]) == 7 * 2  # q k v o gate up down per layer, 2 layers
    np.testing.assert_allclose(logits(model), ref, rtol=1e-3, atol=1e-4)

    pol = Policy(default=make_setting(rank=8), exclude=["head"])
    upd, rep = sequential_update(folder, pol, calib_texts=texts, n_tokens=512, seq_len=64)
    cal = rep["calibration"]
    assert cal["tokens"] == 512 and cal["stages"] == 8  # qkv, o, gate/up, down per layer
    assert all(r["method"] == "svd-llm+update" for r in rep["rewritten"])
    assert np.isfinite(logits(upd)).all()


def test_carried_inputs_match_the_final_model():
    """X_c carried through the segments is what the rewritten model really computes."""
    import onnx_ir as ir

    proto = residual_mlp()
    batches = calib_batches(n=3)
    pol = Policy(default=make_setting(rank=5))
    upd, rec, st = compress_update(proto, pol, batches)
    name = f"/model/layers.{BLOCKS - 1}/mlp/act"

    def tensor(p):
        p = onnx.ModelProto.FromString(p.SerializeToString())
        p.graph.output.append(onnx.ValueInfoProto(name=name))
        s = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
        return [s.run([name], f)[0] for f in batches]

    shift = rel_err(tensor(ir.serde.serialize_model(upd)), tensor(proto))
    got = st.per_target[f"/model/layers.{BLOCKS - 1}/mlp/down_proj/MatMul"]["input_shift"]
    assert shift > 0.01
    assert abs(got - shift) < 1e-4 * shift


def test_sums_pair_each_batch_at_one_cut(monkeypatch):
    """The original model runs one cut ahead of the compressed one (only the compressed state
    is held across a solve): each stage is still solved from ``C = X_cᵀX_c``, ``M = X_cᵀX_o``
    and ``E = X_cᵀ(h_o - h_c)`` of the same tokens at the same cut, X_c and h_c being what the
    final model computes."""
    import onnx_ir as ir

    from lrc.calibration import sequential as S

    seen = []
    real = S.joint_factor
    monkeypatch.setattr(S, "joint_factor", lambda w, c, m, rank, damp=0.1, e=None:
                        seen.append((c.copy(), m.copy(), None if e is None else e.copy()))
                        or real(w, c, m, rank, damp=damp, e=e))
    proto = residual_mlp()
    batches = calib_batches(n=3)
    upd, _, _ = compress_update(proto, Policy(default=make_setting(rank=5)), batches)
    assert len(seen) == 2 * BLOCKS
    b = BLOCKS - 1
    x, h = f"/model/layers.{b}/mlp/act", f"/model/layers.{b - 1}/out"

    def tensors(p):
        p = onnx.ModelProto.FromString(p.SerializeToString())
        p.graph.output.extend([onnx.ValueInfoProto(name=x), onnx.ValueInfoProto(name=h)])
        s = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = [s.run([x, h], f) for f in batches]
        return [np.concatenate([o[i].reshape(-1, o[i].shape[-1]) for o in outs]).astype(np.float64)
                for i in (0, 1)]

    xc, hc = tensors(ir.serde.serialize_model(upd))
    xo, ho = tensors(proto)
    c, m, e = seen[-1]  # the last block's down_proj
    for got, want in ((c, xc.T @ xc), (m, xc.T @ xo), (e, xc.T @ (ho - hc))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(m, xc.T @ xc, rtol=1e-3)  # the two models differ there


def test_group_inputs_update_carries_the_joint_rewrite():
    """--group-inputs with --update: gate/up share one A; the inputs carried through the
    segments are what the final (joint) model computes, and the fit beats joint whitening."""
    import onnx_ir as ir

    proto = residual_mlp(gate=True)
    batches = calib_batches(n=4)
    ref = run(proto, batches)
    pol = Policy(default=make_setting(ratio=0.5), group_inputs=True)
    upd, rec, st = compress_update(proto, pol, batches)
    joint = [r for r in rec.rewritten if r.joint_with]
    assert {r.role for r in joint} == {"ffn.gate", "ffn.up"} and len(joint) == 2 * BLOCKS
    p = ir.serde.serialize_model(upd)
    for b in range(BLOCKS):  # one MatMul reads each block's input (the shared A)
        h = "x" if b == 0 else f"/model/layers.{b - 1}/out"
        assert sum(1 for n in p.graph.node if n.op_type == "MatMul" and h in n.input) == 1
    name = f"/model/layers.{BLOCKS - 1}/mlp/act"

    def tensor(pr):
        pr = onnx.ModelProto.FromString(pr.SerializeToString())
        pr.graph.output.append(onnx.ValueInfoProto(name=name))
        s = ort.InferenceSession(pr.SerializeToString(), providers=["CPUExecutionProvider"])
        return [s.run([name], f)[0] for f in batches]

    shift = rel_err(tensor(p), tensor(proto))
    got = st.per_target[f"/model/layers.{BLOCKS - 1}/mlp/down_proj/MatMul"]["input_shift"]
    assert shift > 0.01 and abs(got - shift) < 1e-4 * shift
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        wht = compress_whiten(proto, pol, batches, Path(d))
    assert rel_err(run(upd, batches), ref) < rel_err(run(wht, batches), ref)


def test_joint_factor_residual_term_is_the_least_squares_fit_of_the_block_output():
    """With e = X_cᵀ(h_o - h_c), full rank and no damping, X_c·A·B is the least-squares fit of
    X_o·W + h_o - h_c (the residual stream after the Add matches the original's)."""
    r = np.random.default_rng(3)
    xo = r.standard_normal((400, 10))
    xc = xo + 0.3 * r.standard_normal((400, 10))
    w = r.standard_normal((10, 6))
    ho = r.standard_normal((400, 6))
    hc = ho + 0.2 * r.standard_normal((400, 6))
    f = joint_factor(w, xc.T @ xc, xc.T @ xo, 6, damp=0.0, e=xc.T @ (ho - hc))
    want = np.linalg.lstsq(xc, xo @ w + ho - hc, rcond=None)[0]
    assert np.allclose(f.a @ f.b, want, atol=1e-6)
    f0 = joint_factor(w, xc.T @ xc, xc.T @ xo, 6, damp=0.0)
    assert not np.allclose(f0.a @ f0.b, want, atol=1e-3)


def test_residual_target_is_used_for_projections_added_to_the_stream():
    proto = residual_mlp()
    batches = calib_batches(n=3)
    ref = run(proto, batches)
    pol = Policy(default=make_setting(rank=6))
    upd, _, st = compress_update(proto, pol, batches)
    assert all(v["residual_target"] == ("down_proj" in k) for k, v in st.per_target.items())
    plain, _, _ = compress_update(proto, pol, batches, residual=False)
    # the block outputs (hence y) track the original better with the residual target
    assert rel_err(run(upd, batches), ref) < rel_err(run(plain, batches), ref)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_quantize_with_update_is_the_sequential_correction(tiny_llama):
    """``lrc.compress(..., quantize="int4", correct_rank=R, update=True)`` on the real optimum
    layout: the correction is computed stage by stage (recorded as such), the graph is
    MatMulNBits only and its logits stay close to the original's."""
    from lrc.errors import LrcError
    from lrc.pipeline import compress

    _, folder = tiny_llama
    ref, logits = _tiny_logits(folder)
    model, rep = compress(folder / "model.onnx", quantize="int4", block_size=16,
                          correct_rank=16, update=True, calib=None, calib_tokens=512,
                          calib_seq=64)
    assert rep["method"] == "svd-llm+update"
    cal = rep["calibration"]
    assert cal["method"].startswith("sequential") and cal["stages"] == 9  # + the head
    nodes = rep["quantize"]["nodes"]
    assert len(nodes) == 15 and all(n["rank"] == 16 for n in nodes)
    assert np.corrcoef(logits(model).ravel(), ref.ravel())[0, 1] > 0.99
    with pytest.raises(LrcError, match="auto"):
        compress(folder / "model.onnx", quantize="int4", correct_rank="auto", update=True)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_auto_refuses_plain_svd_on_a_language_model(tiny_llama, tmp_path):
    """A decoder's model.onnx without its tokenizer: ``--method auto`` stops with what to pass
    (plain SVD destroys LMs) instead of falling back quietly; ``--method svd`` is accepted."""
    import shutil

    from test_cli import _one_line_error, lrc as cli

    _, folder = tiny_llama
    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    shutil.copy(folder / "model.onnx", bare)
    shutil.copy(folder / "config.json", bare.parent / "config.json")
    out = tmp_path / "r.onnx"
    e = _one_line_error(cli("compress", bare, "--rank", "8", "-o", out), code=2)
    assert "--tokenizer" in e and "--method svd" in e and not out.exists()
    r = cli("compress", bare, "--rank", "8", "--method", "svd", "-o", out)
    assert r.returncode == 0, r.stderr
    r = cli("compress", bare, "--rank", "8", "--tokenizer", folder, "--calib-tokens", "256",
            "-o", tmp_path / "w.onnx")
    assert r.returncode == 0 and "svd-llm" in r.stdout, r.stderr
