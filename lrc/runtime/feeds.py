"""Input feeds for ONNX Runtime sessions of exported transformer models.

Exported models come in a few layouts (optimum's folders, torch.onnx dynamo exports, hand-built
graphs).  This module inspects a session's declared inputs and builds feeds for them:

* ``text_feeds`` turns a batch of token ids into the full feed dict of an encoder (attention_mask,
  token_type_ids) or a causal LM (attention_mask, position_ids and, for models exported "with
  past", zero-length ``past_key_values.N.key/value`` tensors whose head count and head size come
  from the static dims of the session inputs, or from config.json when those dims are symbolic).
* ``random_feeds`` makes plausible inputs for any ONNX model: each symbolic dim gets a size
  (batch-like names 1, past-like 4, sequence-like 8, expressions such as
  ``past_sequence_length + 1`` are evaluated), integer ``*ids`` inputs are drawn below the vocab
  size (found from the embedding Gather that consumes the input), masks are ones, position ids
  count up, floats are standard normal.
* ``random_token_feeds`` is bench's input: random token ids at ``batch x seq`` after a cache of
  ``past_len`` positions (the feeds of ``text_feeds``; other inputs get shapes from their dim
  names), with the cache either zeros or left for the caller to bind (a decode step reuses the
  previous step's ``present.*`` on the device).
* ``load_inputs`` reads batches from .npz files (one per file, checked against the model's
  declared inputs): calibration (``--calib-inputs``) and agreement (``eval --inputs``) of any
  model, text or not.
* ``has_past`` / ``past_names`` / ``present_to_past`` / ``cache_dims`` / ``empty_past``: the one
  decoder (KV-cache) detection of lrc. Cache inputs are ``past_key_values.N.key|value`` (optimum),
  ``past.N.key|value`` or ``past_key.N`` / ``past_value.N`` (:func:`lrc.modelref.is_past`, the one
  parser of cache names); eval, bench, calibration, the update and generate all read them
  through these functions. Cache dims the graph leaves symbolic come from the model's
  configuration (:attr:`lrc.modelref.ModelRef.config`: config.json or genai_config.json).

Sessions come from :mod:`lrc.runtime.session`.

Only numpy, onnx and onnxruntime are used.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrc.errors import LrcError
from lrc.modelref import is_past
from lrc.runtime.session import numpy_dtype

__all__ = [
    "InputSpec",
    "input_specs",
    "is_causal_lm",
    "is_past",
    "past_names",
    "has_past",
    "present_to_past",
    "cache_dims",
    "empty_past",
    "Past",
    "cache_capacity",
    "text_feeds",
    "random_feeds",
    "random_token_feeds",
    "vocab_size",
    "model_config",
    "model_ref",
    "graph_input_specs",
    "input_files",
    "load_inputs",
    "describe_batch",
]

@dataclass(frozen=True)
class InputSpec:
    """One declared input of a session: name, numpy dtype and shape (ints, symbol names or None)."""

    name: str
    dtype: np.dtype
    shape: list


def input_specs(sess) -> list[InputSpec]:
    """The session's inputs as InputSpec(name, dtype, shape)."""
    out = []
    for i in sess.get_inputs():
        out.append(InputSpec(i.name, numpy_dtype(i.type), list(i.shape)))
    return out


def _names(sess, which="inputs") -> list[str]:
    items = sess.get_inputs() if which == "inputs" else sess.get_outputs()
    return [i.name for i in items]


def past_names(sess) -> list[str]:
    """The session's KV-cache inputs, in declaration order."""
    return [n for n in _names(sess) if is_past(n)]


def has_past(sess) -> bool:
    """True when the model takes a KV cache: the one decoder test every lrc command uses."""
    return bool(past_names(sess))


