"""Tiny ONNX graphs built with onnx.helper, one per pattern the low-rank pass must handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


def _model(nodes, inputs, outputs, inits, opset=OPSET):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def vin(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def rng(seed=0):
    return np.random.default_rng(seed)


def matmul_chain(d=16, hidden=32, seed=0, names=True, dtype=np.float32):
    """X[b,s,d] -> q/k/v-like MatMuls + Add bias -> up -> Relu -> down; names like LLaMA's."""
    r = rng(seed)
    tp = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    w = {k: (r.standard_normal(s) / np.sqrt(s[0])).astype(dtype) for k, s in
         {"up": (d, hidden), "down": (hidden, d), "o": (d, d)}.items()}
    b = r.standard_normal(hidden).astype(dtype)
    n = (lambda s: s) if names else (lambda s: "")
    wn = (lambda s: s) if names else (lambda s: f"val_{abs(hash(s)) % 1000}")
    nodes = [
        helper.make_node("MatMul", ["x", wn("model.layers.0.self_attn.o_proj.weight")], ["h0"],
                         name=n("/model/layers.0/self_attn/o_proj/MatMul")),
        helper.make_node("MatMul", ["h0", wn("model.layers.0.mlp.up_proj.weight")], ["h1"],
                         name=n("/model/layers.0/mlp/up_proj/MatMul")),
        helper.make_node("Add", ["h1", "bias"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", wn("model.layers.0.mlp.down_proj.weight")], ["y"],
                         name=n("/model/layers.0/mlp/down_proj/MatMul")),
    ]
    inits = [init(wn("model.layers.0.self_attn.o_proj.weight"), w["o"]),
             init(wn("model.layers.0.mlp.up_proj.weight"), w["up"]),
             init("bias", b),
             init(wn("model.layers.0.mlp.down_proj.weight"), w["down"])]
    return _model(nodes, [vin("x", ["batch", "seq", d], tp)], [vin("y", ["batch", "seq", d], tp)],
                  inits)


def gemm(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, d=12, out=20, seed=1, with_c=True):
    r = rng(seed)
    w = r.standard_normal((out, d) if trans_b else (d, out)).astype(np.float32)
    c = r.standard_normal(out).astype(np.float32)
    x_shape = [d, "n"] if trans_a else ["n", d]
    ins = ["x", "w"] + (["c"] if with_c else [])
    nodes = [helper.make_node("Gemm", ins, ["y"], name="fc1", transA=trans_a, transB=trans_b,
                              alpha=alpha, beta=beta)]
    inits = [init("w", w)] + ([init("c", c)] if with_c else [])
    return _model(nodes, [vin("x", x_shape)], [vin("y", ["n", out])], inits)


def tied_head(vocab=50, d=16, seed=2):
    """Embedding Gather and lm_head MatMul(X, Transpose(E)) share one initializer."""
    r = rng(seed)
    e = r.standard_normal((vocab, d)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embed.weight", "ids"], ["h"], name="/model/embed_tokens/Gather"),
        helper.make_node("Transpose", ["embed.weight"], ["eT"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "eT"], ["logits"], name="/lm_head/MatMul"),
    ]
    return _model(nodes, [vin("ids", ["b", "s"], TensorProto.INT64)],
                  [vin("logits", ["b", "s", vocab])], [init("embed.weight", e)])


def shared_weight(d=16, out=24, seed=3):
    """One initializer used by two MatMuls (e.g. weights shared across layers)."""
    r = rng(seed)
    w = r.standard_normal((d, out)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x1", "w"], ["y1"], name="a/MatMul"),
             helper.make_node("MatMul", ["x2", "w"], ["y2"], name="b/MatMul")]
    return _model(nodes, [vin("x1", ["n", d]), vin("x2", ["n", d])],
                  [vin("y1", ["n", out]), vin("y2", ["n", out])], [init("w", w)])


def shared_input(d=16, outs=(16, 8, 8), seed=5, gemm_last=False):
    """Q/K/V-like projections of one input X, plus an unrelated projection of another input;
    with ``gemm_last`` the last of them is a Gemm(transB=1) with a bias."""
    r = rng(seed)
    nodes, inits, outputs = [], [], []
    for i, (role, n) in enumerate(zip(("q_proj", "k_proj", "v_proj"), outs)):
        wname = f"model.layers.0.self_attn.{role}.weight"
        name = f"/model/layers.0/self_attn/{role}/MatMul"
        w = (r.standard_normal((d, n)) * np.linspace(2, 0.1, n)).astype(np.float32)
        if gemm_last and i == len(outs) - 1:
            inits += [init(wname, np.ascontiguousarray(w.T)), init("vbias", r.standard_normal(n).astype(np.float32))]
            nodes.append(helper.make_node("Gemm", ["x2d", wname, "vbias"], [f"y{i}"], name=name,
                                          transB=1))
        else:
            inits.append(init(wname, w))
            nodes.append(helper.make_node("MatMul", ["x2d", wname], [f"y{i}"], name=name))
        outputs.append(vin(f"y{i}", ["n", n]))
    inits.append(init("model.layers.0.self_attn.o_proj.weight",
                      r.standard_normal((d, d)).astype(np.float32)))
    nodes.append(helper.make_node("MatMul", ["z", "model.layers.0.self_attn.o_proj.weight"], ["yo"],
                                  name="/model/layers.0/self_attn/o_proj/MatMul"))
    outputs.append(vin("yo", ["n", d]))
    return _model(nodes, [vin("x2d", ["n", d]), vin("z", ["n", d])], outputs, inits)


def odd_cases(seed=4):
    """3-D weight, constant on the left, and a weight that is also a graph input."""
    r = rng(seed)
    w3 = r.standard_normal((2, 8, 8)).astype(np.float32)
    left = r.standard_normal((8, 8)).astype(np.float32)
    wi = r.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w3"], ["y1"], name="batched"),
             helper.make_node("MatMul", ["left", "x2"], ["y2"], name="leftconst"),
             helper.make_node("MatMul", ["x2", "wi"], ["y3"], name="overridable")]
    return _model(nodes, [vin("x", [2, 4, 8]), vin("x2", [8, 8]), vin("wi", [8, 8])],
                  [vin("y1", [2, 4, 8]), vin("y2", [8, 8]), vin("y3", [8, 8])],
                  [init("w3", w3), init("left", left), init("wi", wi)])


