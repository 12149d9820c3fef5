"""ShareTiedEmbedding: a head holding a copy of the embedding table reads the table itself."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import _model, init, vin
from onnx import TensorProto, helper

from lrc.graph.locate import locate
from lrc.graph.passes.tied import ShareTiedEmbedding

ort = pytest.importorskip("onnxruntime")

V, H = 40, 8


def tied_lm(form: str, equal: bool = True, seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(E) -> Relu -> head -> logits, the head holding its own copy of E."""
    r = np.random.default_rng(seed)
    e = r.standard_normal((V, H)).astype(np.float32)
    copy = e.copy() if equal else e + np.float32(1e-3)
    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["x0"],
                              name="/model/embed_tokens/Gather"),
             helper.make_node("Relu", ["x0"], ["x"])]
    inits = [init("model.embed_tokens.weight", e)]
    head = "/lm_head/MatMul"
    if form == "matmul":  # W = Eᵀ [H, V]
        inits.append(init("lm_head.weight_t", np.ascontiguousarray(copy.T)))
        nodes.append(helper.make_node("MatMul", ["x", "lm_head.weight_t"], ["logits"], name=head))
    elif form == "transpose":  # MatMul(X, Transpose(W)), W = E [V, H]
        inits.append(init("lm_head.weight", copy))
        nodes += [helper.make_node("Transpose", ["lm_head.weight"], ["wt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["x", "wt"], ["logits"], name=head)]
    elif form == "gemm_tb":  # Gemm(X, W, transB=1), W = E
        inits.append(init("lm_head.weight", copy))
        nodes = nodes[:1] + [helper.make_node("Relu", ["x0"], ["x2"]),
                             helper.make_node("Reshape", ["x2", "shape"], ["x"]),
                             helper.make_node("Gemm", ["x", "lm_head.weight"], ["logits"], transB=1,
                                              name="/lm_head/Gemm")]
        inits.append(init("shape", np.array([-1, H], np.int64)))
    elif form == "gemm":  # Gemm(X, W, transB=0), W = Eᵀ
        inits.append(init("lm_head.weight_t", np.ascontiguousarray(copy.T)))
        nodes = nodes[:1] + [helper.make_node("Relu", ["x0"], ["x2"]),
                             helper.make_node("Reshape", ["x2", "shape"], ["x"]),
                             helper.make_node("Gemm", ["x", "lm_head.weight_t"], ["logits"],
                                              name="/lm_head/Gemm")]
        inits.append(init("shape", np.array([-1, H], np.int64)))
    else:
        raise ValueError(form)
    return _model(nodes, [vin("input_ids", ["batch", "seq"], TensorProto.INT64)],
                  [vin("logits", ["n", V] if form.startswith("gemm") else ["batch", "seq", V])], inits)


def _run(proto: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids})[0]


@pytest.mark.parametrize("form", ["matmul", "transpose", "gemm_tb", "gemm"])
def test_head_copy_is_dropped_and_outputs_are_identical(form):
    proto = tied_lm(form)
    ids = np.array([[1, 5, 7, 39], [0, 2, 3, 4]], np.int64)
    want = _run(proto, ids)
    model = ir.serde.deserialize_model(proto)
    before = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    tied = ShareTiedEmbedding()
    assert tied(model).modified
    assert [r["table"] for r in tied.record["shared"]] == ["model.embed_tokens.weight"]
    inits = model.graph.initializers
    assert "lm_head.weight" not in inits and "lm_head.weight_t" not in inits
    assert tied.record["bytes_saved"] == V * H * 4
    assert sum(v.const_value.nbytes for v in inits.values()) == before - V * H * 4
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(_run(out, ids), want)  # bit-exact: the same numbers multiply
    if form in ("matmul", "transpose"):  # lrc's role detection still sees a tied head
        heads = [t for t in locate(model) if t.role == "head"]
        assert [t.name for t in heads] == ["/lm_head/MatMul"] and heads[0].tied


def test_values_that_differ_are_left_with_a_reason():
    model = ir.serde.deserialize_model(tied_lm("matmul", equal=False))
    tied = ShareTiedEmbedding()
    assert not tied(model).modified
    assert "lm_head.weight_t" in model.graph.initializers
    assert tied.record["left"][0]["reason"] == "same shape as the embedding, other values"


def test_an_already_shared_head_is_untouched():
    """The table itself through Transpose (what optimum writes for SmolLM2) is not a copy."""
    proto = tied_lm("transpose")
    proto.graph.node[2].input[0] = "model.embed_tokens.weight"
    del proto.graph.initializer[1]
    model = ir.serde.deserialize_model(proto)
    tied = ShareTiedEmbedding()
    assert not tied(model).modified and not tied.record["left"]