def present_to_past(sess) -> dict[str, str]:
    """``present.N.key`` output -> the KV-cache input it feeds at the next step.

    Names are paired by replacing ``present`` with the past prefix the inputs use; when that
    fails and the counts agree, by position. LrcError when they cannot be paired."""
    pasts = past_names(sess)
    if not pasts:
        return {}
    presents = [n for n in _names(sess, "outputs") if n.startswith("present")]
    out = {}
    for i, o in enumerate(presents):
        cand = next((c for c in (o.replace("present", "past_key_values", 1),
                                 o.replace("present", "past", 1),
                                 o.replace("present_", "past_", 1)) if c in pasts), None)
        if cand is None and len(presents) == len(pasts):
            cand = pasts[i]
        if cand is not None:
            out[o] = cand
    if sorted(out.values()) != sorted(pasts):
        raise LrcError(f"{_model_path(sess) or 'model'}: cannot pair the present.* outputs with "
                       "the KV-cache inputs")
    return out


def is_causal_lm(sess) -> bool:
    """True when the model returns ``logits`` of rank 3 and takes ``input_ids``.

    Encoders (``last_hidden_state``) and classifiers (rank-2 logits) are not causal LMs.
    """
    if "input_ids" not in _names(sess):
        return False
    for o in sess.get_outputs():
        if o.name == "logits" and len(o.shape) == 3:
            return True
    return False


def _model_path(sess) -> Path | None:
    p = getattr(sess, "lrc_path", None) or getattr(sess, "_model_path", None)
    return Path(p) if p else None


def model_ref(sess_or_ref):
    """The :class:`~lrc.modelref.ModelRef` a session was opened on (``session.lrc_ref``), or
    the reference of its file; None when there is neither (a model from bytes)."""
    from lrc.modelref import ModelRef, resolve

    if isinstance(sess_or_ref, ModelRef):
        return sess_or_ref
    if isinstance(sess_or_ref, (str, Path)):
        return resolve(sess_or_ref)
    ref = getattr(sess_or_ref, "lrc_ref", None)
    if ref is not None:
        return ref
    p = _model_path(sess_or_ref)
    return resolve(p) if p is not None and p.is_file() else None


def model_config(sess_or_path) -> dict:
    """The model's configuration (:attr:`lrc.modelref.ModelRef.config`: config.json, with
    genai_config.json's fields where it is silent; an empty dict when there is none)."""
    ref = model_ref(sess_or_path)
    return ref.config if ref is not None else {}


def cache_dims(sess, config: dict | None = None) -> tuple[int, int]:
    """(kv_heads, head_dim) of the KV cache: static dims of the cache inputs, else config.json
    beside the model (``num_key_value_heads`` / ``num_attention_heads`` / ``n_head``,
    ``head_dim`` or ``hidden_size`` / ``n_embd`` over the heads)."""
    heads = head_dim = None
    for i in sess.get_inputs():
        if is_past(i.name) and len(i.shape) == 4:
            if isinstance(i.shape[1], int):
                heads = i.shape[1]
            if isinstance(i.shape[3], int):
                head_dim = i.shape[3]
            break
    cfg = config if config is not None else model_config(sess)
    if heads is None:
        heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or cfg.get("n_head")
    if head_dim is None:
        head_dim = cfg.get("head_dim")
        n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
        hidden = cfg.get("hidden_size") or cfg.get("n_embd")
        if not head_dim and hidden and n_heads:
            head_dim = hidden // n_heads
    if not heads or not head_dim:
        raise LrcError(f"{_model_path(sess) or 'model'}: cannot tell the KV cache shape "
                       "(symbolic dims, and no config.json or genai_config.json beside the model)")
    return int(heads), int(head_dim)


class Past(dict):
    """KV-cache inputs by name, with the number of positions they hold (``length``): a shared
    past/present buffer (the model builder's sliding-window attention) is longer than that."""

    def __init__(self, arrays: dict, length: int):
        super().__init__(arrays)
        self.length = int(length)


def cache_capacity(sess, config: dict | None = None) -> int:
    """Positions a cache buffer must hold from the first step (0: a cache that grows with each
    step): the window of the model builder's sliding-window attention on a shared buffer."""
    cfg = config if config is not None else model_config(sess)
    return int(cfg.get("lrc_kv_capacity") or 0)


