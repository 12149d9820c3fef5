"""Property: on random graphs of MatMul/Gemm projections, a full-rank rewrite preserves outputs."""

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lrc
from graphs import run, to_proto


@st.composite
def graphs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    r = np.random.default_rng(seed)
    n_layers = draw(st.integers(1, 4))
    dims = [draw(st.integers(1, 24)) for _ in range(n_layers + 1)]
    nodes, inits = [], []
    cur = "x"
    for i in range(n_layers):
        kind = draw(st.sampled_from(["matmul", "gemm", "gemm_t", "transpose"]))
        m, n = dims[i], dims[i + 1]
        w = r.standard_normal((m, n)).astype(np.float32)
        out = f"h{i}"
        if kind == "matmul":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out], name=f"mm{i}"))
        elif kind == "transpose":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("Transpose", [f"w{i}"], [f"wt{i}"], perm=[1, 0]))
            nodes.append(helper.make_node("MatMul", [cur, f"wt{i}"], [out], name=f"mm{i}"))
        else:
            tb = kind == "gemm_t"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T) if tb else w, f"w{i}"))
            inits.append(numpy_helper.from_array(r.standard_normal(n).astype(np.float32), f"c{i}"))
            nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"c{i}"], [out], name=f"g{i}",
                                          transB=int(tb), alpha=float(draw(st.sampled_from([1.0, 0.5]))),
                                          beta=float(draw(st.sampled_from([1.0, 2.0])))))
        if draw(st.booleans()) and i < n_layers - 1:
            nodes.append(helper.make_node("Tanh", [out], [out + "_a"]))
            out += "_a"
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", dims[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", dims[-1]])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = r.standard_normal((draw(st.integers(1, 5)), dims[0])).astype(np.float32)
    return model, x, n_layers


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_full_rank_rewrite_preserves_outputs(case):
    model, x, n_layers = case
    ref = run(model, {"x": x})[0]
    new, rep = lrc.compress(model, rank="full")
    assert rep["totals"]["rewritten"] == n_layers
    p = to_proto(new)
    onnx.checker.check_model(p, full_check=True)
    out = run(p, {"x": x})[0]
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * scale)
