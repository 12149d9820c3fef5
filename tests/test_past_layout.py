"""Regression: decoders whose KV-cache inputs are ``past.N.key`` / ``past.N.value`` (older
exports) go through eval, calibration and the sequential update; a folder holding only
decoder_model_merged.onnx goes through eval; the update accepts in-memory models.

The tiny LM of test_evaluate (logits = tanh(cummean(E[ids]) W1) W2, a one-layer KV cache)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_evaluate import _text, _weights, write_lm

from lrc.calibration.sequential import sequential_factors, sequential_update
from lrc.calibration.stats import collect_stats
from lrc.calibration.tokens import token_batches
from lrc.errors import LrcError
from lrc.graph.model import load
from lrc.graph.policy import Policy, make_setting
from lrc.measure import quality as E
from lrc.runtime.feeds import past_names
from lrc.runtime.session import open_session


@pytest.fixture(scope="module")
def past_lm(tmp_path_factory):
    w = _weights()
    folder = write_lm(tmp_path_factory.mktemp("past") / "dense", w, past="past")
    return w, folder


def _windows(folder, n_tokens=256):
    texts = [_text(400, s) for s in range(3)]
    return texts, token_batches(folder / "tokenizer.json", texts, n_tokens=n_tokens, seq_len=32)


def test_model_declares_past_dot_n_inputs(past_lm):
    _, folder = past_lm
    assert past_names(open_session(folder)) == ["past.0.key", "past.0.value"]


def test_eval_compare_lm(past_lm, tmp_path):
    w, folder = past_lm
    res = E.compare_lm(folder, folder, _text(), context=32, max_tokens=300)
    assert res["kl"] == pytest.approx(0.0, abs=1e-6) and res["top1_agreement"] == 1.0
    # the same perplexity as the optimum-named model (the cache is empty either way)
    other = write_lm(tmp_path / "optimum", w)
    ref = E.compare_lm(other, folder, _text(), context=32, max_tokens=300)
    assert ref["new"]["perplexity"] == pytest.approx(ref["orig"]["perplexity"], rel=1e-6)


def test_calibration_on_token_batches(past_lm):
    _, folder = past_lm
    _, wins = _windows(folder)
    stats = collect_stats(folder / "model.onnx", ["a", "t"], wins)
    assert stats["a"].n == stats["t"].n == 256
    # the same numbers from explicit feeds with an empty past.0.* cache
    feeds = [{"input_ids": x, "attention_mask": np.ones_like(x),
              "position_ids": np.arange(x.shape[1])[None, :],
              "past.0.key": np.zeros((1, 2, 0, 4), np.float32),
              "past.0.value": np.zeros((1, 2, 0, 4), np.float32)} for x in wins]
    ref = collect_stats(folder / "model.onnx", ["a", "t"], feeds)
    np.testing.assert_array_equal(stats["t"].xtx, ref["t"].xtx)


def test_sequential_update_full_rank_reproduces_logits(past_lm):
    """All three projections (two stages: the past.0.* inputs are carried across the cut)."""
    _, folder = past_lm
    texts, wins = _windows(folder)
    model = load(folder)
    _, st = sequential_factors(model, Policy(default=make_setting(rank=3)), wins)
    assert st.stages == 2 and st.tokens == 256
    full = Policy(default=make_setting(rank="full"), allow_larger=True)
    upd, rep = sequential_update(folder, full, calib_texts=texts, n_tokens=256, seq_len=32)
    assert len(rep["rewritten"]) == 3

    def logits(proto):
        sess = open_session(proto)
        x = wins[0]
        return sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x),
                                     "position_ids": np.arange(x.shape[1])[None, :],
                                     "past.0.key": np.zeros((1, 2, 0, 4), np.float32),
                                     "past.0.value": np.zeros((1, 2, 0, 4), np.float32)})[0]

    np.testing.assert_allclose(logits(ir.serde.serialize_model(upd)),
                               logits(onnx.load(folder / "model.onnx")), rtol=1e-4, atol=1e-5)


def test_sequential_update_in_memory(past_lm):
    """A ModelProto (no file: the tokenizer is given) gives the factors the file gives."""
    _, folder = past_lm
    texts, _ = _windows(folder)
    pol = Policy(default=make_setting(rank=3))
    kw = dict(calib_texts=texts, n_tokens=256, seq_len=32)
    a, rep_a = sequential_update(folder, pol, **kw)
    b, rep_b = sequential_update(onnx.load(folder / "model.onnx"), pol,
                                 tokenizer=folder / "tokenizer.json", **kw)
    assert rep_a["calibration"]["per_target"] == rep_b["calibration"]["per_target"]
    wa = {v.name: v.const_value.numpy() for v in a.graph.initializers.values()}
    wb = {v.name: v.const_value.numpy() for v in b.graph.initializers.values()}
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    with pytest.raises(LrcError, match="tokenizer"):
        sequential_update(onnx.load(folder / "model.onnx"), pol, **kw)


def test_merged_decoder_folder_through_eval(tmp_path):
    w = _weights()
    merged = write_lm(tmp_path / "merged", w, past="past", name="decoder_model_merged.onnx")
    assert sorted(p.name for p in merged.glob("*.onnx")) == ["decoder_model_merged.onnx"]
    m = E.load_model(merged)
    assert m.path.name == "decoder_model_merged.onnx" and m.is_lm and m.tokenizer is not None
    res = E.evaluate(merged, merged, text=_text(), context=32, max_tokens=200)
    assert res["kind"] == "causal-lm" and res["in_domain"]["kl"] == pytest.approx(0.0, abs=1e-6)
    plain = write_lm(tmp_path / "plain", w)
    ppl = E.perplexity(plain, _text(), context=32, max_tokens=200)["perplexity"]
    assert res["in_domain"]["orig"]["perplexity"] == pytest.approx(ppl, rel=1e-6)
