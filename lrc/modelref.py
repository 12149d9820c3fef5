"""The model reference: what the user named, resolved once.

Every command (and ``lrc.compress``) turns what it was given — a ``.onnx`` file, an exported
folder, an ``onnx_ir.Model`` or ``onnx.ModelProto`` in memory — into a :class:`ModelRef` with
:func:`resolve`, and passes the reference on. It knows:

* the model's **file** (``None`` for a model built in memory) and the **folder** beside it, where
  the tokenizer and configs live; every ``.onnx`` of a folder (``files``);
* the folder's **format** (:data:`FORMATS`, the registry: ORT GenAI's builder folder, optimum's
  folder, its merged decoder, a folder of one model, a bare file, a model in memory);
* the **tokenizer** (given, or ``tokenizer.json`` beside the model), ``tokenizer_config.json``;
* the **configs**: ``config.json``; ``genai_config.json`` (the model builder writes no
  config.json: :attr:`ModelRef.config` then reads heads, KV heads, head size, layers,
  vocabulary and special tokens from it), ``generation_config.json``;
* the **KV-cache layout** (:class:`KVLayout`, from the graph's input and output names: the one
  parser of cache names lrc has);
* for a model in memory, the file it was read from (``lrc.model.load`` records it).

Nothing below the commands looks at paths, folder contents or that record again: functions that
take "a model" accept a ``ModelRef`` (or anything :func:`resolve` takes, resolved there once).
A new model format is one :class:`Format` in :data:`FORMATS` and its test.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import onnx
import onnx_ir as ir

from lrc.errors import LrcError, opt
from lrc.graph import model as M

__all__ = ["FORMATS", "Format", "KVLayout", "ModelRef", "fit_window", "is_past", "kv_layout",
           "model_files",
           "pick_file", "resolve", "tokenizer_file"]

SOURCE_META = M.SOURCE_META  # the file lrc.model.load read an onnx_ir.Model from
TOKENIZER = "tokenizer.json"
CONFIG = "config.json"
GENAI_CONFIG = "genai_config.json"


# ------------------------------------------------------------------------------------- KV cache

# Decoder KV-cache inputs, in the layouts exporters write: optimum's ``past_key_values.N.key``,
# ``past_key_values_N_value``, older ``past.N.key`` and ``past_key.N`` / ``past_value_N``.
_PAST_RE = re.compile(r"^(?:past_key_values|past)[._](\d+)[._](key|value)$"
                      r"|^past_(key|value)[._](\d+)$")


def is_past(name: str) -> bool:
    """Is ``name`` a KV-cache input (``past_key_values.N.key``, ``past.N.value``, ...)?"""
    return _PAST_RE.match(name) is not None


def _templates(names) -> dict[str, list[int]]:
    """``past_key_values.%d.key`` -> the layer numbers its names carry, for names with one
    number in them."""
    found: dict[str, list[int]] = {}
    for n in names:
        nums = re.findall(r"\d+", n)
        if len(nums) == 1:
            found.setdefault(re.sub(r"\d+", "%d", n.replace("%", "%%")), []).append(int(nums[0]))
    return found


def cache_templates(names, side: str) -> tuple[str, str, int]:
    """``(key template, value template, layers)`` of the KV cache among ``names``: two
    templates that differ only in their last ``key`` / ``value`` and number the same layers
    0..L-1 (``past_key_values.%d.key``). ValueError with the reason otherwise."""
    temps = _templates(names)
    pairs = []
    for key in temps:
        value = "value".join(key.rsplit("key", 1))
        if "key" in key and value in temps:
            pairs.append((key, value))
    if not pairs:
        raise ValueError(f"no KV-cache {side}s (key / value {side}s numbered by layer); "
                         "ONNX Runtime GenAI needs a KV cache")
    if len(pairs) > 1:
        raise ValueError(f"several KV-cache {side} names: {pairs}")
    key, value = pairs[0]
    layers = sorted(temps[key])
    if layers != list(range(len(layers))) or sorted(temps[value]) != layers:
        raise ValueError(f"the KV-cache {side}s do not number the layers 0, 1, ... alike")
    return key, value, len(layers)


@dataclass(frozen=True)
class KVLayout:
    """A decoder's KV cache as its graph declares it: the input and output name templates
    (``past_key_values.%d.key`` ...), the layer count and, where the graph fixes them, the KV
    head count and head size (``[batch, kv_heads, sequence, head_size]``)."""

    past_key: str
    past_value: str
    present_key: str | None
    present_value: str | None
    layers: int
    kv_heads: int | None = None
    head_size: int | None = None

    @property
    def inputs(self) -> list[str]:
        return [t % i for i in range(self.layers) for t in (self.past_key, self.past_value)]


def kv_layout(inputs: dict[str, list], outputs: dict[str, list]) -> KVLayout | None:
    """The :class:`KVLayout` of a graph (``name -> declared dims`` of its inputs and outputs);
    None when it reads no KV cache. ValueError when the cache names do not pair."""
    pasts = [n for n in inputs if is_past(n)]
    if not pasts:
        return None
    key, value, layers = cache_templates(pasts, "input")
    try:
        pk, pv, _ = cache_templates([n for n in outputs if n.startswith("present")], "output")
    except ValueError:
        pk = pv = None
    dims = inputs[key % 0]
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    return KVLayout(key, value, pk, pv, layers,
                    fixed[1] if len(fixed) == 4 else None, fixed[3] if len(fixed) == 4 else None)


def _io(values) -> dict[str, list]:
    """name -> declared dims (ints, symbol names, or None) of graph inputs or outputs."""
    out = {}
    for v in values:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in v.type.tensor_type.shape.dim]
        out[v.name] = dims
    return out


# ------------------------------------------------------------------------------------- formats


def fit_window(config: dict, length: int) -> int:
    """``length`` tokens, or fewer when the model attends over fewer (``max_position_embeddings``,
    or genai_config.json's ``context_length``): a model builder's rotary tables stop there and
    its GroupQueryAttention refuses a longer sequence. The one rule for calibration and
    evaluation windows."""
    limit = config.get("max_position_embeddings")
    return min(int(length), int(limit)) if limit else int(length)


def _read_json(path: Path | None) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_files(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.onnx`` in ``folder``, sorted (what a folder-in, folder-out job rewrites)."""
    return sorted(p for p in Path(folder).glob("*.onnx") if p.is_file())


@dataclass(frozen=True)
class Format:
    """A model layout lrc reads. ``detect(ref)`` says whether a resolved reference is of this
    format; ``pick(folder)`` names the model file a folder of this format is run from (None:
    not this format, or the generic choice of :func:`lrc.graph.model.resolve_model_path`:
    ``model.onnx``, ``decoder_model_merged.onnx``, ``decoder_model.onnx``, the only ``.onnx``)."""

    name: str
    title: str
    detect: Callable[["ModelRef"], bool]
    pick: Callable[[Path], "Path | None"] = lambda folder: None


def _genai_file(folder: Path) -> Path | None:
    """The file ``genai_config.json`` names, when it is there."""
    name = _read_json(folder / GENAI_CONFIG).get("model", {}).get("decoder", {}).get("filename")
    if isinstance(name, str) and name and "/" not in name and (folder / name).is_file():
        return folder / name
    return None


def _has(ref: "ModelRef", name: str) -> bool:
    return ref.folder is not None and (ref.folder / name).is_file()


#: Model layouts, the first whose ``detect`` matches names a reference's format (a new format
#: is one entry and its test).
FORMATS: list[Format] = [
    Format("in-memory", "a model in memory", lambda ref: ref.in_memory),
    Format("genai-builder", "ONNX Runtime GenAI model-builder folder (genai_config.json, no "
           "config.json)", lambda ref: _has(ref, GENAI_CONFIG) and not _has(ref, CONFIG),
           _genai_file),
    Format("merged-decoder", "optimum's merged decoder (decoder_model_merged.onnx)",
           lambda ref: ref.file is not None and ref.file.name == "decoder_model_merged.onnx"),
    Format("optimum", "exported folder (model, config.json, tokenizer)",
           lambda ref: _has(ref, CONFIG), _genai_file),
    Format("onnx-file", "a model file", lambda ref: True),
]


def pick_file(path: str | os.PathLike) -> Path:
    """The .onnx file of ``path``: the file itself, or the one a folder's format runs (the file
    ``genai_config.json`` names), else :func:`lrc.graph.model.resolve_model_path`'s choice.
    The one place lrc picks a folder's model."""
    p = Path(path)
    if p.is_dir():
        for f in FORMATS:
            chosen = f.pick(p)
            if chosen is not None:
                return chosen
    return M.resolve_model_path(p)


def tokenizer_file(path: str | os.PathLike) -> Path:
    """``tokenizer.json``: ``path`` itself, or the one in the folder ``path`` (LrcError when
    there is none)."""
    p = Path(path)
    f = p / TOKENIZER if p.is_dir() else p
    if not f.is_file():
        raise LrcError(f"{opt('tokenizer', repr(str(path)))}: no {TOKENIZER} there")
    return f


# ------------------------------------------------------------------------------------- the reference


class ModelRef:
    """A model and what comes with it; see the module docstring. Build it with
    :func:`resolve`."""

    def __init__(self, *, file: Path | None, folder: Path | None, model: ir.Model | None,
                 tokenizer: Path | None, given: str):
        self.file = file
        self.folder = folder
        self._model = model
        self._tokenizer = tokenizer
        self.given = given

    def __repr__(self) -> str:
        return f"ModelRef({self.given!r}, format={self.format!r})"

    # ---------------------------------------------------------------- what it is
    @property
    def in_memory(self) -> bool:
        """A model object was given (calibration runs it as it is; it is modified in place)."""
        return self._model is not None

    @cached_property
    def format(self) -> str:
        """The name of the first :data:`FORMATS` entry that matches."""
        return next(f.name for f in FORMATS if f.detect(self))

    @property
    def label(self) -> str:
        return str(self.file) if self.file is not None else "the model in memory"

    @cached_property
    def files(self) -> list[Path]:
        """Every model of the folder (the file alone when a file was named)."""
        if self.folder is not None and Path(self.given).is_dir():
            return model_files(self.folder)
        return [self.file] if self.file is not None else []

    def need_file(self, what: str) -> Path:
        if self.file is None:
            raise LrcError(f"{what} needs the model's file; this model was built in memory")
        return self.file

    # ---------------------------------------------------------------- the model
    def load(self) -> ir.Model:
        """The model as onnx-ir: the one given, or the file loaded (weights lazy)."""
        if self._model is not None:
            return self._model
        return M.load(self.need_file("loading"))

    @property
    def model(self) -> ir.Model | None:
        """The model given in memory (None for a file)."""
        return self._model

    @property
    def source(self):
        """What ONNX Runtime runs for calibration: the model in memory, else its file."""
        return self._model if self._model is not None else self.file

    @cached_property
    def graph(self) -> onnx.ModelProto:
        """The graph without weights (inputs, outputs, nodes), for inspecting a file."""
        return M.load_proto(self.need_file("reading the graph"))[0]

    @cached_property
    def io(self) -> tuple[dict[str, list], dict[str, list]]:
        """(inputs, outputs): name -> declared dims (ints, symbol names or None); graph inputs
        that are initializers left out."""
        if self._model is not None:
            g = self._model.graph

            def dims(v):
                return [d if isinstance(d, int) else (str(d) if d is not None and str(d) else None)
                        for d in (v.shape or [])]

            return ({v.name: dims(v) for v in g.inputs if not v.is_initializer()},
                    {v.name: dims(v) for v in g.outputs})
        g = self.graph.graph
        inits = {t.name for t in g.initializer}
        return _io([v for v in g.input if v.name not in inits]), _io(g.output)

    @cached_property
    def kv(self) -> KVLayout | None:
        """The KV-cache layout (None: no cache). LrcError when the cache names do not pair."""
        try:
            return kv_layout(*self.io)
        except ValueError as e:
            raise LrcError(f"{self.label}: {e}") from None

    @property
    def is_lm(self) -> bool:
        """A language model: a ``logits`` output, or a KV cache."""
        inputs, outputs = self.io
        return "logits" in outputs or any(is_past(n) for n in inputs)

    # ---------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self) -> Path | None:
        """tokenizer.json: the one given, else the one beside the model (None: neither)."""
        return self._tokenizer

    def need_tokenizer(self, why: str = "") -> Path:
        if self._tokenizer is None:
            where = (f"beside {self.file.name}" if self.file is not None else
                     "for a model in memory (no folder to find it in)")
            raise LrcError(f"no {TOKENIZER} {where}{why}; pass {opt('tokenizer')}")
        return self._tokenizer

    def load_tokenizer(self):
        """A plain ``tokenizers.Tokenizer`` (padding and truncation off), or None."""
        if self._tokenizer is None:
            return None
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(self._tokenizer))
        except Exception as e:
            raise LrcError(f"{self._tokenizer}: not a tokenizers {TOKENIZER} "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        if tok.padding is not None or tok.truncation is not None:
            tok.no_padding()
            tok.no_truncation()
        return tok

    # ---------------------------------------------------------------- configs
    def _side(self, name: str) -> dict:
        return _read_json(self.folder / name) if self.folder is not None else {}

    @cached_property
    def hf_config(self) -> dict:
        """config.json as it is ({} when there is none)."""
        return self._side(CONFIG)

    @cached_property
    def genai_config(self) -> dict:
        return self._side(GENAI_CONFIG)

    @cached_property
    def generation_config(self) -> dict:
        return self._side("generation_config.json")

    @cached_property
    def tokenizer_config(self) -> dict:
        """tokenizer_config.json beside the model, else beside the given tokenizer."""
        cfg = self._side("tokenizer_config.json")
        if not cfg and self._tokenizer is not None:
            cfg = _read_json(self._tokenizer.parent / "tokenizer_config.json")
        return cfg

    @cached_property
    def sentence_config(self) -> dict:
        """sentence_bert_config.json (sentence-transformers' own sequence limit)."""
        return self._side("sentence_bert_config.json")

    @cached_property
    def config(self) -> dict:
        """The model's configuration in config.json's terms: config.json, with what
        genai_config.json says filled in where config.json is silent or absent (the model
        builder writes none): heads, KV heads, head size, hidden size, layers, vocabulary,
        context length, special tokens."""
        cfg = dict(self.hf_config)
        model = self.genai_config.get("model") or {}
        dec = model.get("decoder") or {}
        derived = {
            "num_attention_heads": dec.get("num_attention_heads"),
            "num_key_value_heads": dec.get("num_key_value_heads"),
            "head_dim": dec.get("head_size"),
            "hidden_size": dec.get("hidden_size"),
            "num_hidden_layers": dec.get("num_hidden_layers"),
            "vocab_size": model.get("vocab_size"),
            "max_position_embeddings": model.get("context_length"),
            "bos_token_id": model.get("bos_token_id"),
            "eos_token_id": model.get("eos_token_id"),
            "pad_token_id": model.get("pad_token_id"),
        }
        # The builder's sliding-window GroupQueryAttention runs on a shared past/present buffer
        # that must hold at least the window (Gemma-3: 512) from the first step on
        sw = dec.get("sliding_window")
        share = (self.genai_config.get("search") or {}).get("past_present_share_buffer")
        if share and isinstance(sw, dict) and sw.get("window_size"):
            derived["lrc_kv_capacity"] = int(sw["window_size"])
        for k, v in derived.items():
            if v is not None and k not in cfg:
                cfg[k] = v
        return cfg

    @property
    def has_side_files(self) -> bool:
        """The model sits in an exported folder (a config or tokenizer beside it)."""
        return self.folder is not None and any(
            (self.folder / n).is_file() for n in (CONFIG, TOKENIZER, GENAI_CONFIG))

    # ---------------------------------------------------------------- a file to run
    @contextmanager
    def as_file(self) -> Iterator[Path]:
        """The model's file, or a model in memory written to a temporary folder with the
        configs beside it (what a profile or a runtime reads)."""
        if self._model is None:
            yield self.need_file("running")
            return
        with tempfile.TemporaryDirectory(prefix="lrc-model-") as tmp:
            copy = Path(tmp) / "model.onnx"
            M.save(self._model, copy, external_data=True)
            if self.folder is not None:
                for name in (CONFIG, GENAI_CONFIG):
                    if (self.folder / name).is_file():
                        (Path(tmp) / name).write_bytes((self.folder / name).read_bytes())
            yield copy


def resolve(model, *, tokenizer: str | os.PathLike | None = None,
            origin: str | os.PathLike | None = None) -> ModelRef:
    """The :class:`ModelRef` of ``model``: a ``ModelRef`` (returned as it is, with
    ``tokenizer`` applied when given), a path (a .onnx file or a folder), an ``onnx_ir.Model``
    or an ``onnx.ModelProto`` (``origin``: the file it came from, where its external data,
    tokenizer and configs are; an ``onnx_ir.Model`` read by ``lrc.model.load`` knows its own).
    ``tokenizer``: a tokenizer.json or a folder holding one, instead of the one beside the
    model. LrcError (one line) for anything else."""
    tok = tokenizer_file(tokenizer) if tokenizer is not None else None
    if isinstance(model, ModelRef):
        if tok is not None and tok != model.tokenizer:
            return ModelRef(file=model.file, folder=model.folder, model=model.model,
                            tokenizer=tok, given=model.given)
        return model
    if isinstance(model, (ir.Model, onnx.ModelProto)):
        m = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
        if origin is None and isinstance(model, ir.Model):
            origin = model.meta.get(SOURCE_META)
        file = Path(origin) if origin is not None else None
        folder = file.parent if file is not None else None
        if tok is None and folder is not None and (folder / TOKENIZER).is_file():
            tok = folder / TOKENIZER
        return ModelRef(file=file, folder=folder, model=m, tokenizer=tok,
                        given=str(file) if file is not None else "<in memory>")
    if not isinstance(model, (str, os.PathLike)):
        raise LrcError(f"not a model: {type(model).__name__} (give a .onnx file, a folder, or "
                       "an onnx / onnx_ir model)")
    p = Path(model)
    file = pick_file(p)
    folder = file.parent
    if tok is None and (folder / TOKENIZER).is_file():
        tok = folder / TOKENIZER
    return ModelRef(file=file, folder=folder, model=None, tokenizer=tok, given=str(p))
