"""ONNX Runtime GenAI folders: the genai_config.json lrc.graph.genai writes (fields on tiny graphs,
folders it refuses and why, the folder writer), and onnxruntime_genai's greedy tokens on
lrc-compressed SmolLM2 folders against lrc generate's on the same files."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from lrc.graph import folder, genai

BATCH_SEQ = ["batch_size", "sequence_length"]


def tiny_decoder(path, layers=2, kv_heads=2, head=8, vocab=32, extra_inputs=(), cache=True,
                 past="past_key_values.{}.{}", present="present.{}.{}", output="logits"):
    """A graph with an optimum decoder's inputs and outputs (read, never run)."""
    ints = ["input_ids", "attention_mask", "position_ids", *extra_inputs]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, BATCH_SEQ) for n in ints]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, BATCH_SEQ + [vocab])]
    nodes = [helper.make_node("Cast", ["input_ids"], [output], to=TensorProto.FLOAT)]
    for i in range(layers if cache else 0):
        for kind in ("key", "value"):
            src, dst = past.format(i, kind), present.format(i, kind)
            inputs.append(helper.make_tensor_value_info(
                src, TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", head]))
            outputs.append(helper.make_tensor_value_info(
                dst, TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", head]))
            nodes.append(helper.make_node("Identity", [src], [dst]))
    graph = helper.make_graph(nodes, "tiny", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


CONFIG = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4,
          "hidden_size": 32, "max_position_embeddings": 128, "vocab_size": 999,
          "bos_token_id": 1, "eos_token_id": 9}


def decoder_folder(d, config=CONFIG, generation=None, **graph):
    d.mkdir()
    tiny_decoder(d / "model.onnx", **graph)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def test_config_fields_come_from_the_graph_and_the_configs(tmp_path):
    d = decoder_folder(tmp_path / "dec", generation={"eos_token_id": [2, 5], "temperature": 0.7,
                                                     "do_sample": True})
    rep = genai.write_config(d)
    assert rep == {"file": "genai_config.json", "model": "model.onnx"}
    cfg = json.loads((d / "genai_config.json").read_text())
    m, dec = cfg["model"], cfg["model"]["decoder"]
    assert dec["filename"] == "model.onnx"
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "position_ids": "position_ids",
                             "past_key_names": "past_key_values.%d.key",
                             "past_value_names": "past_key_values.%d.value"}
    assert dec["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                              "present_value_names": "present.%d.value"}
    # the graph's KV heads (2) and vocabulary (32) win over config.json's 4 and 999
    assert (dec["num_key_value_heads"], dec["head_size"], m["vocab_size"]) == (2, 8, 32)
    assert (dec["num_attention_heads"], dec["hidden_size"], dec["num_hidden_layers"]) == (4, 32, 2)
    assert (m["context_length"], m["type"]) == (128, "decoder")
    # generation_config.json over config.json; pad falls back to the first eos
    assert (m["bos_token_id"], m["eos_token_id"], m["pad_token_id"]) == (1, [2, 5], 2)
    s = cfg["search"]
    assert s["past_present_share_buffer"] is False and s["max_length"] == 128
    assert (s["temperature"], s["do_sample"], s["num_beams"]) == (0.7, True, 1)


def test_other_cache_names_and_gpt2_config_keys(tmp_path):
    gpt2 = {"model_type": "gpt2", "n_head": 2, "n_embd": 16, "n_positions": 64, "eos_token_id": 3}
    d = decoder_folder(tmp_path / "dec", config=gpt2, layers=3, kv_heads="kv", head="h",
                       past="past.{}.{}", present="present_{}_{}")
    cfg = genai.describe(d)
    dec = cfg["model"]["decoder"]
    assert dec["inputs"]["past_key_names"] == "past.%d.key"
    assert dec["outputs"]["present_value_names"] == "present_%d_value"
    # symbolic cache dims: heads and head size from config.json (n_embd / n_head)
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (3, 2, 8)
    assert (cfg["model"]["pad_token_id"], "bos_token_id" in cfg["model"]) == (3, False)


@pytest.mark.parametrize("graph, config, reason", [
    (dict(output="last_hidden_state", cache=False, extra_inputs=("token_type_ids",)), CONFIG,
     "not a causal LM"),
    (dict(cache=False), CONFIG, "no KV-cache inputs"),
    (dict(extra_inputs=("use_cache_branch",)), CONFIG, "input use_cache_branch is none"),
    (dict(), None, "no config.json"),
    (dict(), {"num_attention_heads": 4, "hidden_size": 32}, "no context_length"),
])
def test_no_config_for_what_it_cannot_describe(tmp_path, graph, config, reason):
    d = decoder_folder(tmp_path / "m", config=config, **graph)
    (d / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "x.onnx"}}}))
    rep = genai.write_config(d)
    assert rep["file"] is None and reason in rep["reason"]
    assert not (d / "genai_config.json").exists()  # a stale copy naming another file is removed
    mine = {"model": {"decoder": {"filename": "model.onnx"}}}  # one naming this model is kept
    (d / "genai_config.json").write_text(json.dumps(mine))
    assert genai.write_config(d)["kept"]
    assert json.loads((d / "genai_config.json").read_text()) == mine