def no_targets():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return _model(nodes, [vin("x", [4])], [vin("y", [4])], [])


def run(model: onnx.ModelProto | str, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    src = model if isinstance(model, str) else model.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def to_proto(ir_model) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.serde.serialize_model(ir_model)


def builder_tied(vocab=32768, d=32, hidden=64, seed=6, opset=22):
    """The tied layout of ONNX Runtime GenAI's model builder: the embedding is
    ``Gather(Transpose(lm_head.MatMul.weight), ids)`` of the head's ``[d, vocab]`` weight,
    a ``SimplifiedLayerNormalization`` (ONNX Runtime's own op, registered in the ONNX domain)
    before an MLP, the head ``MatMul(h, lm_head.MatMul.weight)``."""
    r = rng(seed)
    head = (r.standard_normal((d, vocab)) / np.sqrt(d)).astype(np.float32)
    up = (r.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
    down = (r.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["lm_head.MatMul.weight"], ["table"],
                         name="/model/embed_tokens/Transpose"),
        helper.make_node("Gather", ["table", "input_ids"], ["e"], name="/model/embed_tokens/Gather"),
        helper.make_node("SimplifiedLayerNormalization", ["e", "norm.weight"], ["n"],
                         name="/model/layers.0/input_layernorm/LayerNorm", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n", "model.layers.0.mlp.up_proj.MatMul.weight"], ["u"],
                         name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Relu", ["u"], ["a"]),
        helper.make_node("MatMul", ["a", "model.layers.0.mlp.down_proj.MatMul.weight"], ["h"],
                         name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("MatMul", ["h", "lm_head.MatMul.weight"], ["logits"],
                         name="/lm_head/MatMul"),
    ]
    inits = [init("lm_head.MatMul.weight", head), init("norm.weight", np.ones(d, np.float32)),
             init("model.layers.0.mlp.up_proj.MatMul.weight", up),
             init("model.layers.0.mlp.down_proj.MatMul.weight", down)]
    return _model(nodes, [vin("input_ids", ["batch", "seq"], TensorProto.INT64)],
                  [vin("logits", ["batch", "seq", vocab])], inits, opset=opset)