def empty_past(sess, batch: int = 1, past_len: int = 0, config: dict | None = None,
               capacity: int = 0) -> Past:
    """Zero KV-cache inputs of ``past_len`` positions (0: an empty cache) for every cache input;
    a model that needs a shared buffer (:func:`cache_capacity`) gets one of at least that many
    positions and ``capacity`` (the longest sequence the caller will run)."""
    specs = {s.name: s for s in input_specs(sess)}
    need = cache_capacity(sess, config)
    size = max(need, capacity, past_len) if need else past_len
    out = {}
    for name in past_names(sess):
        spec = specs[name]
        if len(spec.shape) != 4:
            raise LrcError(f"unsupported KV-cache layout for {name}: shape {spec.shape}")
        heads, head_dim = cache_dims(sess, config)
        out[name] = np.zeros((batch, heads, size, head_dim), spec.dtype)
    return Past(out, past_len)


def _past_len(past: dict | None) -> int:
    if not past:
        return 0
    if isinstance(past, Past):
        return past.length
    first = next(iter(past.values()))
    return int(first.shape[2])


def text_feeds(sess, input_ids, attention_mask=None, past=None, config: dict | None = None, *,
               past_len: int | None = None, fill_other=None) -> dict:
    """Feeds for a text model from token ids of shape (batch, seq).

    attention_mask defaults to ones over past + seq; token_type_ids are zeros; position_ids
    count the attended positions (cumsum of the mask - 1) for the last ``seq`` positions;
    missing ``past_key_values.*`` are zero-length (past_len 0) unless ``past`` maps their names
    to arrays (e.g. the previous call's ``present.*`` renamed); arrays of ``past`` already of
    the input's dtype are fed as they are, not copied.

    ``past_len``: the cache length when the caller binds the cache itself (IO binding of the
    previous step's outputs); cache inputs not in ``past`` are then left out of the feeds.
    ``fill_other(spec) -> array`` fills inputs this function does not know (default: LrcError).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, seq = ids.shape
    plen = _past_len(past) if past_len is None else int(past_len)
    past = dict(past or {})
    mask = np.ones((batch, plen + seq), np.int64) if attention_mask is None else np.asarray(attention_mask)
    specs = {s.name: s for s in input_specs(sess)}
    feeds = {}
    for name, spec in specs.items():
        if name == "input_ids":
            feeds[name] = ids.astype(spec.dtype)
        elif name == "attention_mask":
            feeds[name] = mask.astype(spec.dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), spec.dtype)
        elif name == "position_ids":
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -seq:]
            feeds[name] = pos.astype(spec.dtype)
        elif is_past(name):
            if name in past:
                feeds[name] = np.asarray(past[name]).astype(spec.dtype, copy=False)
            elif past_len is None:
                heads, head_dim = cache_dims(sess, config)
                need = cache_capacity(sess, config)
                feeds[name] = np.zeros((batch, heads, max(need, seq) if need else 0, head_dim),
                                       spec.dtype)
        elif name == "use_cache_branch":
            feeds[name] = np.array([plen > 0])
        elif fill_other is not None:
            feeds[name] = fill_other(spec)
        else:
            raise LrcError(f"text_feeds: don't know how to fill input {name!r}")
    return feeds


def vocab_size(sess, config: dict | None = None) -> int | None:
    """Token vocabulary of a text model: ``vocab_size`` of config.json beside it, else the rows
    of the embedding table that a Gather indexes with ``input_ids``; None when neither says."""
    cfg = config if config is not None else model_config(sess)
    v = cfg.get("vocab_size")
    if isinstance(v, int) and v > 0:
        return v
    return _gather_vocab(_model_path(sess)).get("input_ids")


def random_token_feeds(sess, batch: int, seq: int, past_len: int = 0, *, rng: np.random.Generator,
                       vocab: int | None = None, config: dict | None = None,
                       with_past: bool = True) -> dict:
    """Feeds for timing a text model at ``batch x seq`` after a cache of ``past_len`` positions.

    Token ids are drawn by ``rng`` in [1, vocab) (``vocab`` default: :func:`vocab_size`, else
    100); attention mask, position ids, token types and ``use_cache_branch`` are those of
    :func:`text_feeds`. ``with_past``: the cache inputs are zeros of ``past_len`` positions;
    otherwise they are left out (the caller binds the previous step's ``present.*``). Any other
    input gets its static dims, and for symbolic ones: names with "batch" -> batch, "past" with
    "+" or "total" -> past_len + seq, "past" -> past_len, "total" -> past_len + seq, anything
    else -> seq; floats are standard normal, booleans true, integers 0 or 1.
    """
    cfg = config if config is not None else model_config(sess)
    if vocab is None:
        vocab = vocab_size(sess, cfg) or 100
    ids = rng.integers(1, max(2, int(vocab)), size=(batch, seq))

    def dim(d) -> int:
        if isinstance(d, int):
            return d
        s = str(d or "").lower()
        if "batch" in s:
            return batch
        if "past" in s:
            return past_len + seq if ("+" in s or "total" in s) else past_len
        return past_len + seq if "total" in s else seq

    def other(spec: InputSpec) -> np.ndarray:
        shape = [dim(d) for d in spec.shape]
        if np.issubdtype(spec.dtype, np.floating):
            return rng.standard_normal(shape).astype(spec.dtype)
        if spec.dtype == np.bool_:
            return np.ones(shape, dtype=spec.dtype)
        return rng.integers(0, 2, size=shape).astype(spec.dtype)

    past = empty_past(sess, batch, past_len, cfg) if with_past else None
    return text_feeds(sess, ids, past=past, config=cfg,
                      past_len=None if with_past else past_len, fill_other=other)


# ----------------------------------------------------------------------------- random feeds

_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
            ast.FloorDiv: operator.floordiv, ast.Div: operator.floordiv, ast.Mod: operator.mod}


def _eval_dim(expr: str, env: dict[str, int]) -> int | None:
    """Evaluate a symbolic dim like 'past_sequence_length + 1' (None when a name is unknown)."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise KeyError(node.id)
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            return _BIN_OPS[type(node.op)](ev(node.left), ev(node.right))
        raise KeyError(ast.dump(node))

    try:
        return int(ev(tree))
    except (KeyError, ZeroDivisionError):
        return None


def _default_for_symbol(sym: str, input_name: str, axis: int) -> int:
    s = sym.lower()
    if "batch" in s:
        return 1
    if "past" in s or "cache" in s:
        return 4
    if "seq" in s or "length" in s or "len" in s or "token" in s:
        return 8
    if is_past(input_name):
        return 1 if axis == 0 else 4
    return 1 if axis == 0 else 8


def _symbols(expr: str) -> list[str]:
    return re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr)