def test_encoder_decoder_export_gets_none(tmp_path):
    d = decoder_folder(tmp_path / "t5")
    (d / "model.onnx").rename(d / "decoder_model.onnx")
    tiny_decoder(d / "encoder_model.onnx")
    rep = genai.write_config(d)
    assert rep["file"] is None and "encoder-decoder" in rep["reason"]


def test_folder_writer_names_its_model_and_keeps_a_source_config(tmp_path):
    src = decoder_folder(tmp_path / "src")
    own = {"model": {"decoder": {"filename": "old.onnx", "inputs": {}, "outputs": {},
                                 "session_options": {"log_id": "mine"}}, "type": "llama"},
           "search": {"max_length": 64, "past_present_share_buffer": False}}
    (src / "genai_config.json").write_text(json.dumps(own))

    def copy(f, dst):
        dst.write_bytes(f.read_bytes())
        return {}

    reports = folder.transform_folder(src, tmp_path / "out", copy)
    assert reports["model.onnx"]["genai"]["model"] == "model.onnx"
    cfg = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == "model.onnx"
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["session_options"] == {"log_id": "mine"} and cfg["search"]["max_length"] == 64
    assert cfg["model"]["type"] == "llama"
    # an encoder folder: no config, and the report says why
    enc = decoder_folder(tmp_path / "enc", output="last_hidden_state", cache=False)
    reports = folder.transform_folder(enc, tmp_path / "enc-out", copy)
    assert "not a causal LM" in reports["model.onnx"]["genai"]["reason"]
    assert not (tmp_path / "enc-out" / "genai_config.json").exists()


GGUF_DECODER = {"type": "Sequence", "decoders": [
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}


def test_byte_level_decoder_decodes_every_id_alike():
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The capital of France is Paris.", "déjà vu 日本 \t\n x**2"] * 20,
                            vocab_size=400, show_progress=False)
    tok = json.loads(bpe._tokenizer.to_str())
    tok["decoder"] = GGUF_DECODER
    fixed = genai.byte_level_decoder(tok)
    assert fixed["decoder"] == GGUF_DECODER["decoders"][-1]
    a = tokenizers.Tokenizer.from_str(json.dumps(tok))
    b = tokenizers.Tokenizer.from_str(json.dumps(fixed))
    ids = [[i] for i in range(a.get_vocab_size())]
    ids += [list(range(i, i + 9)) for i in range(0, 390, 7)]
    assert a.decode_batch(ids) == b.decode_batch(ids)
    tok["model"]["vocab"]["▁x"] = 400  # a token the ▁ step would change: left alone
    assert genai.byte_level_decoder(tok) is None
    assert genai.byte_level_decoder({"decoder": GGUF_DECODER}) is None


