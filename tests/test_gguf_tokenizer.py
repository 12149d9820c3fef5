"""lrc's GGUF tokenizers: SentencePiece-style vocabularies converted by lrc (BPE by piece score,
as llama.cpp's SPM tokenizer merges), checked against pure-Python references of the GGUF's own
vocabulary; transformers 4.57's Unigram conversion shown to disagree (issue #14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from ggufs import finish  # noqa: E402
from lrc import data  # noqa: E402
from lrc.errors import LrcError  # noqa: E402
from lrc.exporters import gguf_tokenizer as gt  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
USER = ["\n\n"]  # a user-defined token, matched whole in the raw text (Gemma has such tokens)
TRAIN_EXTRA = "Hello world. " * 50 + "say Hello world " * 50


def _corpus() -> str:
    return data.load_text("code")[:40000] + data.load_text("docs")[:40000] + TRAIN_EXTRA


@pytest.fixture(scope="module")
def spm_pieces():
    """A SentencePiece-BPE-like vocabulary: control tokens, <0xNN> bytes, a user-defined token,
    then pieces learned by a BPE (spaces as ▁, words starting with ▁) scored -rank."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.train_from_iterator([_corpus()], trainers.BpeTrainer(vocab_size=1500, show_progress=False,
                                                              limit_alphabet=150))
    learned = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t not in USER]
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + USER + learned
    types = [3, 3, 3, 2, 3] + [6] * 256 + [4] * len(USER) + [1] * len(learned)
    scores = [0.0] * (len(SPECIALS) + 256 + len(USER)) + [-float(i) for i in range(len(learned))]
    return tokens, scores, types


def write_spm_gguf(path: Path, pieces, space_prefix: bool) -> Path:
    tokens, scores, types = pieces
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(space_prefix)
    w.add_add_bos_token(True)
    finish(w)
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["no-prefix", "space-prefix"])
def spm_gguf(request, spm_pieces, tmp_path_factory):
    return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", spm_pieces, request.param)


TRICKY = ("say Hello world\n\nand <start_of_turn>user  two  spaces\tand\ttabs 東京 🙂 naïve\n\n\n"
          "x = f(a, b)  # comment\n")


def test_read_vocab(spm_gguf):
    v = gt.read_vocab(spm_gguf)
    assert v.is_spm and v.model == "llama" and v.bos_id == 2 and v.unk_id == 3 and v.add_bos
    assert v.tokens[:5] == SPECIALS and v.types[3] == 2 and v.scores[-1] < 0
    assert set(v.whole_tokens()) == {"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n\n"}


def test_lrc_tokenizer_equals_the_spm_reference(spm_gguf):
    v = gt.read_vocab(spm_gguf)
    tok = gt.spm_tokenizer(v)
    text = gt.sample_text() + TRICKY
    res = gt.check_tokenizer(tok, v, text)
    assert res == {"checked": True, "chars": len(text), "tokens": res["tokens"], "roundtrip": True,
                   "note": ""}
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == gt.SpmReference(v).encode(text)
    ref_ids = gt.SpmReference(v).ids  # text -> id (the last of duplicates, as llama.cpp)
    assert ref_ids["\n\n"] in ids and ref_ids["<start_of_turn>"] in ids
    assert v.tokens.index("<0xF0>") in ids  # 🙂 is no piece: byte fallback
    back = tok.decode(ids, skip_special_tokens=False)
    if v.add_space_prefix:  # a "▁" goes before the text after every whole-matched token too
        assert back == gt.expected_decode(text, v) != text
        assert gt.expected_decode("a\n\nb<bos>c", v) == "a\n\n b<bos> c"
    else:
        assert back == text


def test_whole_words_are_not_fragmented(spm_gguf):
    v = gt.read_vocab(spm_gguf)
    tok = gt.spm_tokenizer(v)
    enc = tok.encode("say Hello world")
    assert "▁Hello" in v.tokens and "▁world" in v.tokens
    assert enc.tokens[0] == "<bos>"  # add_bos_token
    assert enc.tokens[-2:] == ["▁Hello", "▁world"]
    if v.add_space_prefix:
        assert enc.tokens == ["<bos>", "▁say", "▁Hello", "▁world"]


def test_transformers_unigram_conversion_disagrees(spm_gguf):
    """The bug of issue #14, reproduced on the synthetic vocabulary: transformers 4.57 reads a
    SentencePiece-BPE GGUF as Unigram and fragments words."""
    pytest.importorskip("transformers")
    from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    v = gt.read_vocab(spm_gguf)
    theirs, _ = convert_gguf_tokenizer("gemma3_text", load_gguf_checkpoint(str(spm_gguf))["tokenizer"])
    assert json.loads(theirs.to_str())["model"]["type"] == "Unigram"
    text = gt.sample_text()
    ours = gt.spm_tokenizer(v).encode(text, add_special_tokens=False).tokens
    fragmented = theirs.encode(text, add_special_tokens=False).tokens
    assert len(fragmented) > 1.05 * len(ours)  # whole pieces of the vocabulary left unused
    with pytest.raises(LrcError, match="tokenizer check failed") as e:
        gt.check_tokenizer(theirs, v)
    assert "\n" not in str(e.value)


def test_a_broken_tokenizer_fails_the_check_in_one_line(spm_gguf, tmp_path):
    v = gt.read_vocab(spm_gguf)
    spec = json.loads(gt.spm_tokenizer(v).to_str())
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) != "▁world"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(LrcError, match=r"tokenizer check failed for spm\.gguf: token \d+ .*'▁world'") as e:
        gt.check_tokenizer(path, v, "say Hello world")
    assert "\n" not in str(e.value)


