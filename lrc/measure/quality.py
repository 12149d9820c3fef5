"""Quality evaluation of ONNX transformer models, original against compressed.

Everything runs with onnxruntime + numpy + ``tokenizers``; no torch, no network.

Causal LMs: perplexity with sliding windows.  The text is tokenized once without special
tokens; the first ``max_tokens`` tokens are cut into windows of ``context`` positions.  If the
tokenizer starts a text with BOS (its post-processor adds a leading special token, or
tokenizer_config.json says ``add_bos_token``), every window starts with BOS followed by
``context - 1`` text tokens, and every text token of the window is scored (the first one is
predicted from BOS).  Without BOS a window holds ``context`` text tokens and its first token is
not scored.  Windows advance by ``stride`` text tokens (capped at the window's text length); with
overlapping windows only the tokens not scored by the previous window are scored, so each token
is scored once, with the most context.  Only full windows are used.  The convention used is
stated in every result (``bos``): a model trained with BOS scores ~5x worse without it.

``compare_lm`` runs both models on the same windows and reports, on the scored positions, both
perplexities, the mean KL(orig || new) of the next-token distributions, top-1 agreement and the
mean cosine of the logit vectors.

Encoders: sentence embeddings are the attention-masked mean of ``last_hidden_state``.
``compare_encoder`` reports the cosine between original and new embeddings and, on the Lee 2005
corpus, the Pearson correlation between the embeddings' cosine similarities and the human
ratings over the 1225 document pairs (dense all-MiniLM-L6-v2: 0.656).

``layer_drift`` exposes intermediate tensors (the low-rank rewrite keeps each rewritten node's
output name) as extra graph outputs of both models, runs the same feeds and reports the cosine
and the relative norm of the difference per tensor, worst first.

``evaluate`` picks the right comparison for the model kind and runs it on an in-domain text
(news) and on an out-of-domain one (Python documentation, absent from calibration).
"""

from __future__ import annotations

import json as _json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrc.runtime import feeds as _feeds
from lrc.errors import LrcError
from lrc.runtime.session import open_session

__all__ = [
    "Model",
    "load_model",
    "load_tokenizer",
    "bos_convention",
    "lm_windows",
    "perplexity",
    "compare_lm",
    "embed",
    "lee_pearson",
    "compare_encoder",
    "layer_drift",
    "default_drift_tensors",
    "evaluate",
    "format_table",
]


# ----------------------------------------------------------------------------- loading


@dataclass
class Model:
    """An ONNX model ready to run: file, session, tokenizer (or None) and config.json."""

    path: Path
    session: object
    tokenizer: object
    config: dict

    @property
    def is_lm(self) -> bool:
        return _feeds.is_causal_lm(self.session)


