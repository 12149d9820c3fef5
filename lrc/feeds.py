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
* ``session`` opens an InferenceSession with intra-op thread spinning off, so several live
  sessions in one process do not steal cores from each other.

Only numpy, onnx and onnxruntime are used.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrc.errors import LrcError

__all__ = [
    "InputSpec",
    "session",
    "input_specs",
    "is_causal_lm",
    "has_past",
    "text_feeds",
    "random_feeds",
    "model_config",
]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(bfloat16)": np.float32,  # best effort: numpy has no bfloat16
}

_PAST_RE = re.compile(r"^past_key_values[._](\d+)[._](key|value)$")


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a session: name, numpy dtype and shape (ints, symbol names or None)."""

    name: str
    dtype: np.dtype
    shape: list


def session(path, threads: int | None = None, providers=None):
    """Open an ``onnxruntime.InferenceSession`` with thread spinning off.

    ``path`` is a .onnx file or a folder holding model.onnx.  ``threads`` sets intra-op threads
    (None: ORT's default).  The session remembers its file as ``session.lrc_path``.
    """
    import onnxruntime as ort

    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise LrcError(f"no ONNX model at {path}")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    try:
        sess = ort.InferenceSession(str(p), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise LrcError(f"onnxruntime cannot load {p}: {str(e).splitlines()[0]}") from e
    sess.lrc_path = str(p)
    return sess


def input_specs(sess) -> list[InputSpec]:
    """The session's inputs as InputSpec(name, dtype, shape)."""
    out = []
    for i in sess.get_inputs():
        dtype = np.dtype(_ORT_TYPES.get(i.type, np.float32))
        out.append(InputSpec(i.name, dtype, list(i.shape)))
    return out


def _names(sess, which="inputs") -> list[str]:
    items = sess.get_inputs() if which == "inputs" else sess.get_outputs()
    return [i.name for i in items]


def has_past(sess) -> bool:
    """True when the model takes a KV cache (``past_key_values.N.key/value`` inputs)."""
    return any(_PAST_RE.match(n) for n in _names(sess))


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


def model_config(sess_or_path) -> dict:
    """config.json beside the model (empty dict when there is none)."""
    p = sess_or_path if isinstance(sess_or_path, (str, Path)) else _model_path(sess_or_path)
    if p is None:
        return {}
    p = Path(p)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}


def _cache_dims(sess, config: dict | None) -> tuple[int, int]:
    """(kv_heads, head_dim) of the KV cache, from static input dims or config.json."""
    heads = head_dim = None
    for i in sess.get_inputs():
        if _PAST_RE.match(i.name) and len(i.shape) == 4:
            if isinstance(i.shape[1], int):
                heads = i.shape[1]
            if isinstance(i.shape[3], int):
                head_dim = i.shape[3]
            break
    cfg = config if config is not None else model_config(sess)
    if heads is None:
        heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    if head_dim is None:
        head_dim = cfg.get("head_dim")
        if not head_dim and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
            head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if not heads or not head_dim:
        raise LrcError("cannot tell the KV cache shape: symbolic dims and no config.json")
    return int(heads), int(head_dim)


def _past_len(past: dict | None) -> int:
    if not past:
        return 0
    first = next(iter(past.values()))
    return int(first.shape[2])


def text_feeds(sess, input_ids, attention_mask=None, past=None, config: dict | None = None) -> dict:
    """Feeds for a text model from token ids of shape (batch, seq).

    attention_mask defaults to ones over past + seq; token_type_ids are zeros; position_ids
    count the attended positions (cumsum of the mask - 1) for the last ``seq`` positions;
    missing ``past_key_values.*`` are zero-length (past_len 0) unless ``past`` maps their names
    to arrays (e.g. the previous call's ``present.*`` renamed).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, seq = ids.shape
    past = dict(past or {})
    plen = _past_len(past)
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
        elif _PAST_RE.match(name):
            if name in past:
                feeds[name] = np.asarray(past[name]).astype(spec.dtype)
            else:
                heads, head_dim = _cache_dims(sess, config)
                feeds[name] = np.zeros((batch, heads, 0, head_dim), spec.dtype)
        elif name == "use_cache_branch":
            feeds[name] = np.array([plen > 0])
        else:
            raise LrcError(f"text_feeds: don't know how to fill input {name!r}")
    return feeds


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
    if _PAST_RE.match(input_name):
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
        import onnx

        model = onnx.load(str(path), load_external_data=False)
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
    shapes = {s.name: _shape(s, env) for s in specs}
    past_len = next((shapes[s.name][2] for s in specs
                     if _PAST_RE.match(s.name) and len(s.shape) == 4), 0)
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