def resolve_dims(specs: list[InputSpec], dims: dict[str, int] | None = None) -> dict[str, int]:
    """Sizes for every symbolic dim name used by ``specs`` (user ``dims`` win)."""
    env = dict(dims or {})
    for spec in specs:
        for axis, d in enumerate(spec.shape):
            if isinstance(d, str):
                for sym in _symbols(d):
                    if sym not in env:
                        env[sym] = _default_for_symbol(sym, spec.name, axis)
    return env


def _shape(spec: InputSpec, env: dict[str, int]) -> list[int]:
    out = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int) and d >= 0:
            out.append(d)
        elif isinstance(d, str) and d:
            v = env.get(d)
            if v is None:
                v = _eval_dim(d, env)
            out.append(v if v is not None else _default_for_symbol(d, spec.name, axis))
        else:
            out.append(_default_for_symbol("", spec.name, axis))
    return out


def _gather_vocab(path: Path | None) -> dict[str, int]:
    """Vocab size per graph input: rows of the initializer that a Gather indexes with it."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        from lrc.graph.model import load_proto

        model = load_proto(path)[0]  # the graph: a large single file's weights are not read
    except Exception:
        return {}
    g = model.graph
    inits = {t.name: list(t.dims) for t in g.initializer}
    inputs = {i.name for i in g.input}
    out = {}
    for node in g.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs:
            dims = inits.get(node.input[0])
            if dims:
                out.setdefault(node.input[1], int(dims[0]))
    return out


def random_feeds(sess, dims: dict[str, int] | None = None, seed: int = 0,
                 vocab_size: int | None = None) -> dict:
    """Plausible random inputs for any ONNX model (see the module docstring for the rules)."""
    rng = np.random.default_rng(seed)
    specs = input_specs(sess)
    env = resolve_dims(specs, dims)
    if has_past(sess):
        _decoder_dims(sess, specs, env, set(dims or ()))
    shapes = {s.name: _shape(s, env) for s in specs}
    past_len = next((shapes[s.name][2] for s in specs
                     if is_past(s.name) and len(s.shape) == 4), 0)
    vocab = {}
    if vocab_size is None:
        vocab = _gather_vocab(_model_path(sess))
        vocab_size = model_config(sess).get("vocab_size")
    feeds = {}
    for spec in specs:
        shape = shapes[spec.name]
        if spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            v = vocab.get(spec.name) or vocab_size
            feeds[spec.name] = _random_int(spec, shape, rng, v, past_len)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def _decoder_dims(sess, specs: list[InputSpec], env: dict[str, int], given: set[str]) -> None:
    """A decoder's symbolic dims that only agree with each other one way: the cache's heads and
    head size (a model builder's ``kv_cache_dim``) from :func:`cache_dims`, and a total length
    (``total_sequence_length``: the mask of a GroupQueryAttention graph) = past + sequence."""
    heads, head_dim = cache_dims(sess)
    for spec in specs:
        if is_past(spec.name) and len(spec.shape) == 4:
            for axis, value in ((1, heads), (3, head_dim)):
                d = spec.shape[axis]
                if isinstance(d, str) and d not in given:
                    env[d] = value
    past = next((v for k, v in env.items() if "past" in k.lower() and "total" not in k.lower()), 0)
    seq = next((v for k, v in env.items() if "seq" in k.lower() and "past" not in k.lower()
                and "total" not in k.lower()), 8)
    for k in env:
        if "total" in k.lower() and k not in given:
            env[k] = past + seq


def _random_int(spec: InputSpec, shape: list[int], rng, vocab: int | None,
                past_len: int = 0) -> np.ndarray:
    name = spec.name.lower()
    if "mask" in name:
        return np.ones(shape, spec.dtype)
    if "position" in name:
        seq = shape[-1] if shape else 1
        return np.broadcast_to(np.arange(past_len, past_len + seq), shape).astype(spec.dtype).copy()
    if "type" in name:
        return np.zeros(shape, spec.dtype)
    if name.endswith("ids") or name.endswith("_id") or name == "ids":
        high = int(vocab) if vocab else 100
        return rng.integers(0, max(high, 1), size=shape).astype(spec.dtype)
    return np.zeros(shape, spec.dtype)


# --------------------------------------------------------------------------------------------
# Inputs from files (.npz): calibration and evaluation of any model, text or not
# --------------------------------------------------------------------------------------------

def graph_input_specs(model) -> list[InputSpec]:
    """The declared inputs of an ONNX model (``onnx_ir.Model``, ``onnx.ModelProto`` or a file)
    as InputSpec(name, numpy dtype, shape with ints or symbol names) — what a session would
    report, read from the graph without building one."""
    import onnx
    import onnx_ir as ir

    if not isinstance(model, (ir.Model, onnx.ModelProto)):
        from lrc.graph.model import load_proto

        model = load_proto(model)[0]
    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        out = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim]
            out.append(InputSpec(vi.name, dtype, shape))
        return out
    out = []
    for v in model.graph.inputs:
        if v.const_value is not None:
            continue
        dtype = np.dtype(v.dtype.numpy()) if v.dtype is not None else np.dtype(np.float32)
        shape = [d if isinstance(d, int) else (d.value if d.value else None)
                 for d in (v.shape or [])]
        out.append(InputSpec(v.name, dtype, shape))
    return out


def input_files(paths) -> list[Path]:
    """The .npz files ``paths`` name: files, or folders of them (sorted by name)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix == ".npz" and f.is_file())
            if not found:
                raise LrcError(f"{p}: folder holds no .npz input files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise LrcError(f"{p}: no such input file or folder")
    if not files:
        raise LrcError("no input files given")
    return files


def _read_npz(f: Path) -> dict[str, np.ndarray]:
    import zipfile
    import zlib

    with open(f, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise LrcError(f"{f}: not a readable .npz file (not a zip archive; save inputs with "
                           "numpy.savez)")
    try:
        with np.load(f, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    # a corrupt member: bad deflate data (zlib.error), an unknown compression method
    # (NotImplementedError), an encrypted one (RuntimeError)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, OSError,
            EOFError) as e:
        raise LrcError(f"{f}: not a readable .npz file ({str(e).strip() or type(e).__name__})")
    except ValueError as e:  # object arrays need pickle: refused
        raise LrcError(f"{f}: holds an array lrc will not read ({str(e).splitlines()[0]}); "
                       "save plain numeric arrays (numpy.savez)")


def _check_input(f: Path, spec: InputSpec, a: np.ndarray) -> None:
    if a.dtype != spec.dtype:
        raise LrcError(f"{f}: input {spec.name!r} is {a.dtype}, the model takes {spec.dtype}")
    if spec.shape and a.ndim != len(spec.shape):
        want = "x".join(str(d) if isinstance(d, int) else str(d or "?") for d in spec.shape)
        raise LrcError(f"{f}: input {spec.name!r} has shape {'x'.join(map(str, a.shape))}, "
                       f"the model takes {want}")
    for axis, (d, n) in enumerate(zip(spec.shape, a.shape)):
        if isinstance(d, int) and d > 0 and d != n:
            raise LrcError(f"{f}: input {spec.name!r} has {n} on axis {axis}, the model takes {d}")
    if a.size == 0:
        raise LrcError(f"{f}: input {spec.name!r} is empty")


def load_inputs(paths, specs: list[InputSpec]) -> list[dict[str, np.ndarray] | np.ndarray]:
    """Batches read from .npz files (``numpy.savez(f, pixel_values=x, ...)``; a folder of them),
    one batch per file, checked against the model's inputs ``specs`` (names, dtypes, ranks,
    fixed dims) with one line per problem. A file must hold every input the model declares,
    except for text models, where ``input_ids`` alone is a token-id batch the feed builder
    (:func:`text_feeds`) completes (mask, positions, empty cache). Arrays with pickled objects
    are refused (``allow_pickle=False``)."""
    by_name = {s.name: s for s in specs}
    out: list = []
    for f in input_files(paths):
        arrays = _read_npz(f)
        unknown = sorted(set(arrays) - set(by_name))
        if unknown:
            raise LrcError(f"{f}: {', '.join(map(repr, unknown))} is not an input of the model "
                           f"(its inputs: {', '.join(by_name)})")
        if set(arrays) == {"input_ids"} and len(by_name) > 1:
            _check_input(f, by_name["input_ids"], arrays["input_ids"])
            out.append(arrays["input_ids"].astype(np.int64))
            continue
        missing = [n for n in by_name if n not in arrays]
        if missing:
            raise LrcError(f"{f}: missing input(s) {', '.join(map(repr, missing))} "
                           f"(it holds {', '.join(arrays) or 'no arrays'})")
        for name, a in arrays.items():
            _check_input(f, by_name[name], a)
        out.append(arrays)
    return out


def describe_batch(batch) -> str:
    """``pixel_values 2x3x224x224`` / ``input_ids 1x128``: what a batch holds, as it is."""
    if not isinstance(batch, dict):
        return "input_ids " + "x".join(map(str, np.shape(batch)))
    return ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}" for k, v in batch.items())