def _onnx_file(path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise LrcError(f"no ONNX model at {path} (give a .onnx file or a folder with model.onnx)")
    return p


def load_tokenizer(tokenizer=None, model_file: Path | None = None):
    """A ``tokenizers.Tokenizer``: given, from a tokenizer.json / folder path, or beside the model."""
    from tokenizers import Tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return _plain(tokenizer)
    if tokenizer is not None:
        p = Path(tokenizer)
        p = p / "tokenizer.json" if p.is_dir() else p
    elif model_file is not None:
        p = Path(model_file).parent / "tokenizer.json"
        if not p.is_file():
            return None
    else:
        return None
    if not p.is_file():
        raise LrcError(f"no tokenizer.json at {p}")
    return _plain(Tokenizer.from_file(str(p)))


def _plain(tok):
    """A copy of ``tok`` with padding and truncation off: lrc cuts windows itself.

    (Exported tokenizer.json files often pad and truncate to 128, which silently shortens
    texts and, with an all-ones mask, pollutes mean pooling.)
    """
    from tokenizers import Tokenizer

    if tok.padding is None and tok.truncation is None:
        return tok
    tok = Tokenizer.from_str(tok.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_model(model, tokenizer=None, threads: int | None = None) -> Model:
    """Open a .onnx file or an optimum-layout folder (model.onnx + tokenizer.json + config.json)."""
    if isinstance(model, Model):
        return model
    f = _onnx_file(model)
    sess = open_session(f, threads=threads)
    return Model(f, sess, load_tokenizer(tokenizer, f), _feeds.model_config(f))


def _need_tokenizer(m: Model):
    if m.tokenizer is None:
        raise LrcError(f"no tokenizer for {m.path}: put tokenizer.json beside it or pass tokenizer=")
    return m.tokenizer


def _resolve_text(text) -> tuple[str, str]:
    """(text, label): a name from lrc.data, or the text itself."""
    from lrc import data

    if isinstance(text, str) and text in data.list_texts():
        return data.load_text(text), text
    if not isinstance(text, str) or not text.strip():
        raise LrcError("empty text")
    return text, f"custom ({len(text)} chars)"


# ----------------------------------------------------------------------------- BOS


def _tokenizer_config(m: Model) -> dict:
    p = m.path.parent / "tokenizer_config.json"
    try:
        return _json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}


def bos_convention(m: Model, bos="auto") -> tuple[int | None, str]:
    """(BOS id or None, one-line description of the convention).

    ``bos``: 'auto' (follow the tokenizer), True (config's bos_token_id), False, or an int id.
    """
    tok = _need_tokenizer(m)
    if bos is False:
        return None, "no BOS (forced)"
    if isinstance(bos, (int, np.integer)) and not isinstance(bos, bool):
        return int(bos), f"BOS id {int(bos)} prepended (given)"
    probe = "Hello world"
    plain = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:len(plain) + 1] == plain:
        bid = full[0]
        return bid, f"BOS {tok.id_to_token(bid)!r} (id {bid}) prepended: the tokenizer adds it"
    tcfg = _tokenizer_config(m)
    cfg_bos = tcfg.get("bos_token_id", m.config.get("bos_token_id"))
    if tcfg.get("add_bos_token") and cfg_bos is not None:
        return int(cfg_bos), f"BOS id {cfg_bos} prepended: tokenizer_config add_bos_token"
    if bos is True:
        if cfg_bos is None:
            raise LrcError("bos=True but the model's config has no bos_token_id")
        return int(cfg_bos), f"BOS id {cfg_bos} prepended (forced)"
    return None, "no BOS: the tokenizer adds none"


# ----------------------------------------------------------------------------- LM windows


@dataclass
class Windows:
    """Token windows over a text: inputs (n, L) and, per window, the scored input positions."""

    inputs: np.ndarray  # (n_windows, window_len) int64
    first_scored: np.ndarray  # (n_windows,) first scored *input* position (targets)
    context: int
    stride: int
    text_tokens: int
    bos_id: int | None
    bos: str

    @property
    def scored_tokens(self) -> int:
        return int(sum(self.inputs.shape[1] - f for f in self.first_scored))


def lm_windows(ids, context: int, stride: int, bos_id: int | None, bos_desc: str = "") -> Windows:
    """Cut token ids into full windows (see the module docstring for the convention)."""
    ids = np.asarray(ids, np.int64)
    off = 1 if bos_id is not None else 0
    span = context - off  # text tokens per window
    if span < 2:
        raise LrcError(f"context {context} too short")
    stride = max(1, min(int(stride), span))
    if len(ids) < span:
        raise LrcError(f"text has {len(ids)} tokens, fewer than one window ({span})")
    starts = range(0, len(ids) - span + 1, stride)
    rows, firsts, prev_end = [], [], 0
    for s in starts:
        row = ids[s:s + span]
        rows.append(np.concatenate([[bos_id], row]) if off else row)
        first_text = max(prev_end, s + (0 if off else 1))
        firsts.append(first_text - s + off)
        prev_end = s + span
    return Windows(np.stack(rows).astype(np.int64), np.array(firsts), context, stride,
                   int(prev_end), bos_id, bos_desc)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def _lm_logits(m: Model, row: np.ndarray) -> np.ndarray:
    f = _feeds.text_feeds(m.session, row[None, :], config=m.config)
    out = m.session.run(["logits"], f)[0]
    return out[0]


def _make_windows(m: Model, text: str, context: int, stride: int, max_tokens: int | None,
                  bos) -> Windows:
    tok = _need_tokenizer(m)
    ids = tok.encode(text, add_special_tokens=False).ids
    if max_tokens:
        ids = ids[:max_tokens]
    bid, desc = bos_convention(m, bos)
    return lm_windows(ids, context, stride, bid, desc)


