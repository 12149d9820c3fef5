"""Tests for lrc.feeds on hand-built tiny ONNX models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrc.runtime import feeds as F
from lrc.errors import LrcError
from lrc.runtime.session import open_session


def _decoder(path, heads=2, head_dim=4, vocab=37, mask="past_sequence_length + sequence_length"):
    """input_ids -> Gather(E) -> logits; KV cache inputs concatenated into present outputs."""
    E = np.random.default_rng(0).normal(size=(vocab, 5)).astype(np.float32)
    W = np.random.default_rng(1).normal(size=(5, vocab)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["logits"])]
    past_shape = ["batch_size", heads, "past_sequence_length", head_dim]
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                         ["batch_size", mask]),
           helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    for layer in range(2):
        for kv in ("key", "value"):
            name = f"past_key_values.{layer}.{kv}"
            ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, past_shape))
            nodes.append(helper.make_node("Identity", [name], [f"present.{layer}.{kv}"]))
            outs.append(helper.make_tensor_value_info(f"present.{layer}.{kv}", TensorProto.FLOAT, None))
    nodes.append(helper.make_node("Identity", ["attention_mask"], ["mask_out"]))
    nodes.append(helper.make_node("Identity", ["position_ids"], ["pos_out"]))
    outs += [helper.make_tensor_value_info("mask_out", TensorProto.INT64, None),
             helper.make_tensor_value_info("pos_out", TensorProto.INT64, None)]
    g = helper.make_graph(nodes, "dec", ins, outs, [numpy_helper.from_array(E, "E"),
                                                    numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _encoder(path):
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["f", "ax"], ["last_hidden_state"])]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "enc", ins, outs, [numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_session_specs_and_kind(tmp_path):
    s = open_session(_decoder(tmp_path / "d.onnx"), threads=1)
    specs = {x.name: x for x in F.input_specs(s)}
    assert specs["input_ids"].dtype == np.int64
    assert specs["past_key_values.0.key"].shape == ["batch_size", 2, "past_sequence_length", 4]
    assert F.is_causal_lm(s) and F.has_past(s)
    e = open_session(_encoder(tmp_path / "e.onnx"))
    assert not F.is_causal_lm(e) and not F.has_past(e)
    folder = tmp_path / "folder"
    folder.mkdir()
    _encoder(folder / "model.onnx")
    assert open_session(folder).lrc_path.endswith("model.onnx")
    with pytest.raises(LrcError):
        open_session(tmp_path / "nothing")


def test_text_feeds_decoder_empty_past(tmp_path):
    s = open_session(_decoder(tmp_path / "d.onnx"))
    ids = np.array([[3, 4, 5], [6, 7, 8]])
    f = F.text_feeds(s, ids)
    assert f["past_key_values.1.value"].shape == (2, 2, 0, 4)
    assert (f["attention_mask"] == 1).all() and f["attention_mask"].shape == (2, 3)
    assert f["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    out = s.run(None, f)
    assert out[0].shape == (2, 3, 37)
    # with a cache of 4 and a left-padded mask
    past = {f"past_key_values.{i}.{kv}": np.zeros((2, 2, 4, 4), np.float32)
            for i in range(2) for kv in ("key", "value")}
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0
    f2 = F.text_feeds(s, ids, attention_mask=mask, past=past)
    assert f2["position_ids"].tolist() == [[4, 5, 6], [2, 3, 4]]
    s.run(None, f2)


def test_text_feeds_symbolic_cache_dims_use_config(tmp_path):
    path = _decoder(tmp_path / "model.onnx", heads="num_kv_heads", head_dim="head_dim")
    s = open_session(path)
    with pytest.raises(LrcError, match="KV cache"):
        F.text_feeds(s, np.array([[1, 2]]))
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}))
    s = open_session(path)  # the model's reference (and its config) is read when it is opened
    f = F.text_feeds(s, np.array([[1, 2]]))
    assert f["past_key_values.0.key"].shape == (1, 3, 0, 8)
    f = F.text_feeds(s, np.array([[1, 2]]), config={"num_key_value_heads": 1, "head_dim": 2})
    assert f["past_key_values.0.key"].shape == (1, 1, 0, 2)


def test_text_feeds_encoder(tmp_path):
    s = open_session(_encoder(tmp_path / "e.onnx"))
    f = F.text_feeds(s, np.array([5, 6, 7]))
    assert set(f) == {"input_ids", "attention_mask", "token_type_ids"}
    assert f["input_ids"].shape == (1, 3) and (f["token_type_ids"] == 0).all()


def test_random_feeds_decoder(tmp_path):
    s = open_session(_decoder(tmp_path / "d.onnx", vocab=37))
    f = F.random_feeds(s, seed=1)
    assert f["input_ids"].shape == (1, 8)
    assert f["input_ids"].max() < 37  # vocab from the embedding Gather
    assert f["attention_mask"].shape == (1, 12) and (f["attention_mask"] == 1).all()
    assert f["position_ids"].tolist() == [list(range(4, 12))]
    assert f["past_key_values.0.key"].shape == (1, 2, 4, 4)
    s.run(None, f)
    f = F.random_feeds(s, dims={"batch_size": 3, "sequence_length": 5, "past_sequence_length": 0})
    assert f["attention_mask"].shape == (3, 5) and f["past_key_values.1.key"].shape == (3, 2, 0, 4)
    s.run(None, f)
    assert F.random_feeds(s, vocab_size=3)["input_ids"].max() < 3
    a, b = F.random_feeds(s, seed=2), F.random_feeds(s, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_random_feeds_builder_layout(tmp_path):
    """ONNX Runtime GenAI's model builder's names: the cache's head size is a symbol
    (``kv_cache_dim``, from the configuration) and the mask's length ``total_sequence_length``
    is past + sequence (GroupQueryAttention reads the past length from it)."""
    path = _decoder(tmp_path / "model.onnx", head_dim="kv_cache_dim", mask="total_sequence_length")
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 24}))
    s = open_session(path)
    f = F.random_feeds(s)
    assert f["past_key_values.0.key"].shape == (1, 2, 4, 6)
    assert f["attention_mask"].shape == (1, 4 + 8)
    f = F.random_feeds(s, dims={"past_sequence_length": 2, "sequence_length": 3})
    assert f["attention_mask"].shape == (1, 5) and f["past_key_values.1.value"].shape == (1, 2, 2, 6)
    assert F.random_feeds(s, dims={"total_sequence_length": 9})["attention_mask"].shape == (1, 9)


def test_random_feeds_unnamed_dims(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, "s0", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "r.onnx"))
    s = open_session(tmp_path / "r.onnx")
    f = F.random_feeds(s)
    assert f["x"].shape == (1, 8, 3) and f["x"].dtype == np.float32


def test_dim_expressions():
    x = helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", "2*sequence_length - 1", "past_sequence_length + 1"])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = open_session(m)
    f = F.random_feeds(s, dims={"sequence_length": 8, "past_sequence_length": 4})
    assert f["x"].shape == (1, 15, 5)
    assert F.resolve_dims([F.InputSpec("past_key_values.0.key", np.dtype("float32"),
                                       ["b", 2, "p", 4])]) == {"b": 1, "p": 4}


def test_random_token_feeds(tmp_path):
    s = open_session(_decoder(tmp_path / "d.onnx", vocab=37))
    assert F.vocab_size(s) == 37  # the embedding Gather
    assert F.vocab_size(s, {"vocab_size": 11}) == 11
    rng = np.random.default_rng(0)
    f = F.random_token_feeds(s, 2, 5, rng=rng)
    assert f["input_ids"].shape == (2, 5) and 1 <= f["input_ids"].min() and f["input_ids"].max() < 37
    assert f["past_key_values.1.value"].shape == (2, 2, 0, 4)
    assert f["position_ids"].tolist() == [list(range(5))] * 2
    s.run(None, f)
    f = F.random_token_feeds(s, 1, 3, past_len=6, rng=rng, vocab=4)
    assert f["past_key_values.0.key"].shape == (1, 2, 6, 4) and f["input_ids"].max() < 4
    assert f["attention_mask"].shape == (1, 9) and f["position_ids"].tolist() == [[6, 7, 8]]
    step = F.random_token_feeds(s, 1, 1, past_len=6, rng=rng, with_past=False)
    assert not any(F.is_past(k) for k in step)
    assert step["attention_mask"].shape == (1, 7) and step["position_ids"].tolist() == [[6]]
    a = F.random_token_feeds(s, 1, 4, rng=np.random.default_rng(3))
    b = F.random_token_feeds(s, 1, 4, rng=np.random.default_rng(3))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_text_feeds_other_inputs(tmp_path):
    """Inputs text_feeds does not know raise, unless fill_other fills them (bench's rules)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    extra = helper.make_tensor_value_info("noise", TensorProto.FLOAT,
                                          ["batch_size", "past_sequence_length + 1", 3])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [1])
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n in ("input_ids", "noise", "flag")]
    outs = [helper.make_tensor_value_info(n + "_out", t, None)
            for n, t in (("input_ids", TensorProto.INT64), ("noise", TensorProto.FLOAT),
                         ("flag", TensorProto.BOOL))]
    g = helper.make_graph(nodes, "g", [ids, extra, flag], outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = open_session(m)
    with pytest.raises(LrcError, match="noise"):
        F.text_feeds(s, np.array([[1, 2]]))
    f = F.random_token_feeds(s, 2, 3, past_len=4, rng=np.random.default_rng(0))
    assert f["noise"].shape == (2, 7, 3) and f["noise"].dtype == np.float32
    assert f["flag"].tolist() == [True]
    s.run(None, f)
