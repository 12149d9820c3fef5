"""Role and block detection from module paths of each family, and from structure."""

import pytest

import lrc
from graphs import matmul_chain, tied_head
import onnx_ir as ir

from lrc.graph.locate import classify, node_path

CASES = [
    # GPT-2 (Conv1D, fused c_attn)
    ("transformer.h.3.attn.c_attn", "attn.qkv", 3),
    ("transformer.h.3.attn.c_proj", "attn.o", 3),
    ("transformer.h.3.mlp.c_fc", "ffn.up", 3),
    ("transformer.h.3.mlp.c_proj", "ffn.down", 3),
    # LLaMA / Mistral / Qwen / SmolLM / Gemma
    ("model.layers.12.self_attn.q_proj", "attn.q", 12),
    ("model.layers.12.self_attn.k_proj", "attn.k", 12),
    ("model.layers.12.self_attn.v_proj", "attn.v", 12),
    ("model.layers.12.self_attn.o_proj", "attn.o", 12),
    ("model.layers.12.mlp.gate_proj", "ffn.gate", 12),
    ("model.layers.12.mlp.up_proj", "ffn.up", 12),
    ("model.layers.12.mlp.down_proj", "ffn.down", 12),
    ("lm_head", "head", None),
    # BERT / RoBERTa / MiniLM: attention.output.dense before a bare output.dense
    ("encoder.layer.5.attention.self.query", "attn.q", 5),
    ("encoder.layer.5.attention.self.key", "attn.k", 5),
    ("encoder.layer.5.attention.self.value", "attn.v", 5),
    ("encoder.layer.5.attention.output.dense", "attn.o", 5),
    ("encoder.layer.5.intermediate.dense", "ffn.up", 5),
    ("encoder.layer.5.output.dense", "ffn.down", 5),
    ("pooler.dense", "other", None),
    # T5
    ("encoder.block.2.layer.0.SelfAttention.q", "attn.q", 2),
    ("decoder.block.1.layer.1.EncDecAttention.o", "attn.o", 1),
    ("encoder.block.2.layer.1.DenseReluDense.wi", "ffn.up", 2),
    ("encoder.block.2.layer.1.DenseReluDense.wi_0", "ffn.gate", 2),
    ("encoder.block.2.layer.1.DenseReluDense.wo", "ffn.down", 2),
    # GPT-NeoX / Falcon
    ("gpt_neox.layers.0.attention.query_key_value", "attn.qkv", 0),
    ("gpt_neox.layers.0.attention.dense", "attn.o", 0),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h", "ffn.up", 0),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h", "ffn.down", 0),
    ("embed_out", "head", None),
]


@pytest.mark.parametrize("path,role,block", CASES)
def test_classify(path, role, block):
    assert classify(path) == (role, block)


def test_name_sources():
    def path(name, scopes=None):
        meta = {"pkg.torch.onnx.name_scopes": scopes} if scopes else {}
        return node_path(ir.Node("", "MatMul", [], name=name, metadata_props=meta), None)[0]

    assert path("/model/layers.0/self_attn/q_proj/MatMul") == "model.layers.0.self_attn.q_proj"
    assert path("node_linear_12") == ""
    # the dynamo exporter's metadata
    assert path("node_linear_6", "['', 'model', 'model.layers.0', 'model.layers.0.mlp', "
                "'model.layers.0.mlp.down_proj', 'linear_6']") == "model.layers.0.mlp.down_proj"
    assert path("node_linear_210", "['', 'lm_head', 'linear_210']") == "lm_head"


def test_dynamo_style_metadata_roles():
    m = matmul_chain(names=False)
    scopes = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj",
              "model.layers.0.mlp.down_proj"]
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    for i, (n, s) in enumerate(zip(mm, scopes)):
        n.name = f"node_linear_{i}"
        e = n.metadata_props.add()
        e.key, e.value = "pkg.torch.onnx.name_scopes", str(["", s, f"linear_{i}"])
    res = lrc.analyse(m)
    assert [r["role"] for r in res["nodes"]] == ["attn.o", "ffn.up", "ffn.down"]


def test_stripped_names_still_compressible():
    m = matmul_chain(names=False)
    res = lrc.analyse(m)
    assert len(res["nodes"]) == 3 and all(r["eligible"] for r in res["nodes"])
    assert {r["role_source"] for r in res["nodes"]} <= {"structure", "none"}
    _, rep = lrc.compress(m, rank="full")
    assert rep["totals"]["rewritten"] == 3


def test_tied_head_found_by_structure_without_names():
    m = tied_head()
    for n in m.graph.node:
        n.name = ""
    m.graph.initializer[0].name = "val_0"
    for n in m.graph.node:
        n.input[:] = ["val_0" if i == "embed.weight" else i for i in n.input]
    res = lrc.analyse(m)
    assert res["nodes"][0]["role"] == "head"
