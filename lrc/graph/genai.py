"""ONNX Runtime GenAI's ``genai_config.json`` for a decoder folder, from what the folder has.

ONNX Runtime GenAI runs a decoder-only model from a folder holding the ONNX file, the tokenizer
files and ``genai_config.json``, which names the file, its inputs and outputs (the KV cache as
``printf`` templates, ``past_key_values.%d.key``), the attention shape (heads, KV heads, head
size, hidden size, layers), vocabulary, context length and special tokens, and how the cache is
kept. lrc's decoders are optimum exports (and rewrites of them, whose inputs and outputs are
untouched): the cache is Concat-style (``present.N`` = ``past.N`` + the new step, a new buffer
each step), hence ``past_present_share_buffer: false``; the model type is GenAI's generic
``decoder`` (a named type stands for its model builder's own graph conventions, which an
optimum graph does not follow; ``decoder`` and ``llama`` gave the same tokens on SmolLM2).

Everything comes from the folder: names, KV heads and head size from the graph's declared
inputs and outputs (``[batch, kv_heads, past, head_size]``), the layer count from the cache
names found, the vocabulary from the ``logits`` shape, the rest from config.json, with
generation_config.json's tokens and search settings first. A folder lrc cannot describe (no
causal ``logits``, no KV cache, an input GenAI does not feed, an encoder-decoder export, a
missing field) gets no config and the reason; a config already there (copied from the source
folder) is the base: lrc rewrites the file name, inputs and outputs and keeps the rest.

Why not GenAI's own model builder (``models.builder --extra_options config_only=true``), tried
with 0.18.0: the module imports torch and transformers at load time (compressing needs only
onnx, ONNX Runtime and numpy); next to transformers 4.57.6, the version optimum-onnx pins for
``lrc export``, it does not import at all (``cannot import name
'Qwen3_5ForConditionalGeneration'``); and its config describes the graph its builder would
have made from the HF config, not the graph in the folder. Its ``make_genai_config`` is the
reference for the fields written here.

Tokenizers: transformers' GGUF conversion writes byte-level BPE tokenizers whose decoder also
holds SentencePiece steps (``ByteFallback``, ``Fuse``, ``Replace ▁ -> ' '``). Those steps do
nothing on a byte-level vocabulary, but GenAI's tokenizer takes the ``▁`` step for
SentencePiece and encodes every space as three unknown ids (SmolLM2: "The capital" -> 504, -1,
-1, -1, 29721 instead of 504, 3575). :func:`byte_level_decoder` gives the equivalent plain
``ByteLevel`` decoder (``lrc export`` writes it); :func:`write_config` notes a folder that still
has the mixed one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lrc.errors import LrcError
from lrc.graph.model import write_text_atomic
from lrc.modelref import GENAI_CONFIG as CONFIG
from lrc.modelref import TOKENIZER, cache_templates, model_files, resolve

#: The inputs GenAI feeds besides the KV cache, by their key in the config's ``inputs``.
FED_INPUTS = ("input_ids", "attention_mask", "position_ids")

_CONFIG_KEYS = {  # config.json spellings across families (LLaMA-like, GPT-2, ...)
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "context_length": ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"),
}
_SEARCH_FROM_GENERATION = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


class Undescribed(Exception):
    """Why a folder gets no GenAI config (a reason, not an error)."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cache(names, side: str) -> tuple[str, str, int]:
    """(key template, value template, layers) of the cache among ``names``
    (:func:`lrc.modelref.cache_templates`, the one parser of cache names)."""
    try:
        return cache_templates(names, side)
    except ValueError as e:
        raise Undescribed(str(e)) from None


