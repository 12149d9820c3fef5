"""Tests for lrc.generate: KV-cache greedy decoding equals torch's, sampling, eos, chat, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fixtures_export import save_tiny, smollm2_dir, tiny_llama, torch  # noqa: F401 (fixtures)

from lrc.errors import LrcError
from lrc.generate import GenerationResult, OnnxCausalLM, generate, generate_compare

PROMPT = "w5 w9 w17 w33 w65"


def _torch_greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
        )
    new = out[0, len(ids):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    return new


def test_greedy_with_kv_cache_matches_torch_generate(tiny_llama):
    model, folder = tiny_llama
    lm = OnnxCausalLM(folder)
    assert lm.past_names, "export should carry a KV cache"
    ids = lm.encode(PROMPT)
    assert ids[0] == 1 and len(ids) == 6  # the word tokenizer prepends <s> as BOS
    res = lm.generate(PROMPT, max_new_tokens=24)
    assert isinstance(res, GenerationResult)
    assert res.prompt_tokens == 6 and res.new_tokens == len(res.new_token_ids) > 5
    assert res.new_token_ids == _torch_greedy(model, ids, 24, eos=2)
    assert res.prefill_s > 0 and res.tokens_per_s > 0
    assert res.text == " ".join(f"w{i}" for i in res.new_token_ids if i > 2)


def test_stops_at_eos_from_generation_config(tiny_llama, tmp_path):
    _, folder = tiny_llama
    free = generate(folder, PROMPT, max_new_tokens=12).new_token_ids
    stop = free[4]
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    gen["eos_token_id"] = [stop, 250]
    (copy / "generation_config.json").write_text(json.dumps(gen))
    res = generate(copy, PROMPT, max_new_tokens=12)
    assert res.new_token_ids == free[: free.index(stop) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_llama):
    _, folder = tiny_llama
    lm = OnnxCausalLM(folder)
    greedy = lm.generate(PROMPT, max_new_tokens=10).new_token_ids
    a = lm.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7).new_token_ids
    b = lm.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7).new_token_ids
    assert a == b
    assert lm.generate(PROMPT, max_new_tokens=10, do_sample=True, top_k=1, seed=3).new_token_ids == greedy


def test_generate_compare_same_model(tiny_llama):
    _, folder = tiny_llama
    cmp = generate_compare(folder, folder, PROMPT, max_new_tokens=8, threads=1)
    a, b = cmp
    assert a.new_token_ids == b.new_token_ids
    assert cmp.matching_tokens == a.new_tokens


def test_chat_template_is_rendered(tiny_llama, tmp_path):
    _, folder = tiny_llama
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text()) if (copy / "tokenizer_config.json").exists() else {}
    cfg["bos_token"] = "<s>"
    cfg["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}w7 {{ m['content'] }} w8 {% endfor %}"
        "{% if add_generation_prompt %}w9{% endif %}"
    )
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    lm = OnnxCausalLM(copy)
    assert lm.encode("w5 w6", chat=True) == [1, 7, 5, 6, 8, 9]
    assert lm.generate("w5 w6", max_new_tokens=3, chat=True).prompt_tokens == 6


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_model_without_kv_cache(tmp_path):
    """A torch-dynamo export (no past_key_values, no position_ids) decodes the same tokens."""
    from lrc.exporters import export

    model = save_tiny("llama", tmp_path / "hf", seed=3, tokenizer=True)
    res = export(tmp_path / "hf", tmp_path / "onnx", exporter="torch-dynamo")
    assert res.exporter == "torch-dynamo" and res.task == "text-generation"
    lm = OnnxCausalLM(res.out_dir)
    assert not lm.past_names and "position_ids" not in lm.inputs
    out = lm.generate(PROMPT, max_new_tokens=12)
    assert out.new_token_ids == _torch_greedy(model, lm.encode(PROMPT), 12, eos=2)


def test_generate_does_not_import_torch(tiny_llama):
    _, folder = tiny_llama
    code = (
        "import sys; from lrc.generate import generate; "
        f"r = generate({str(folder)!r}, {PROMPT!r}, max_new_tokens=3); "
        "assert r.new_tokens >= 1; "
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors(tmp_path, tiny_llama):
    _, folder = tiny_llama
    with pytest.raises(LrcError, match="no model.onnx"):
        generate(tmp_path, "hi")
    (tmp_path / "encoder_model.onnx").write_bytes(b"")
    with pytest.raises(LrcError, match="encoder-decoder"):
        generate(tmp_path, "hi")
    with pytest.raises(LrcError, match="max_new_tokens"):
        generate(folder, PROMPT, max_new_tokens=0)
    with pytest.raises(LrcError, match="chat template"):
        generate(folder, PROMPT, chat=True)
    copy = tmp_path / "notok"
    shutil.copytree(folder, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(LrcError, match="tokenizer.json"):
        generate(copy, PROMPT)


@pytest.mark.slow
def test_smollm2_says_paris(smollm2_dir):
    lm = OnnxCausalLM(smollm2_dir, threads=2)
    res = lm.generate("The capital of France is", max_new_tokens=8)
    assert res.text.strip().startswith("Paris"), res.text
    chat = lm.generate("What is the capital of France?", max_new_tokens=16, chat=True)
    assert "Paris" in chat.text, chat.text
    assert chat.new_token_ids[-1] in lm.eos_ids or chat.new_tokens == 16
    assert np.isfinite(res.tokens_per_s)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_smollm2_compressed_full_rank_keeps_greedy_tokens(smollm2_dir, tmp_path):
    """Folder in, folder out; the KV-cache decoder at full rank reproduces the greedy tokens."""
    import subprocess
    import sys

    out = tmp_path / "full"
    r = subprocess.run([sys.executable, "-m", "lrc.cli", "compress", str(smollm2_dir), "--rank",
                        "full", "--include", "ffn.down,attn.o", "-o", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.json").is_file() and (out / "lrc.json").is_file()
    a = OnnxCausalLM(smollm2_dir, threads=2).generate("The capital of France is", max_new_tokens=12)
    b = OnnxCausalLM(out, threads=2).generate("The capital of France is", max_new_tokens=12)
    assert a.new_token_ids == b.new_token_ids
    # a lossy compression still loads in optimum and generates
    small = tmp_path / "r08"
    r = subprocess.run([sys.executable, "-m", "lrc.cli", "compress", str(smollm2_dir), "--ratio",
                        "0.8", "--include", "ffn", "--method", "svd", "-o", str(small)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small)
    m = ORTModelForCausalLM.from_pretrained(small)
    ids = tok("The capital of France is", return_tensors="pt")
    gen = m.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5


def test_tokenizer_flag_when_the_folder_has_none(tiny_llama, tmp_path):
    """A decoder folder without tokenizer.json: one line naming --tokenizer; with the flag the
    tokens are the ones the complete folder gives."""
    import shutil

    from typer.testing import CliRunner

    from lrc.cli import app

    _, folder = tiny_llama
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink(missing_ok=True)
    with pytest.raises(LrcError, match="pass tokenizer"):
        OnnxCausalLM(bare)
    want = OnnxCausalLM(folder).generate("w3 w4 w5", max_new_tokens=6).new_token_ids
    got = OnnxCausalLM(bare, tokenizer=folder).generate("w3 w4 w5", max_new_tokens=6).new_token_ids
    assert got == want
    r = CliRunner().invoke(app, ["generate", str(bare), "w3 w4 w5", "--max-new-tokens", "4",
                                 "--tokenizer", str(folder / "tokenizer.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["generate", str(bare), "w3", "--tokenizer", str(tmp_path)])
    assert r.exit_code != 0 and "no tokenizer.json there" in str(r.exception)