def _window_meta(w: Windows, label: str) -> dict:
    return {"text": label, "context": w.context, "stride": w.stride, "windows": len(w.inputs),
            "tokens": w.scored_tokens, "text_tokens": w.text_tokens, "bos": w.bos}


def perplexity(model, text="news", tokenizer=None, context: int = 256, stride: int = 256,
               max_tokens: int | None = 4096, bos="auto", threads: int | None = None) -> dict:
    """Perplexity of a causal LM on ``text`` (an lrc.data name or a string) with sliding windows."""
    m = load_model(model, tokenizer, threads)
    if not m.is_lm:
        raise LrcError(f"{m.path} is not a causal LM (no rank-3 'logits' output)")
    body, label = _resolve_text(text)
    w = _make_windows(m, body, context, stride, max_tokens, bos)
    nll = 0.0
    for row, first in zip(w.inputs, w.first_scored):
        lp = _log_softmax(_lm_logits(m, row))
        tgt = row[first:]
        nll -= float(lp[np.arange(first - 1, len(row) - 1), tgt].astype(np.float64).sum())
    mean = nll / w.scored_tokens
    return {"model": str(m.path), "perplexity": math.exp(mean), "nll": mean, **_window_meta(w, label)}


def _kl_stats(lp_o: np.ndarray, lp_n: np.ndarray, lo: np.ndarray, ln: np.ndarray) -> dict:
    """Per-position sums of KL(o||n), top-1 agreement and logit cosine (float32 math,
    float64 sums)."""
    kl = (np.exp(lp_o) * (lp_o - lp_n)).sum(axis=-1, dtype=np.float64)
    agree = lo.argmax(-1) == ln.argmax(-1)
    dot = np.einsum("ij,ij->i", lo, ln, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", lo, lo, dtype=np.float64)
                    * np.einsum("ij,ij->i", ln, ln, dtype=np.float64))
    cos = dot / (norms + 1e-30)
    return {"kl": float(kl.sum()), "top1": float(agree.sum()), "cos": float(cos.sum())}


def compare_lm(orig, new, text="news", tokenizer=None, context: int = 256, stride: int = 256,
               max_tokens: int | None = 4096, bos="auto", threads: int | None = None) -> dict:
    """Both perplexities, mean KL(orig||new), top-1 agreement and logit cosine on the same windows.

    The windows (and the BOS convention) come from the original model's tokenizer; each window
    is run through both models in turn.
    """
    mo = load_model(orig, tokenizer, threads)
    mn = load_model(new, tokenizer or mo.tokenizer, threads)
    for m in (mo, mn):
        if not m.is_lm:
            raise LrcError(f"{m.path} is not a causal LM (no rank-3 'logits' output)")
    body, label = _resolve_text(text)
    w = _make_windows(mo, body, context, stride, max_tokens, bos)
    nll_o = nll_n = 0.0
    acc = {"kl": 0.0, "top1": 0.0, "cos": 0.0}
    for row, first in zip(w.inputs, w.first_scored):
        lo = _lm_logits(mo, row)[first - 1:len(row) - 1]
        ln = _lm_logits(mn, row)[first - 1:len(row) - 1]
        if lo.shape != ln.shape:
            raise LrcError(f"logits shapes differ: {lo.shape} vs {ln.shape}")
        lp_o, lp_n = _log_softmax(lo), _log_softmax(ln)
        tgt = row[first:]
        pos = np.arange(len(tgt))
        nll_o -= float(lp_o[pos, tgt].astype(np.float64).sum())
        nll_n -= float(lp_n[pos, tgt].astype(np.float64).sum())
        for k, v in _kl_stats(lp_o, lp_n, lo, ln).items():
            acc[k] += v
    n = w.scored_tokens
    ppl_o, ppl_n = math.exp(nll_o / n), math.exp(nll_n / n)
    return {"orig": {"model": str(mo.path), "perplexity": ppl_o, "nll": nll_o / n},
            "new": {"model": str(mn.path), "perplexity": ppl_n, "nll": nll_n / n},
            "ppl_ratio": ppl_n / ppl_o, "kl": acc["kl"] / n, "top1_agreement": acc["top1"] / n,
            "logits_cosine": acc["cos"] / n, **_window_meta(w, label)}


