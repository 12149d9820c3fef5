"""Regression tests of the runtime layer as bench and generate use it: other KV-cache names
(``past.0.key``), folders holding only ``decoder_model_merged.onnx``, present->past pairing, and
one-line errors of the EP table and the session factory. Tiny graphs built with onnx.helper."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_bench import make_decoder

from lrc.errors import LrcError
from lrc.generate import OnnxCausalLM, generate
from lrc.measure.bench import bench
from lrc.runtime import feeds as F
from lrc.runtime import providers as P
from lrc.runtime.runner import Runner
from lrc.runtime.session import open_session

VOCAB = 50


def _tokenizer(folder):
    """A WordLevel tokenizer.json: <unk>=0, <s>=1 (prepended), </s>=2, words w3..w49."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))


def _folder(tmp_path, name, file="model.onnx", past="past_key_values.0", present="present.0"):
    d = tmp_path / name
    d.mkdir()
    make_decoder(d / file, vocab=VOCAB, past=past, present=present)
    _tokenizer(d)
    (d / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "eos_token_id": 2}))
    return d


def _greedy_without_cache(path, prompt_ids, n):
    """Reference: the whole sequence with an empty cache at every step (plain ORT)."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cache = [i.name for i in s.get_inputs() if i.name.startswith("past")]
    ids = list(prompt_ids)
    new = []
    for _ in range(n):
        t = len(ids)
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, t), np.int64),
                "position_ids": np.arange(t, dtype=np.int64)[None]}
        feed.update({c: np.zeros((1, 2, 0, 16), np.float32) for c in cache})
        nxt = int(np.argmax(s.run(["logits"], feed)[0][0, -1]))
        new.append(nxt)
        ids.append(nxt)
        if nxt == 2:
            break
    return new


def test_past_dot_names_bench_and_generate(tmp_path):
    optimum = _folder(tmp_path, "optimum")
    dotted = _folder(tmp_path, "dotted", past="past.0", present="present.0")
    s = open_session(dotted)
    assert F.past_names(s) == ["past.0.key", "past.0.value"]
    assert F.present_to_past(s) == {"present.0.key": "past.0.key", "present.0.value": "past.0.value"}

    res = bench([dotted], threads=1, seq_lens=(8,), decode_tokens=3, warmup=1, runs=3, memory=False)
    assert res["models"][0]["kind"] == "decoder" and res["models"][0]["name"] == "dotted"
    assert {r["phase"] for r in res["runs"]} == {"prefill", "decode"}
    assert set(res["amdahl"]["matmul_fraction"]) == {"prefill", "decode"}

    lm = OnnxCausalLM(dotted)
    assert lm.past_names == ["past.0.key", "past.0.value"]
    prompt = "w5 w9 w17 w33"
    out = lm.generate(prompt, max_new_tokens=10)
    ref = OnnxCausalLM(optimum).generate(prompt, max_new_tokens=10)
    assert out.new_token_ids == ref.new_token_ids
    assert out.new_token_ids == _greedy_without_cache(dotted / "model.onnx", lm.encode(prompt), 10)


def test_merged_decoder_folder(tmp_path):
    d = _folder(tmp_path, "merged", file="decoder_model_merged.onnx")
    assert not (d / "model.onnx").exists()
    res = bench([d], threads=1, seq_lens=(8,), decode_tokens=2, warmup=1, runs=3, memory=False,
                amdahl=False)
    assert res["models"][0]["path"].endswith("decoder_model_merged.onnx")
    assert res["models"][0]["name"] == "merged" and res["models"][0]["kind"] == "decoder"
    assert {r["phase"] for r in res["runs"]} == {"prefill", "decode"}
    a = generate(d, "w5 w6 w7", max_new_tokens=6)
    b = OnnxCausalLM(d / "decoder_model_merged.onnx").generate("w5 w6 w7", max_new_tokens=6)
    assert a.new_token_ids == b.new_token_ids and a.new_tokens >= 1


def test_generate_folder_errors(tmp_path):
    d = _folder(tmp_path, "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(LrcError, match="tokenizer.json"):
        OnnxCausalLM(d)
    seq2seq = tmp_path / "s2s"
    seq2seq.mkdir()
    for f in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        shutil.copy(d / "model.onnx", seq2seq / f)
    with pytest.raises(LrcError, match="encoder-decoder"):
        OnnxCausalLM(seq2seq)


def _identity_model(path, inputs, outputs):
    """Each output an Identity of the input at the same position (KV-cache shaped floats)."""
    shape = ["batch", 2, "past", 4]
    nodes = [helper.make_node("Identity", [i], [o]) for i, o in zip(inputs, outputs)]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info(i, TensorProto.FLOAT, shape) for i in inputs],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return open_session(path)


@pytest.mark.parametrize("inputs,outputs", [
    (["past_key_values.0.key", "past_key_values.0.value"], ["present.0.key", "present.0.value"]),
    (["past.0.key", "past.0.value"], ["present.0.key", "present.0.value"]),
    (["past_key.0", "past_value.0"], ["present_key.0", "present_value.0"]),
    (["past_key_values_0_key", "past_key_values_0_value"], ["present_0_key", "present_0_value"]),
])
def test_present_to_past_pairs_by_name(tmp_path, inputs, outputs):
    s = _identity_model(tmp_path / "m.onnx", inputs, outputs)
    assert F.has_past(s) and F.past_names(s) == inputs
    assert F.present_to_past(s) == dict(zip(outputs, inputs))


def test_present_to_past_by_position_and_unpairable(tmp_path):
    s = _identity_model(tmp_path / "a.onnx", ["past.0.key", "past.0.value"], ["present_k0", "present_v0"])
    assert F.present_to_past(s) == {"present_k0": "past.0.key", "present_v0": "past.0.value"}
    s = _identity_model(tmp_path / "b.onnx", ["past.0.key", "past.0.value"], ["present.0.key", "kv_out"])
    with pytest.raises(LrcError, match="cannot pair"):
        F.present_to_past(s)
    with pytest.raises(LrcError, match="cannot pair"):
        Runner(s)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg.strip(), msg
    return msg


def test_provider_errors_are_one_line():
    with pytest.raises(LrcError) as ei:
        P.lookup("no-such-ep")
    assert "unknown execution provider" in _one_line(ei) and "cuda" in str(ei.value)
    with pytest.raises(LrcError):
        P.resolve("no-such-ep")
    avail = set(ort.get_available_providers())
    missing = next((p for p in P.PROVIDERS if p.install and p.name not in avail), None)
    if missing is None:  # pragma: no cover
        pytest.skip("every EP with an install hint is available here")
    with pytest.raises(LrcError) as ei:
        P.resolve(missing.alias)
    msg = _one_line(ei)
    assert "not available" in msg and missing.install.strip() in msg
    with pytest.raises(LrcError) as ei:
        P.resolve_ep(missing.name)
    assert missing.install.strip() in _one_line(ei)
    assert P.device_of("CUDAExecutionProvider") == "cuda" and P.device_of("whatever") == "cpu"


def test_open_session_errors_are_one_line(tmp_path):
    with pytest.raises(LrcError) as ei:
        open_session(tmp_path / "missing.onnx")
    assert "missing.onnx" in _one_line(ei)
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"this is not a protobuf\n" * 20)
    with pytest.raises(LrcError) as ei:
        open_session(bad)
    assert "garbage.onnx" in _one_line(ei)
    with pytest.raises(LrcError) as ei:
        open_session(b"\x00garbage bytes")
    _one_line(ei)