# --------------------------------------------------------------- onnxruntime_genai on SmolLM2

try:  # the SmolLM2 export, once per module; without torch / optimum only these tests skip
    from fixtures_export import DECODERS, save_tiny, smollm2_dir  # noqa: E402,F401
except pytest.skip.Exception as e:
    _no_export = str(e)
    DECODERS, save_tiny = (), None

    @pytest.fixture
    def smollm2_dir():
        pytest.skip(_no_export)


PROMPT = "The capital of France is"
NEW = 12


def _og_greedy(model, ids: list[int]) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]


def _compress(src, out, *args):
    """``lrc compress`` in this process (its checks are compress's tests' business)."""
    from typer.testing import CliRunner

    from lrc.cli import app

    r = CliRunner().invoke(app, ["compress", str(src), *args, "--no-check", "-o", str(out)])
    assert r.exit_code == 0, r.output
    record = json.loads((out / "lrc.json").read_text())["genai"]
    assert record.get("model", "model.onnx") == "model.onnx", record
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
    return out


@pytest.mark.parametrize("family", DECODERS)
def test_genai_greedy_tokens_on_tiny_exports_of_each_family(family, tmp_path):
    """Each decoder family optimum exports: the config lrc export writes runs in
    onnxruntime_genai and gives lrc generate's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    import torch

    from lrc.exporters import export
    from lrc.generate import OnnxCausalLM

    model = save_tiny(family, tmp_path / "hf", seed=1, tokenizer=True)
    with torch.no_grad():  # blocks 8x stronger: random tiny models otherwise repeat one token
        for name, p in model.named_parameters():
            if p.dim() == 2 and not any(e in name for e in ("emb", "wte", "wpe")):
                p.mul_(8.0)
    model.save_pretrained(tmp_path / "hf")
    res = export(tmp_path / "hf", tmp_path / "onnx", validate=False, exporter="optimum")
    ids = [1, 5, 9, 17, 33]
    want = OnnxCausalLM(res.out_dir, threads=1).generate("", max_new_tokens=NEW, prompt_ids=ids)
    assert len(set(want.new_token_ids)) > 3, want.new_token_ids  # a sequence that can differ
    assert _og_greedy(og.Model(str(res.out_dir)), ids) == want.new_token_ids


@pytest.mark.slow
def test_genai_greedy_tokens_equal_lrc_generate_on_compressed_smollm2(smollm2_dir, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from lrc.generate import OnnxCausalLM

    lm = OnnxCausalLM(smollm2_dir, threads=2)
    ids = lm.encode(PROMPT)
    dense = lm.generate("", max_new_tokens=NEW, prompt_ids=ids).new_token_ids
    del lm
    assert _og_greedy(og.Model(str(smollm2_dir)), ids) == dense  # the export's own config
    full = _compress(smollm2_dir, tmp_path / "full", "--rank", "full",
                     "--include", "*layers.0/self_attn/o_proj*")
    assert len(json.loads((full / "lrc.json").read_text())["rewritten"]) == 1
    assert _og_greedy(og.Model(str(full)), ids) == dense  # an exact rewrite: dense's tokens
    q4 = _compress(smollm2_dir, tmp_path / "q4", "--quantize", "int4", "--correct-rank", "0")
    lrc_q4 = OnnxCausalLM(q4, threads=2).generate("", max_new_tokens=NEW, prompt_ids=ids)
    lrc_q4 = lrc_q4.new_token_ids
    model = og.Model(str(q4))
    assert _og_greedy(model, ids) == lrc_q4 != dense  # really compressed: its own tokens, alike
    # the exported tokenizer.json reads the same in onnxruntime_genai's tokenizer (no BOS added)
    text = og.Tokenizer(model).encode(PROMPT)
    assert [int(t) for t in text] == ids[1:] and ids[0] == json.loads(
        (q4 / "genai_config.json").read_text())["model"]["bos_token_id"]
    assert "tokenizer" not in json.loads((q4 / "lrc.json").read_text())["genai"]


@pytest.mark.slow
def test_generate_genai_flag_runs_ort_genai_and_compares_tokens(tmp_path):
    """``lrc generate --genai``: each model also runs in ORT GenAI from the same prompt ids, and
    the command says whether the greedy tokens are ONNX Runtime's; refusals are one line."""
    pytest.importorskip("onnxruntime_genai")
    if save_tiny is None:
        pytest.skip(_no_export)
    import shutil

    from typer.testing import CliRunner

    from lrc.cli import app
    from lrc.exporters import export

    save_tiny("llama", tmp_path / "hf", seed=1, tokenizer=True)
    out = export(tmp_path / "hf", tmp_path / "onnx", validate=False, exporter="optimum").out_dir
    run = CliRunner().invoke
    r = run(app, ["generate", str(out), "hello world", "--max-new-tokens", "5", "--genai"],
            env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "(ORT GenAI)" in r.output
    assert "ORT GenAI's greedy tokens identical to ONNX Runtime's (5 tokens)" in r.output
    from clirun import lrc, one_line_error

    assert "drop --sample" in one_line_error(lrc("generate", out, "hi", "--genai", "--sample"))
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "genai_config.json").unlink()
    err = one_line_error(lrc("generate", bare, "hi", "--genai", "--max-new-tokens", "2"))
    assert "no genai_config.json" in err