# ----------------------------------------------------------------------------- encoders


def _hidden_output(m: Model) -> str:
    outs = m.session.get_outputs()
    for o in outs:
        if o.name == "last_hidden_state":
            return o.name
    for o in outs:
        if len(o.shape) == 3:
            return o.name
    raise LrcError(f"{m.path} has no rank-3 hidden-state output to pool")


def _max_length(m: Model, max_length: int | None) -> int:
    if max_length:
        return int(max_length)
    st = m.path.parent / "sentence_bert_config.json"  # sentence-transformers' own limit
    if st.is_file():
        try:
            return int(_json.loads(st.read_text())["max_seq_length"])
        except (ValueError, KeyError, TypeError):
            pass
    return int(m.config.get("max_position_embeddings") or 512)


def embed(model, sentences: list[str], tokenizer=None, max_length: int | None = None,
          threads: int | None = None) -> np.ndarray:
    """Mean-pooled (attention-masked) last hidden states, one row per sentence, float64.

    Sentences are encoded with the tokenizer's special tokens, truncated to ``max_length``
    (default: sentence_bert_config.json max_seq_length, else config max_position_embeddings,
    else 512), one at a time (no padding).
    """
    m = load_model(model, tokenizer, threads)
    tok = _need_tokenizer(m)
    out_name = _hidden_output(m)
    limit = _max_length(m, max_length)
    rows = []
    for s in sentences:
        ids = tok.encode(s, add_special_tokens=True).ids
        if len(ids) > limit:
            ids = ids[:limit - 1] + ids[-1:]  # keep the closing special token ([SEP])
        f = _feeds.text_feeds(m.session, np.array([ids], np.int64), config=m.config)
        h = m.session.run([out_name], f)[0][0].astype(np.float64)
        rows.append(h.mean(axis=0))
    return np.stack(rows)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def _pearson_with_human(emb: np.ndarray, human: np.ndarray) -> float:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = e @ e.T
    iu = np.triu_indices(len(human), 1)
    return float(np.corrcoef(sims[iu], human[iu])[0, 1])


def lee_pearson(model, tokenizer=None, max_length: int | None = None) -> float:
    """Pearson r between embedding cosine similarities and Lee 2005 human ratings (1225 pairs)."""
    from lrc import data

    docs, human = data.lee_similarity()
    return _pearson_with_human(embed(model, docs, tokenizer, max_length), human)