def _model_file(folder: Path) -> Path:
    files = model_files(folder)
    names = [f.name for f in files]
    if not files:
        raise Undescribed("the folder holds no .onnx model")
    if any(n.startswith("encoder") for n in names):
        raise Undescribed(f"an encoder-decoder export ({', '.join(names)}); the config describes "
                          "decoder-only models")
    if "model.onnx" in names:
        return folder / "model.onnx"
    if len(files) == 1:
        return files[0]
    raise Undescribed(f"several models and none named model.onnx ({', '.join(names)})")


def _from_config(config: dict, field: str):
    for key in _CONFIG_KEYS[field]:
        if isinstance(config.get(key), int):
            return config[key]
    raise Undescribed(f"config.json has no {field} (looked for {', '.join(_CONFIG_KEYS[field])})")


def _dim(value, fallback, what: str) -> int:
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(fallback, int) and fallback > 0:
        return fallback
    raise Undescribed(f"{what} is neither a fixed dimension of the graph nor in config.json")


def _tokens(config: dict, generation: dict) -> dict:
    """bos / eos / pad ids, generation_config.json over config.json; pad defaults to eos."""
    def get(key):
        v = generation.get(key, config.get(key))
        if isinstance(v, list):
            v = [int(x) for x in v]
            return v[0] if len(v) == 1 else (v or None)
        return v if isinstance(v, int) else None

    out = {k: get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if out["pad_token_id"] is None and out["eos_token_id"] is not None:
        eos = out["eos_token_id"]
        out["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return {k: v for k, v in out.items() if v is not None}


def describe(folder: str | Path) -> dict:
    """The ``genai_config.json`` content for ``folder``'s decoder. Raises :class:`Undescribed`
    with the reason when the folder is not a decoder lrc can describe."""
    folder = Path(folder)
    try:
        ref = resolve(_model_file(folder))
        inputs, outputs = ref.io
    except LrcError as e:
        raise Undescribed(str(e)) from e
    logits = outputs.get("logits")
    if "input_ids" not in inputs or logits is None or len(logits) != 3:
        raise Undescribed("not a causal LM (needs an input_ids input and a rank-3 logits output)")
    if not (folder / "config.json").is_file():
        raise Undescribed("no config.json beside the model")
    config = ref.hf_config
    generation = ref.generation_config

    past_key, past_value, layers = _cache([n for n in inputs if n not in FED_INPUTS], "input")
    present_key, present_value, out_layers = _cache([n for n in outputs if n != "logits"], "output")
    if out_layers != layers:
        raise Undescribed(f"{layers} cache layers in, {out_layers} out")
    cache_in = {t % i for t in (past_key, past_value) for i in range(layers)}
    cache_out = {t % i for t in (present_key, present_value) for i in range(layers)}
    unfed = [n for n in inputs if n not in FED_INPUTS and n not in cache_in]
    if unfed:
        raise Undescribed(f"input {unfed[0]} is none ONNX Runtime GenAI feeds "
                          f"({', '.join(FED_INPUTS)}, the KV cache)")
    extra = [n for n in outputs if n != "logits" and n not in cache_out]
    if extra:
        raise Undescribed(f"output {extra[0]} is neither logits nor the KV cache")
    kv = inputs[past_key % 0]
    if len(kv) != 4:
        raise Undescribed(f"KV cache of rank {len(kv)}; ONNX Runtime GenAI expects "
                          "[batch, kv_heads, sequence, head_size]")

    heads = _from_config(config, "num_attention_heads")
    hidden = _from_config(config, "hidden_size")
    context = _from_config(config, "context_length")
    kv_heads = _dim(kv[1], config.get("num_key_value_heads", heads), "the KV head count")
    head_size = _dim(kv[3], config.get("head_dim", hidden // heads), "the head size")
    vocab = _dim(logits[2], config.get("vocab_size"), "the vocabulary size")

    names = {"input_ids": "input_ids"}
    names.update({k: k for k in ("attention_mask", "position_ids") if k in inputs})
    search = {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    }
    search.update({k: generation[k] for k in _SEARCH_FROM_GENERATION
                   if isinstance(generation.get(k), (int, float))})
    return {
        "model": {
            **_tokens(config, generation),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "lrc", "provider_options": []},
                "filename": ref.file.name,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": {**names, "past_key_names": past_key, "past_value_names": past_value},
                "outputs": {"logits": "logits", "present_key_names": present_key,
                            "present_value_names": present_value},
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "type": "decoder",
            "vocab_size": vocab,
        },
        "search": search,
    }


def _merge(existing: dict, new: dict) -> dict:
    """``existing`` with the graph-derived parts of ``new`` (file name, inputs, outputs)."""
    dec = existing.get("model", {}).get("decoder")
    if not isinstance(dec, dict):
        return new
    for key in ("filename", "inputs", "outputs"):
        dec[key] = new["model"]["decoder"][key]
    return existing


def write_config(folder: str | Path) -> dict:
    """Write ``folder/genai_config.json`` for its decoder; returns what was done.

    ``{"file": "genai_config.json", "model": FILE}`` when written (``"tokenizer"`` added when
    ONNX Runtime GenAI's tokenizer will misread tokenizer.json); ``{"file": None, "reason": ...}``
    when the folder cannot be described, and a config copied from a source folder is then
    removed unless the model it names is there (``"kept": True``)."""
    folder = Path(folder)
    path = folder / CONFIG
    existing = _read_json(path)
    try:
        config = describe(folder)
    except Undescribed as e:
        named = existing.get("model", {}).get("decoder", {}).get("filename")
        if isinstance(named, str) and (folder / named).is_file():
            return {"file": CONFIG, "kept": True, "reason": str(e)}
        path.unlink(missing_ok=True)
        return {"file": None, "reason": str(e)}
    if existing:
        config = _merge(existing, config)
    write_text_atomic(path, json.dumps(config, indent=4) + "\n")
    report = {"file": CONFIG, "model": config["model"]["decoder"]["filename"]}
    if byte_level_decoder(_read_json(folder / TOKENIZER)) is not None:
        report["tokenizer"] = ("tokenizer.json's decoder has SentencePiece steps that ONNX Runtime "
                               "GenAI's tokenizer misreads; feed token ids, or re-export")
    return report


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def byte_level_decoder(tokenizer: dict) -> dict | None:
    """``tokenizer`` (tokenizer.json's content) with its decoder reduced to its ``ByteLevel``
    step, when the other steps are SentencePiece ones that do nothing on its byte-level BPE
    vocabulary (``ByteFallback`` with no ``<0xNN>`` token, ``Fuse``, ``Replace ▁`` with no
    ``▁`` in any token); None when that does not apply."""
    model, dec, pre = (tokenizer.get(k) if isinstance(tokenizer.get(k), dict) else {}
                       for k in ("model", "decoder", "pre_tokenizer"))
    if model.get("type") != "BPE":
        return None
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    steps = dec.get("decoders") if dec.get("type") == "Sequence" else None
    if not steps or not any(p.get("type") == "ByteLevel" for p in pres):
        return None
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    others = [s for s in steps if s.get("type") != "ByteLevel"]
    if len(byte_level) != 1 or steps[-1] is not byte_level[0] or not others:
        return None
    for s in others:
        replace_space = (s.get("type") == "Replace" and s.get("pattern") == {"String": "▁"}
                         and s.get("content") == " ")
        if s.get("type") not in ("ByteFallback", "Fuse") and not replace_space:
            return None
    vocab = model.get("vocab")
    tokens = list(vocab) if isinstance(vocab, dict) else []
    tokens += [t.get("content", "") for t in tokenizer.get("added_tokens") or []]
    if any("▁" in t or _BYTE_TOKEN.match(t) for t in tokens):
        return None
    return {**tokenizer, "decoder": byte_level[0]}


__all__ = ["CONFIG", "FED_INPUTS", "Undescribed", "byte_level_decoder", "describe", "write_config"]