@pytest.mark.slow
@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_builder_export_fused_graph_and_its_compression_run_in_genai(family, tmp_path):
    """``lrc export --exporter builder`` in lrc's own environment (onnxruntime-genai 0.15.2's
    builder runs with optimum-onnx's transformers): the builder's fused graph gives the greedy
    tokens of optimum's export; compressed to int4 + correction it keeps its fusions and ORT
    GenAI's tokens are lrc generate's; the builder's own int4 is refused by --quantize."""
    og = pytest.importorskip("onnxruntime_genai")
    if save_tiny is None:
        pytest.skip(_no_export)
    import torch

    from clirun import lrc, one_line_error
    from lrc.exporters import export
    from lrc.generate import OnnxCausalLM

    model = save_tiny(family, tmp_path / "hf", seed=1, tokenizer=True)
    with torch.no_grad():  # as above: a random tiny model otherwise repeats one token
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.mul_(8.0)
    model.save_pretrained(tmp_path / "hf")
    ref = export(tmp_path / "hf", tmp_path / "optimum", validate=False, exporter="optimum")
    res = export(tmp_path / "hf", tmp_path / "builder", exporter="builder")
    assert res.exporter == "builder" and res.builder["precision"] == "fp32"
    assert json.loads((res.out_dir / "lrc.json").read_text())["export"]["builder"]["builder"]

    def ops(d):
        return {n.op_type for n in onnx.load(d / "model.onnx", load_external_data=False).graph.node}

    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops(res.out_dir)
    ids = [1, 5, 9, 17, 33]

    def greedy(d):
        return OnnxCausalLM(d, threads=1).generate("", max_new_tokens=NEW, prompt_ids=ids).new_token_ids

    want = greedy(ref.out_dir)
    assert len(set(want)) > 3, want
    assert greedy(res.out_dir) == want == _og_greedy(og.Model(str(res.out_dir)), ids)
    q4 = _compress(res.out_dir, tmp_path / "q4", "--quantize", "int4", "--correct-rank", "8",
                   "--method", "svd")
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits"} <= ops(q4)
    assert _og_greedy(og.Model(str(q4)), ids) == greedy(q4)
    b4 = export(tmp_path / "hf", tmp_path / "b4", exporter="builder", dtype="int4").out_dir
    assert "MatMulNBits" in ops(b4)
    b16 = export(tmp_path / "hf", tmp_path / "b16", exporter="builder", dtype="float16").out_dir
    g16 = onnx.load(b16 / "model.onnx").graph
    assert {i.data_type for i in g16.initializer if len(i.dims) == 2} == {TensorProto.FLOAT16}
    # ORT's CPU EP fails the builder's float16 graphs at the second decode step unless its
    # buffer reuse is off (lrc.runtime.session does that for float16 inputs)
    assert len(greedy(b16)) == NEW
    r = lrc("generate", b16, "w5 w9", "--genai", "--max-new-tokens", "4")
    if r.returncode:  # ORT GenAI cannot turn the reuse off: one line that says so, not a trace
        err = one_line_error(r)
        assert "float16" in err and "without --genai" in err, err
    err = one_line_error(lrc("compress", b4, "--quantize", "int4", "-o", tmp_path / "x"))
    assert "int4" in err or "quantised" in err, err
    # the other commands on the fused graph: the default recipe (its update runs segment by
    # segment through GroupQueryAttention; the calibration windows shrink to the builder's
    # rotary tables: this tiny model's context is 128, the default window 256), verify (random
    # feeds with the cache layout of genai_config.json; the builder's graph fails strict shape
    # inference on its own), eval (windows clamped likewise)
    r = lrc("compress", res.out_dir, "--ratio", "0.8", "--calib-tokens", "512", "-o", tmp_path / "lr")
    assert r.returncode == 0 and "fell back" not in r.stdout + r.stderr, r.stdout + r.stderr
    rep = json.loads((tmp_path / "lr" / "lrc.json").read_text())
    assert "GroupQueryAttention" in ops(tmp_path / "lr") and rep["calibration"]["seq_len"] == 128
    r = lrc("compress", res.out_dir, "--rank", "full", "-o", tmp_path / "full")
    r = lrc("verify", res.out_dir, tmp_path / "full", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["worst_rel"] < 1e-4
    r = lrc("eval", res.out_dir, tmp_path / "lr", "--max-tokens", "300", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["in_domain"]["context"] == 128


@pytest.mark.slow
def test_builder_export_of_smollm2_decodes_as_optimums(smollm2_dir, tmp_path):
    """The real model: ``lrc export smollm2-135m --exporter builder`` (the fused graph) gives the
    greedy tokens of optimum's export, in lrc generate and in ORT GenAI."""
    og = pytest.importorskip("onnxruntime_genai")
    from lrc.exporters import export
    from lrc.generate import OnnxCausalLM

    res = export("smollm2-135m", tmp_path / "b", exporter="builder")
    ids = OnnxCausalLM(smollm2_dir, threads=2).encode(PROMPT)
    want = OnnxCausalLM(smollm2_dir, threads=2).generate("", max_new_tokens=NEW, prompt_ids=ids)
    got = OnnxCausalLM(res.out_dir, threads=2).generate("", max_new_tokens=NEW, prompt_ids=ids)
    assert got.new_token_ids == want.new_token_ids == _og_greedy(og.Model(str(res.out_dir)), ids)
    assert "checked on" in res.tokenizer  # the GGUF vocabulary check ran on the builder's folder


@pytest.mark.parametrize("family, words", [
    # the builder makes every 6th Gemma-3 layer full attention whatever layer_types says: the
    # tiny config (sliding, full) is refused before it runs
    ("gemma3", "every 6th Gemma-3 layer"),
    # GPT-2 is not among the builder's architectures: its own reason
    pytest.param("gpt2", "not currently supported", marks=pytest.mark.slow),
])
def test_builder_export_refusals_are_one_line(family, words, tmp_path):
    if save_tiny is None:
        pytest.skip(_no_export)
    from clirun import lrc, one_line_error

    save_tiny(family, tmp_path / "hf", seed=1, tokenizer=True)
    err = one_line_error(lrc("export", tmp_path / "hf", "--exporter", "builder", "-o", tmp_path / "o"))
    assert words in err and not (tmp_path / "o").exists(), err