def _passages(text: str, n: int, size: int = 600) -> list[str]:
    """Up to ``n`` passages of ~``size`` characters, cut at paragraph boundaries."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            out.append(cur[: size * 2])
            cur = ""
        if len(out) >= n:
            break
    return out or [text[:size]]


def compare_encoder(orig, new, sentences=None, tokenizer=None, max_length: int | None = None,
                    threads: int | None = None) -> dict:
    """Embedding cosine (orig vs new) and, on Lee (the default sentences), both Pearson r."""
    from lrc import data

    mo = load_model(orig, tokenizer, threads)
    mn = load_model(new, tokenizer or mo.tokenizer, threads)
    human = None
    label = "custom"
    if sentences is None:
        sentences, human = data.lee_similarity()
        label = "lee"
    elif isinstance(sentences, str):
        body, label = _resolve_text(sentences)
        sentences = _passages(body, 64)
    eo = embed(mo, sentences, max_length=max_length)
    en = embed(mn, sentences, max_length=max_length)
    cos = _cosine_rows(eo, en)
    res = {"orig": {"model": str(mo.path)}, "new": {"model": str(mn.path)}, "text": label,
           "sentences": len(sentences), "max_length": _max_length(mo, max_length),
           "embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min())}
    if human is not None:
        res["orig"]["lee_pearson"] = _pearson_with_human(eo, human)
        res["new"]["lee_pearson"] = _pearson_with_human(en, human)
    return res


# ----------------------------------------------------------------------------- layer drift


def _value_types(model) -> dict[str, int]:
    import onnx

    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:
        inferred = g.value_info
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred})
    return types


def _node_outputs(model) -> set[str]:
    return {o for n in model.graph.node for o in n.output if o}


def _session_with_outputs(path: Path, names: list[str], threads: int | None, tmp: Path):
    """A session on the model at ``path`` with ``names`` added as graph outputs."""
    import onnx

    model = onnx.load(str(path))
    present = _node_outputs(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise LrcError(f"{path.name} has no tensor {missing[0]!r} (and {len(missing) - 1} more)")
    types = _value_types(model)
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                n, types.get(n) or onnx.TensorProto.FLOAT, None))
    out = tmp / f"{path.stem}_{len(list(tmp.iterdir()))}.onnx"
    onnx.save_model(model, str(out), save_as_external_data=model.ByteSize() > 1_900_000_000)
    return open_session(out, threads=threads)


def default_drift_tensors(orig, new) -> list[str]:
    """Outputs of the original's weight MatMul/Gemm nodes (weight a constant, possibly through a
    Transpose as a tied lm_head reads it: the projections, not attention's activation products)
    that the new model also produces."""
    import onnx

    from lrc.graph.locate import weight_matmul_nodes

    mo = onnx.load(str(_onnx_file(orig)), load_external_data=False)
    mn = onnx.load(str(_onnx_file(new)), load_external_data=False)
    new_outs = _node_outputs(mn)
    return [w.output for w in weight_matmul_nodes(mo)
            if w.op in ("MatMul", "Gemm") and w.weight_index == 1 and w.output in new_outs]


def _default_drift_feeds(m: Model) -> dict:
    if m.tokenizer is not None and "input_ids" in [i.name for i in m.session.get_inputs()]:
        from lrc import data

        try:
            text = data.load_text("news")
        except LrcError:
            text = data.load_text("docs")
        ids = m.tokenizer.encode(text[:2000], add_special_tokens=True).ids[:64]
        return _feeds.text_feeds(m.session, np.array([ids], np.int64), config=m.config)
    return _feeds.random_feeds(m.session)


def layer_drift(orig, new, tensor_names=None, feeds: dict | None = None,
                threads: int | None = None) -> list[dict]:
    """Cosine and relative-norm drift of intermediate tensors, worst (largest rel_norm) first.

    ``tensor_names`` default: every weight MatMul/Gemm output of the original also present in
    the new model.  ``feeds`` default: 64 news tokens (text models) or random feeds.
    """
    fo, fn = _onnx_file(orig), _onnx_file(new)
    names = list(tensor_names) if tensor_names else default_drift_tensors(fo, fn)
    if not names:
        raise LrcError("no tensors to compare: name some (they must exist in both models)")
    with tempfile.TemporaryDirectory(prefix="lrc_drift_") as d:
        so = _session_with_outputs(fo, names, threads, Path(d))
        sn = _session_with_outputs(fn, names, threads, Path(d))
        if feeds is None:
            feeds = _default_drift_feeds(Model(fo, so, load_tokenizer(None, fo), _feeds.model_config(fo)))
        a = so.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in so.get_inputs()}})
        b = sn.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sn.get_inputs()}})
    rows = [_drift_row(n, x, y) for n, x, y in zip(names, a, b)]
    return sorted(rows, key=lambda r: -r["rel_norm"] if np.isfinite(r["rel_norm"]) else -np.inf)


def _drift_row(name: str, x: np.ndarray, y: np.ndarray) -> dict:
    if x.shape != y.shape:
        return {"tensor": name, "cosine": float("nan"), "rel_norm": float("inf"),
                "max_abs": float("inf"), "shape": list(x.shape), "note": f"shape {list(y.shape)}"}
    x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    nx, ny = np.linalg.norm(x64), np.linalg.norm(y64)
    cos = float(x64 @ y64 / (nx * ny)) if nx > 0 and ny > 0 else float(nx == ny)
    rel = float(np.linalg.norm(y64 - x64) / nx) if nx > 0 else float(np.linalg.norm(y64))
    return {"tensor": name, "cosine": cos, "rel_norm": rel,
            "max_abs": float(np.abs(y64 - x64).max()) if x64.size else 0.0, "shape": list(x.shape)}


# ----------------------------------------------------------------------------- evaluate


def evaluate(orig, new, text=None, json: bool = False, tokenizer=None, ood: str = "docs",
             context: int = 256, max_tokens: int | None = 4096, threads: int | None = None):
    """Compare two models on an in-domain and an out-of-domain text.

    Causal LMs: ``compare_lm`` on ``text`` (default 'news') and on ``ood`` (default 'docs').
    Encoders: ``compare_encoder`` on Lee (Pearson with human ratings) and on ``ood`` passages.
    Returns a JSON-serializable dict, or its JSON string when ``json=True``.
    """
    mo = load_model(orig, tokenizer, threads)
    mn = load_model(new, tokenizer or mo.tokenizer, threads)
    if mo.is_lm != mn.is_lm:
        raise LrcError("one model is a causal LM and the other is not")
    if mo.is_lm:
        res = {"kind": "causal-lm",
               "in_domain": compare_lm(mo, mn, text or "news", context=context, stride=context,
                                       max_tokens=max_tokens),
               "out_of_domain": compare_lm(mo, mn, ood, context=context, stride=context,
                                           max_tokens=max_tokens)}
    else:
        res = {"kind": "encoder",
               "in_domain": compare_encoder(mo, mn, text),
               "out_of_domain": compare_encoder(mo, mn, ood)}
    res = _jsonable(res)
    return _json.dumps(res, indent=2) if json else res


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


# ----------------------------------------------------------------------------- tables


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not np.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def format_table(result, title: str | None = None):
    """A rich Table for any result of this module (perplexity, compare_*, evaluate, layer_drift)."""
    from rich.table import Table

    if isinstance(result, str):
        result = _json.loads(result)
    if isinstance(result, list):
        return _drift_table(result, title)
    if "kind" in result:
        return _evaluate_table(result, title)
    if "kl" in result or "embedding_cosine" in result:
        return _evaluate_table({"kind": "", "result": result}, title)
    t = Table(title=title or "perplexity")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.items():
        t.add_row(k, _fmt(v))
    return t


def _evaluate_table(res: dict, title: str | None):
    from rich.table import Table

    t = Table(title=title or f"quality ({res['kind']})".replace(" ()", ""))
    for c in ("text", "metric", "original", "compressed"):
        t.add_column(c, justify="left" if c in ("text", "metric") else "right")
    notes = []
    for key, r in res.items():
        if not isinstance(r, dict):
            continue
        label = f"{r.get('text', key)}"
        if "kl" in r:
            t.add_row(label, "perplexity", _fmt(r["orig"]["perplexity"]), _fmt(r["new"]["perplexity"]))
            t.add_row("", "KL(orig||new)", "", _fmt(r["kl"]))
            t.add_row("", "top-1 agreement", "", _fmt(r["top1_agreement"]))
            t.add_row("", "logits cosine", "", _fmt(r["logits_cosine"]))
            notes.append(f"{label}: {r['tokens']} tokens, {r['windows']} windows of {r['context']}, "
                         f"stride {r['stride']}; {r['bos']}")
        else:
            if "lee_pearson" in r.get("orig", {}):
                t.add_row(label, "Lee Pearson r", _fmt(r["orig"]["lee_pearson"]),
                          _fmt(r["new"]["lee_pearson"]))
                label = ""
            t.add_row(label, "embedding cosine (mean)", "", _fmt(r["embedding_cosine"]))
            t.add_row("", "embedding cosine (min)", "", _fmt(r["embedding_cosine_min"]))
    if notes:
        t.caption = "\n".join(notes)
    return t


def _drift_table(rows: list[dict], title: str | None, limit: int = 20):
    from rich.table import Table

    t = Table(title=title or "layer drift (worst first)")
    t.add_column("tensor")
    t.add_column("cosine", justify="right")
    t.add_column("rel norm", justify="right")
    t.add_column("max abs", justify="right")
    for r in rows[:limit]:
        t.add_row(r["tensor"], _fmt(r["cosine"], 6), _fmt(r["rel_norm"]), _fmt(r["max_abs"]))
    if len(rows) > limit:
        t.caption = f"{len(rows) - limit} more tensors"
    return t