def test_a_decoder_that_loses_text_fails_the_check(spm_gguf):
    from tokenizers import decoders

    v = gt.read_vocab(spm_gguf)
    tok = gt.spm_tokenizer(v)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])  # keeps ▁
    with pytest.raises(LrcError, match=r"decode\(encode\(text\)\) differs"):
        gt.check_tokenizer(tok, v, "say Hello world")


def test_prepare_writes_lrc_tokenizer_for_spm_only(spm_gguf, tmp_path):
    v, how = gt.prepare(spm_gguf, tmp_path)
    assert how == "converted by lrc from the GGUF SentencePiece vocabulary"
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] == "BPE"
    assert gt.check_tokenizer(tmp_path / "tokenizer.json", v)["checked"]


# --------------------------------------------------------------------------- gpt2-type (byte-level BPE)
@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory):
    """A gpt2-type GGUF (tokens + merges) and the byte-level tokenizer it came from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_corpus()], trainers.BpeTrainer(
        vocab_size=800, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    path = tmp_path_factory.mktemp("bpe") / "bpe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3] + [1] * (len(vocab) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    finish(w)
    return path, tok


def test_gpt2_vocabulary_check(bpe_gguf):
    path, tok = bpe_gguf
    v = gt.read_vocab(path)
    assert not v.is_spm and v.model == "gpt2"
    res = gt.check_tokenizer(tok, v)
    assert res["checked"] and res["roundtrip"] and res["tokens"] > 500
    # the merges in another order: a different tokenizer, caught
    spec = json.loads(tok.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    with pytest.raises(LrcError, match="tokenizer check failed for bpe.gguf"):
        gt.check_tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), v)
    assert gt.prepare(path, path.parent)[1].startswith("transformers' conversion")


def test_unknown_vocabulary_model_is_reported_not_checked(spm_gguf):
    v = gt.read_vocab(spm_gguf)
    v.model = "t5"
    res = gt.check_tokenizer(gt.spm_tokenizer(gt.read_vocab(spm_gguf)), v)
    assert not res["checked"] and "no reference for tokenizer model 't5'" in res["note"]


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(LrcError, match="cannot read x.gguf as GGUF") as e:
        gt.read_vocab(bad)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- end to end: a tiny Gemma-3 GGUF
def write_gemma3_gguf(path: Path, pieces, seed: int = 0):
    """A tiny random Gemma-3 written as llama.cpp does (tensor names from gguf's TensorNameMap,
    norm weights stored +1, no output.weight: the head is tied); returns the torch model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens, scores, types = pieces
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, sliding_window=64)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "gemma3")
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(128)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(64)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = p.detach().numpy().astype("float32")
        if name.endswith("norm.weight"):
            a = a + 1  # llama.cpp stores Gemma's norm weights +1
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), a)
    finish(w)
    return model


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_gemma3_gguf_export_end_to_end(spm_pieces, tmp_path, monkeypatch):
    """``lrc export`` of a Gemma-3 GGUF: lrc's tokenizer.json (checked), logits equal to the
    torch model's, the tied embedding stored once (optimum writes the head as a second copy,
    Eᵀ) with outputs bit-identical to the export that keeps both, and the head still a head."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from fixtures_export import ort_feed, rel_err, torch
    from transformers import AutoTokenizer

    import lrc.exporters.hf as hf
    from lrc.exporters import export
    from lrc.graph import model as M
    from lrc.graph.locate import locate

    src = tmp_path / "tiny-gemma3.gguf"
    model = write_gemma3_gguf(src, spm_pieces)
    res = export(src, tmp_path / "onnx", exporter="optimum")
    assert res.tokenizer.startswith("converted by lrc from the GGUF SentencePiece vocabulary, checked on ")
    rec = json.loads((res.out_dir / "lrc.json").read_text())["export"]
    assert rec["tokenizer"] == res.tokenizer and rec["tied"] == res.tied
    [shared] = res.tied["model.onnx"]["shared"]
    assert shared["table"] == "model.embed_tokens.weight" and shared["shape"] == [64, len(spm_pieces[0])]

    proto = onnx.load(str(res.model_path), load_external_data=False)
    v = len(spm_pieces[0])
    assert [list(t.dims) for t in proto.graph.initializer if v in t.dims] == [[v, 64]]  # once
    heads = [t for t in locate(M.load(res.model_path)) if t.role == "head"]
    assert len(heads) == 1 and heads[0].tied

    ids = np.array([[2, 400, 500, 600, 700, 800, 900]], np.int64)
    sess = ort.InferenceSession(str(res.model_path))
    got = sess.run(["logits"], ort_feed(sess, ids))[0]
    with torch.no_grad():
        assert rel_err(got, model(input_ids=torch.from_numpy(ids)).logits.numpy()) < 1e-4

    monkeypatch.setattr(hf, "_share_tied_embeddings", lambda files: {})  # the export as it was
    both = export(src, tmp_path / "both", exporter="optimum")
    assert both.model_path.stat().st_size - res.model_path.stat().st_size > 0.99 * v * 64 * 4
    sess2 = ort.InferenceSession(str(both.model_path))
    np.testing.assert_array_equal(sess2.run(["logits"], ort_feed(sess2, ids))[0], got)

    tok = AutoTokenizer.from_pretrained(res.out_dir)  # transformers reads lrc's tokenizer.json
    assert tok.convert_ids_to_tokens(tok("say Hello world")["input_ids"])[-2:] == ["▁Hello", "▁world"]
    assert tok("say Hello world")["input_ids"][0] == 2  # BOS
