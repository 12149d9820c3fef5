"""Text generation from an exported decoder with ONNX Runtime, numpy and `tokenizers` only.

Why not optimum's ORTModelForCausalLM: lrc's compressed models must be runnable (and timed)
without torch or transformers installed, and a hand-written loop makes prefill and per-token
decode time explicit.  The loop follows the layout optimum writes for
``text-generation-with-past`` (``model.onnx`` with inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value`` and outputs ``logits``,
``present.N.key/value``):

1. prefill: the whole prompt with an empty cache (``past_key_values.N.*`` of shape
   ``[batch, kv_heads, 0, head_dim]``; heads / head_dim from the inputs' static dims, else
   config.json);
2. decode: one token at a time, ``present.*`` fed back as ``past_key_values.*``, the attention
   mask growing by one and ``position_ids`` the token's position.

The feeds are :func:`lrc.runtime.feeds.text_feeds`' (the cache may also be named ``past.N.key``
or ``past_key.N``; a folder may hold ``decoder_model_merged.onnx`` instead of ``model.onnx``).
Inputs the model lacks (``position_ids``, ``attention_mask``) are simply not fed, a merged
decoder's ``use_cache_branch`` is set, and a model exported without a cache (lrc's
torch-dynamo fallback) is run on the whole sequence at each step.  Generation stops at
``max_new_tokens`` or at an eos id from generation_config.json / config.json.
Batch size is 1.

:func:`genai_generate` runs the same folder greedily in ONNX Runtime GenAI (its
``genai_config.json``, its own loop and cache) from the same prompt ids: the check that what lrc
writes runs where such models are deployed, with the same tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lrc.errors import LrcError, opt
from lrc.modelref import ModelRef, model_files, resolve
from lrc.runtime.feeds import Past, empty_past, past_names, present_to_past, text_feeds
from lrc.runtime.session import float16_inputs, open_session


@dataclass
class GenerationResult:
    """One generation: the new text and how long it took.

    ``prefill_s`` covers encoding nothing but the model run on the prompt and the choice of the
    first new token; ``decode_s`` covers the remaining tokens, and ``tokens_per_s`` is the
    decode rate (tokens produced by one-token steps per second; for a single new token, the
    overall rate).
    """

    text: str
    new_token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    prompt_ids: list[int] = field(default_factory=list)


class GenerationComparison(NamedTuple):
    """Two generations of the same prompt; unpacks as ``a, b``."""

    a: GenerationResult
    b: GenerationResult

    @property
    def matching_tokens(self) -> int:
        """Length of the common prefix of the two new-token sequences."""
        n = 0
        for x, y in zip(self.a.new_token_ids, self.b.new_token_ids):
            if x != y:
                break
            n += 1
        return n


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class OnnxCausalLM:
    """An exported decoder-only model folder (or its .onnx file), loaded for generation.

    The model file is found by :func:`lrc.graph.model.resolve_model_path` (``model.onnx``, else
    ``decoder_model_merged.onnx``, ...); the session comes from
    :func:`lrc.runtime.session.open_session` and the KV cache is read by :mod:`lrc.runtime.feeds`
    (``past_key_values.N.key``, ``past.N.key`` or ``past_key.N``). ``provider``: an execution
    provider alias or ORT name (default the CPU). ``tokenizer``: a tokenizer.json (or a folder
    holding one, whose tokenizer_config.json then gives the chat template) when the model's
    folder has none."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, provider: str = "cpu",
                 tokenizer: str | Path | None = None):
        path = Path(model_dir) if not isinstance(model_dir, ModelRef) else model_dir.folder
        if isinstance(model_dir, (str, Path)) and path.is_dir() and not (
                path / "model.onnx").is_file():
            if (path / "encoder_model.onnx").is_file():
                raise LrcError(f"{path} is an encoder-decoder export; lrc generates only with decoder-only models")
            if not model_files(path):
                raise LrcError(f"{path} has no model.onnx; export a text-generation model there first")
        ref = resolve(model_dir, tokenizer=tokenizer)
        model_file = ref.need_file("generation")
        folder = ref.folder
        if ref.tokenizer is None:
            raise LrcError(f"{folder} has no tokenizer.json; generation needs the model's "
                           f"tokenizer: pass {opt('tokenizer')}")

        self.folder = folder
        self.ref = ref
        self.config = ref.config
        self.generation_config = ref.generation_config
        self.tokenizer_config = ref.tokenizer_config
        self.tokenizer = ref.load_tokenizer()

        self.session = open_session(ref, threads=threads, provider=provider,
                                    inter_op=1 if threads else None)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in self.output_names:
            raise LrcError(f"{model_file} is not a causal LM (needs input 'input_ids' and output 'logits')")
        self.past_names = past_names(self.session)
        self.present_to_past = present_to_past(self.session)  # LrcError when they do not pair
        self.eos_ids = set(
            _as_id_list(self.generation_config.get("eos_token_id"))
            or _as_id_list(self.config.get("eos_token_id"))
        )

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            text = apply_chat_template(self.folder, self.tokenizer_config, prompt)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(prompt).ids

    # ---------------------------------------------------------------- generate
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat: bool = False,
        prompt_ids: list[int] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt`` (or the given ``prompt_ids``)."""
        if max_new_tokens < 1:
            raise LrcError("max_new_tokens must be at least 1")
        if do_sample and temperature <= 0:
            raise LrcError("temperature must be > 0 when sampling")
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(prompt, chat)
        if not ids:
            raise LrcError("the prompt encodes to no tokens")
        rng = np.random.default_rng(seed)
        pick = _picker(do_sample, temperature, top_k, rng)
        use_cache = bool(self.past_names)

        tokens = list(ids)
        new: list[int] = []
        t0 = time.perf_counter()
        past = (empty_past(self.session, config=self.config,
                           capacity=len(tokens) + max_new_tokens) if use_cache else {})
        step_ids = np.asarray([tokens], dtype=np.int64)
        first = True
        t_first = None
        while True:
            feeds = text_feeds(self.session, step_ids, past=past, config=self.config)
            outs = self.session.run(self.output_names, feeds)
            logits = outs[0]
            nxt = pick(logits[0, -1])
            new.append(nxt)
            tokens.append(nxt)
            if first:
                t_first = time.perf_counter()
                first = False
            if len(new) >= max_new_tokens or nxt in self.eos_ids:
                break
            if use_cache:
                named = dict(zip(self.output_names, outs))
                past = Past({p: named[o] for o, p in self.present_to_past.items()},
                            len(tokens) - 1)
                step_ids = np.asarray([[nxt]], dtype=np.int64)
            else:
                step_ids = np.asarray([tokens], dtype=np.int64)
        t_end = time.perf_counter()

        prefill_s = t_first - t0
        decode_s = t_end - t_first
        steps = len(new) - 1
        rate = steps / decode_s if steps and decode_s > 0 else len(new) / max(t_end - t0, 1e-9)
        return GenerationResult(
            text=self.tokenizer.decode(new, skip_special_tokens=True),
            new_token_ids=new,
            prompt_tokens=len(ids),
            new_tokens=len(new),
            prefill_s=prefill_s,
            decode_s=decode_s,
            tokens_per_s=rate,
            prompt_ids=list(ids),
        )


def _picker(do_sample: bool, temperature: float, top_k: int, rng: np.random.Generator):
    """A function logits[vocab] -> next token id: greedy argmax or temperature / top-k sampling."""
    if not do_sample:
        return lambda logits: int(np.argmax(logits))

    def sample(logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / temperature
        if top_k and 0 < top_k < z.shape[0]:
            kth = np.partition(z, -top_k)[-top_k]
            z = np.where(z >= kth, z, -np.inf)
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        return int(rng.choice(z.shape[0], p=p))

    return sample


def apply_chat_template(folder: Path, tokenizer_config: dict, prompt: str) -> str:
    """Render the model's chat template for one user message, with the generation prompt.

    Uses jinja2 directly (what transformers uses underneath), so no transformers import.
    """
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        by_name = {t.get("name"): t.get("template") for t in template}
        template = by_name.get("default") or next(iter(by_name.values()), None)
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        raise LrcError(f"{folder} has no chat template; generate without chat")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise LrcError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise LrcError(f"chat template error: {message}")

    def token_text(key: str) -> str:
        tok = tokenizer_config.get(key)
        return tok.get("content", "") if isinstance(tok, dict) else (tok or "")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        bos_token=token_text("bos_token"),
        eos_token=token_text("eos_token"),
    )


def generate(
    model_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chat: bool = False,
    threads: int | None = None,
    tokenizer: str | Path | None = None,
) -> GenerationResult:
    """Load ``model_dir`` (an exported text-generation folder) and generate from ``prompt``."""
    model = OnnxCausalLM(model_dir, threads=threads, tokenizer=tokenizer)
    return model.generate(
        prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, seed=seed, chat=chat,
    )


def generate_compare(
    dir_a: str | Path,
    dir_b: str | Path,
    prompt: str,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chat: bool = False,
    threads: int | None = None,
    tokenizer: str | Path | None = None,
) -> GenerationComparison:
    """Generate the same prompt with two model folders (e.g. dense vs compressed).

    The models run one after the other and the first session is released before the second
    is created, so their ORT thread pools never compete for the cores.
    """
    results = []
    for folder in (dir_a, dir_b):
        model = OnnxCausalLM(folder, threads=threads, tokenizer=tokenizer)
        results.append(model.generate(
            prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, seed=seed, chat=chat,
        ))
        del model
    return GenerationComparison(*results)


def genai_generate(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int = 32,
                   tokenizer: str | Path | None = None) -> GenerationResult:
    """Greedy generation of ``max_new_tokens`` after ``prompt_ids`` in ONNX Runtime GenAI (the
    folder's ``genai_config.json``: what lrc export and compress write, or the model builder's).
    ``prefill_s`` covers the prompt and the first token, ``tokens_per_s`` the rest."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise LrcError("ONNX Runtime GenAI is not installed: pip install onnxruntime-genai") from None
    ref = resolve(model_dir, tokenizer=tokenizer)
    folder = ref.folder
    if folder is None or not (folder / "genai_config.json").is_file():
        raise LrcError(f"{folder or model_dir} has no genai_config.json (lrc export and lrc "
                       f"compress write one beside a decoder's model.onnx)")
    if not prompt_ids or max_new_tokens < 1:
        raise LrcError("ORT GenAI needs prompt ids and max_new_tokens of at least 1")
    try:
        config = og.Config(str(folder))
        # ONNX Runtime's own log goes to stderr beside lrc's one line: errors are raised anyway
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "log_severity_level": 4}}}}))
        model = og.Model(config)
    except Exception as e:  # its messages are one line: the config or the graph it refused
        raise LrcError(f"ONNX Runtime GenAI cannot load {folder}: {str(e).splitlines()[0]}") from None
    params = og.GeneratorParams(model)
    # its cache buffer is max_length long: at least the sliding window where there is one
    length = max(len(prompt_ids) + max_new_tokens, int(ref.config.get("lrc_kv_capacity") or 0))
    params.set_search_options(max_length=length, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    try:
        gen.append_tokens(list(prompt_ids))
        gen.generate_next_token()
        t_first = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if gen.is_done():
                break
            gen.generate_next_token()
    except Exception as e:  # noqa: BLE001 - ORT's own failure inside GenAI, in one line
        raise LrcError(f"ONNX Runtime GenAI failed to generate from {folder}: "
                       f"{_genai_why(ref, str(e))}") from None
    t_end = time.perf_counter()
    new = [int(t) for t in gen.get_sequence(0)][len(prompt_ids):][:max_new_tokens]
    steps = len(new) - 1
    decode_s = t_end - t_first
    rate = steps / decode_s if steps and decode_s > 0 else len(new) / max(t_end - t0, 1e-9)
    text = ref.load_tokenizer().decode(new, skip_special_tokens=True) if ref.tokenizer else ""
    return GenerationResult(text=text, new_token_ids=new, prompt_tokens=len(prompt_ids),
                            new_tokens=len(new), prefill_s=t_first - t0, decode_s=decode_s,
                            tokens_per_s=rate, prompt_ids=list(prompt_ids))


def _genai_why(ref, message: str) -> str:
    """ORT GenAI's error in one line, with what is known of it: the CPU EP fails float16
    graphs (the model builder's fp16) at the second step, a buffer-reuse bug GenAI has no
    option against (lrc's own sessions turn the reuse off: lrc generate without --genai)."""
    import re

    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    m = re.search(r"Status Message: (.*)", message)
    why = (m.group(1) if m else (lines[0] if lines else "no message")).split(" Validate usage")[0]
    why = re.sub(r"/\S*onnxruntime_src/\S+ virtual \S+ \S+::\S+\(.*?\) ", "", why)[:240]
    if "re-use buffer" in message and float16_inputs(ref.graph.graph):
        why += (" (ONNX Runtime's CPU EP fails float16 graphs at the second step when it "
                "re-uses buffers, and GenAI cannot turn that off; lrc generate without --genai "
                "runs them)")
    return why


def without_eos(model_dir: str | Path, ids: list[int]) -> list[int]:
    """``ids`` without the end-of-sequence ids they end with (lrc's loop keeps the one it stopped
    at, ORT GenAI's sequence leaves it out): what two generations are compared on."""
    ref = resolve(model_dir)
    eos = set(_as_id_list(ref.generation_config.get("eos_token_id"))
              or _as_id_list(ref.config.get("eos_token_id")))
    out = list(ids)
    while out and out[-1] in eos:
        out.pop()
    return out
