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
mean cosine of the logit vectors.  It is ``LMReference(orig, ...).compare(new, text)``: a
reference holds the original's side (windows, and with ``tmp`` its logits in a memmap, computed
once), so comparing many models to one (benchmarks/run.py) runs the original once.

Encoders: sentence embeddings are the attention-masked mean of ``last_hidden_state``.
``compare_encoder`` reports the cosine between original and new embeddings and, on the Lee 2005
corpus, the Pearson correlation between the embeddings' cosine similarities and the human
ratings over the 1225 document pairs (dense all-MiniLM-L6-v2: 0.656).  It is
``EncoderReference(orig, sentences).compare(new)`` (the original's embeddings computed once).

``evaluate`` picks the right comparison for the model kind and runs it on an in-domain text
(news) and on an out-of-domain one (Python documentation, absent from calibration).

Per-layer drift lives in :mod:`lrc.measure.drift`, tables in :mod:`lrc.present.quality`.
"""

from __future__ import annotations

import json as _json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrc.calibration.sensitivity import log_softmax as _log_softmax
from lrc.calibration.tokens import load_tokenizer
from lrc.errors import LrcError
from lrc.measure.metrics import LM_METRICS, cosine_rows
from lrc.modelref import ModelRef, fit_window, resolve
from lrc.runtime import feeds as _feeds
from lrc.runtime.session import open_session

__all__ = [
    "EncoderReference",
    "LM_METRICS",
    "LMReference",
    "Model",
    "bos_convention",
    "compare_encoder",
    "compare_lm",
    "embed",
    "evaluate",
    "evaluate_many",
    "agreement",
    "jsonable",
    "lee_pearson",
    "lm_windows",
    "load_model",
    "perplexity",
]


# ----------------------------------------------------------------------------- loading


@dataclass
class Model:
    """An ONNX model ready to run: file, session, tokenizer (or None), its configuration and
    its reference (:class:`lrc.modelref.ModelRef`: tokenizer_config.json and the rest)."""

    path: Path
    session: object
    tokenizer: object
    config: dict
    ref: ModelRef | None = None

    @property
    def is_lm(self) -> bool:
        return _feeds.is_causal_lm(self.session)


def load_model(model, tokenizer=None, threads: int | None = None) -> Model:
    """Open a model reference, a .onnx file or a model folder (model.onnx or
    decoder_model_merged.onnx ... with tokenizer.json and config.json beside it:
    :func:`lrc.modelref.resolve`). ``tokenizer``: a ``tokenizers.Tokenizer``, or the path of
    one, instead of the model's."""
    if isinstance(model, Model):
        return model
    ref = resolve(model)
    sess = open_session(ref, threads=threads)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else ref.load_tokenizer()
    return Model(ref.need_file("evaluating"), sess, tok, ref.config, ref)


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
    return m.ref.tokenizer_config if m.ref is not None else {}


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
    context = fit_window(m.config, context)  # the window description says what was used
    stride = min(stride, context)
    return lm_windows(ids, context, stride, bid, desc)


def _window_meta(w: Windows, label: str) -> dict:
    return {"text": label, "context": w.context, "stride": w.stride, "windows": len(w.inputs),
            "tokens": w.scored_tokens, "text_tokens": w.text_tokens, "bos": w.bos}


def _require_lm(m: Model) -> None:
    if not m.is_lm:
        raise LrcError(f"{m.path} is not a causal LM (no rank-3 'logits' output)")


def perplexity(model, text="news", tokenizer=None, context: int = 256, stride: int = 256,
               max_tokens: int | None = 4096, bos="auto", threads: int | None = None) -> dict:
    """Perplexity of a causal LM on ``text`` (an lrc.data name or a string) with sliding windows."""
    m = load_model(model, tokenizer, threads)
    _require_lm(m)
    body, label = _resolve_text(text)
    w = _make_windows(m, body, context, stride, max_tokens, bos)
    nll = 0.0
    for row, first in zip(w.inputs, w.first_scored):
        lp = _log_softmax(_lm_logits(m, row))
        tgt = row[first:]
        nll -= float(lp[np.arange(first - 1, len(row) - 1), tgt].astype(np.float64).sum())
    mean = nll / w.scored_tokens
    return {"model": str(m.path), "perplexity": math.exp(mean), "nll": mean, **_window_meta(w, label)}


# ----------------------------------------------------------------------------- LM metrics


def _target_nll(lp: np.ndarray, row: np.ndarray, first: int) -> float:
    """Negative log-likelihood summed over a window's scored tokens (``lp``: their rows)."""
    tgt = row[first:]
    return float(lp[np.arange(len(tgt)), tgt].astype(np.float64).sum())


@dataclass
class _Text:
    """One text of an LMReference: its windows and, once computed, the reference's summed NLL
    and (when kept) its logits of every window, (n_windows, L, vocab)."""

    windows: Windows
    label: str
    logits: np.ndarray | None = None
    nll: float | None = None


class LMReference:
    """The reference (dense) LM's side of :func:`compare_lm` on fixed windows of ``texts``.

    ``compare(new, text)`` returns what ``compare_lm(dense, new, text)`` returns (same windows,
    BOS convention and formulas, in the same float order). With ``tmp`` (a folder) the
    reference's logits of every window are computed now and kept in a memmap there, so each
    comparison runs only the new model (benchmarks compare many models to one); without it
    nothing is kept and each comparison runs both models window by window (``compare_lm``).
    ``dense(text)`` gives the reference's perplexity, NLL and window description.
    """

    def __init__(self, dense, texts=("news",), context: int = 256, max_tokens: int | None = 4096,
                 threads: int | None = None, tmp: str | os.PathLike | None = None, *,
                 stride: int | None = None, bos="auto", tokenizer=None):
        self.model = load_model(dense, tokenizer, threads)
        _require_lm(self.model)
        self.threads = threads
        self._texts: dict[str, _Text] = {}
        for text in texts:
            body, label = _resolve_text(text)
            w = _make_windows(self.model, body, context, context if stride is None else stride,
                              max_tokens, bos)
            r = _Text(w, label)
            if tmp is not None:
                self._keep(r, Path(tmp))
            self._texts[text] = r

    def _keep(self, r: _Text, folder: Path) -> None:
        import tempfile

        w = r.windows
        nll = 0.0
        for i, (row, first) in enumerate(zip(w.inputs, w.first_scored)):
            lo = _lm_logits(self.model, row)
            if r.logits is None:
                fd, name = tempfile.mkstemp(prefix="lm-reference-", suffix=".npy", dir=folder)
                os.close(fd)
                r.logits = np.lib.format.open_memmap(name, mode="w+", dtype=lo.dtype,
                                                     shape=(len(w.inputs), *lo.shape))
            r.logits[i] = lo
            nll -= _target_nll(_log_softmax(lo[first - 1:len(row) - 1]), row, first)
        r.nll = nll

    def _logits(self, r: _Text, i: int) -> np.ndarray:
        """The reference's logits at window ``i``'s scored positions."""
        row, first = r.windows.inputs[i], r.windows.first_scored[i]
        lo = np.asarray(r.logits[i]) if r.logits is not None else _lm_logits(self.model, row)
        return lo[first - 1:len(row) - 1]

    def dense(self, text) -> dict:
        """The reference's ``perplexity`` and ``nll`` on ``text``, with the window description."""
        r = self._texts[text]
        if r.nll is None:
            nll = 0.0
            for i, (row, first) in enumerate(zip(r.windows.inputs, r.windows.first_scored)):
                nll -= _target_nll(_log_softmax(self._logits(r, i)), row, first)
            r.nll = nll
        n = r.windows.scored_tokens
        return {"perplexity": math.exp(r.nll / n), "nll": r.nll / n, **_window_meta(r.windows, r.label)}

    def compare(self, new, text) -> dict:
        """``compare_lm``'s result for ``new`` (a path or a loaded Model) on ``text``."""
        r = self._texts[text]
        mn = load_model(new, self.model.tokenizer, self.threads)  # a Model passes through as is
        _require_lm(mn)
        w = r.windows
        nll_o = nll_n = 0.0
        acc = dict.fromkeys(LM_METRICS, 0.0)
        for i, (row, first) in enumerate(zip(w.inputs, w.first_scored)):
            lo = self._logits(r, i)
            ln = _lm_logits(mn, row)[first - 1:len(row) - 1]
            if lo.shape != ln.shape:
                raise LrcError(f"logits shapes differ: {lo.shape} vs {ln.shape}")
            lp_o, lp_n = _log_softmax(lo), _log_softmax(ln)
            if r.nll is None:
                nll_o -= _target_nll(lp_o, row, first)
            nll_n -= _target_nll(lp_n, row, first)
            for k, metric in LM_METRICS.items():
                acc[k] += float(metric.fn(lp_o, lp_n, lo, ln).sum())
        if r.nll is None:
            r.nll = nll_o
        n = w.scored_tokens
        ppl_o, ppl_n = math.exp(r.nll / n), math.exp(nll_n / n)
        return {"orig": {"model": str(self.model.path), "perplexity": ppl_o, "nll": r.nll / n},
                "new": {"model": str(mn.path), "perplexity": ppl_n, "nll": nll_n / n},
                "ppl_ratio": ppl_n / ppl_o, **{k: v / n for k, v in acc.items()},
                **_window_meta(w, r.label)}


def compare_lm(orig, new, text="news", tokenizer=None, context: int = 256, stride: int = 256,
               max_tokens: int | None = 4096, bos="auto", threads: int | None = None) -> dict:
    """Both perplexities, mean KL(orig||new), top-1 agreement and logit cosine on the same windows.

    The windows (and the BOS convention) come from the original model's tokenizer; each window
    is run through both models in turn (``LMReference`` without a memmap).
    """
    mo = load_model(orig, tokenizer, threads)
    mn = load_model(new, tokenizer or mo.tokenizer, threads)
    _require_lm(mn)
    ref = LMReference(mo, [text], context, max_tokens, threads, stride=stride, bos=bos)
    return ref.compare(mn, text)


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
    st = m.ref.sentence_config if m.ref is not None else {}  # sentence-transformers' own limit
    try:
        return int(st["max_seq_length"])
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


class EncoderReference:
    """The reference (dense) encoder's side of :func:`compare_encoder`: its embeddings of
    ``sentences`` (None: the Lee 2005 documents, with their human ratings; a name from lrc.data
    or a text: 64 passages of it; else a list of sentences), computed once.
    ``compare(new)`` returns what ``compare_encoder(dense, new, sentences)`` returns;
    ``lee_pearson`` is the reference's Pearson r on Lee (None for other sentences)."""

    def __init__(self, dense, sentences=None, tokenizer=None, max_length: int | None = None,
                 threads: int | None = None):
        from lrc import data

        self.model = load_model(dense, tokenizer, threads)
        self.threads, self.max_length = threads, max_length
        self.human = None
        self.label = "custom"
        if sentences is None:
            sentences, self.human = data.lee_similarity()
            self.label = "lee"
        elif isinstance(sentences, str):
            body, self.label = _resolve_text(sentences)
            sentences = _passages(body, 64)
        self.sentences = sentences
        self.embeddings = embed(self.model, sentences, max_length=max_length)
        self.lee_pearson = (_pearson_with_human(self.embeddings, self.human)
                            if self.human is not None else None)

    def compare(self, new) -> dict:
        """``compare_encoder``'s result for ``new`` (a path or a loaded Model)."""
        mn = load_model(new, self.model.tokenizer, self.threads)
        en = embed(mn, self.sentences, max_length=self.max_length)
        cos = cosine_rows(self.embeddings, en)
        res = {"orig": {"model": str(self.model.path)}, "new": {"model": str(mn.path)},
               "text": self.label, "sentences": len(self.sentences),
               "max_length": _max_length(self.model, self.max_length),
               "embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min())}
        if self.human is not None:
            res["orig"]["lee_pearson"] = self.lee_pearson
            res["new"]["lee_pearson"] = _pearson_with_human(en, self.human)
        return res


def compare_encoder(orig, new, sentences=None, tokenizer=None, max_length: int | None = None,
                    threads: int | None = None) -> dict:
    """Embedding cosine (orig vs new) and, on Lee (the default sentences), both Pearson r."""
    mo = load_model(orig, tokenizer, threads)
    mn = load_model(new, tokenizer or mo.tokenizer, threads)
    return EncoderReference(mo, sentences, max_length=max_length, threads=threads).compare(mn)


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
    res = jsonable(res)
    return _json.dumps(res, indent=2) if json else res


EVAL_SCHEMA = "lrc.eval/1"


def evaluate_many(orig, news, text=None, tokenizer=None, ood: str = "docs", context: int = 256,
                  max_tokens: int | None = 4096, threads: int | None = None,
                  tmp: str | os.PathLike | None = None) -> dict:
    """:func:`evaluate` of several models against one original, the original's side computed once.

    Returns ``{"schema": "lrc.eval/1", "kind": "causal-lm"|"encoder", "orig": str,
    "new": [str, ...], "results": [...]}`` where ``results[i]`` is exactly what
    ``evaluate(orig, news[i], ...)`` returns (same windows, same numbers to the last bit).
    Causal LMs: the original's logits of every window are kept in a memmap in ``tmp`` (default:
    a temporary folder, deleted after; windows x context x vocab float32 per text, e.g. 200 MB
    per 1024 tokens of SmolLM2) when there is more than one new model. Encoders: the original's
    embeddings are computed once per text.
    """
    import tempfile

    news = list(news)
    if not news:
        raise LrcError("evaluate_many: no models to compare")
    mo = load_model(orig, tokenizer, threads)
    tok = tokenizer or mo.tokenizer
    models = [load_model(n, tok, threads) for n in news]
    for mn in models:
        if mo.is_lm != mn.is_lm:
            raise LrcError(f"{mo.path} and {mn.path}: one model is a causal LM and the other is not")
    results = []
    if mo.is_lm:
        texts = [text or "news", ood]
        with tempfile.TemporaryDirectory(prefix="lrc-eval-", dir=tmp) as folder:
            keep = Path(folder) if len(models) > 1 else None
            ref = LMReference(mo, dict.fromkeys(texts), context, max_tokens, threads, keep,
                              stride=context)
            for mn in models:
                results.append({"kind": "causal-lm",
                                "in_domain": ref.compare(mn, texts[0]),
                                "out_of_domain": ref.compare(mn, texts[1])})
            del ref  # close the memmaps before the folder goes
    else:
        lee = EncoderReference(mo, text, threads=threads)
        docs = EncoderReference(mo, ood, threads=threads)
        for mn in models:
            results.append({"kind": "encoder", "in_domain": lee.compare(mn),
                            "out_of_domain": docs.compare(mn)})
    return jsonable({"schema": EVAL_SCHEMA, "kind": results[0]["kind"], "orig": str(mo.path),
                     "new": [str(m.path) for m in models], "results": results})


# ----------------------------------------------------------------------------- agreement


def _agreement_batch(sess, batch) -> dict:
    if isinstance(batch, dict):
        return batch
    return _feeds.text_feeds(sess, np.asarray(batch))


class _Agree:
    """Running sums of one output's agreement: per-sample cosine, error norms, top-1."""

    def __init__(self):
        self.cos: list[np.ndarray] = []
        self.err2 = self.ref2 = 0.0
        self.max_abs = 0.0
        self.top1_hits = self.top1_n = 0
        self.values = 0

    def add(self, o: np.ndarray, n: np.ndarray) -> None:
        if o.shape != n.shape:
            raise LrcError(f"output shapes differ: {'x'.join(map(str, o.shape))} vs "
                           f"{'x'.join(map(str, n.shape))}")
        o64, n64 = o.astype(np.float64), n.astype(np.float64)
        rows_o = o64.reshape(o64.shape[0], -1) if o64.ndim >= 2 else o64.reshape(1, -1)
        rows_n = n64.reshape(rows_o.shape)
        self.cos.append(cosine_rows(rows_o, rows_n))
        d = o64 - n64
        self.err2 += float((d * d).sum())
        self.ref2 += float((o64 * o64).sum())
        self.max_abs = max(self.max_abs, float(np.abs(d).max()) if d.size else 0.0)
        self.values += o.size
        if o.ndim >= 2 and o.shape[-1] > 1:  # logits / class scores: the argmax agrees?
            self.top1_hits += int((o.argmax(-1) == n.argmax(-1)).sum())
            self.top1_n += int(np.prod(o.shape[:-1]))

    def result(self, name: str) -> dict:
        cos = np.concatenate(self.cos) if self.cos else np.zeros(0)
        return {"text": name, "cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                "rel_error": float(np.sqrt(self.err2 / self.ref2)) if self.ref2 else float("nan"),
                "max_abs": self.max_abs,
                "top1_agreement": self.top1_hits / self.top1_n if self.top1_n else None,
                "values": self.values}


def _run_batch(sess, feeds: dict, i: int, path: Path) -> list:
    try:
        return sess.run(None, feeds)
    except Exception as e:
        raise LrcError(f"input batch {i} failed on {path.name}: {str(e).splitlines()[0]}") from e


def agreement(orig, news, inputs, threads: int | None = None) -> dict:
    """How closely each model in ``news`` reproduces ``orig``'s outputs on ``inputs``: batches
    from :func:`lrc.runtime.feeds.load_inputs` (files of named input tensors; any model, text
    or not). Per float output: cosine of each sample's flattened output with the original's
    (mean, min), relative error ``||new - orig|| / ||orig||`` over all batches, max abs error,
    and for outputs with a class / vocabulary axis (last axis > 1) the share of positions whose
    top-1 agrees. Returns ``{"schema": "lrc.eval/1", "kind": "agreement", "orig", "new",
    "inputs", "results": [{"kind": "agreement", OUTPUT: {...}, ...} per new model]}``."""
    if isinstance(news, (str, os.PathLike)):
        news = [news]
    ro = resolve(orig)
    fo = ro.need_file("agreement")
    so = open_session(ro, threads=threads)
    refs = [resolve(n) for n in news]
    paths = [r.need_file("agreement") for r in refs]
    sessions = [open_session(r, threads=threads) for r in refs]
    names = [o.name for o in so.get_outputs()]
    for p, s in zip(paths, sessions):
        if [o.name for o in s.get_outputs()] != names:
            raise LrcError(f"{p}: outputs {[o.name for o in s.get_outputs()]} differ from the "
                           f"original's {names}")
    batches = list(inputs)
    if not batches:
        raise LrcError("no inputs to compare on")
    sums = [{n: _Agree() for n in names} for _ in paths]
    for i, batch in enumerate(batches):
        feeds = _agreement_batch(so, batch)
        ref = _run_batch(so, feeds, i, fo)
        for p, s, acc in zip(paths, sessions, sums):
            outs = _run_batch(s, feeds, i, p)
            for n, o, x in zip(names, ref, outs):
                if np.issubdtype(np.asarray(o).dtype, np.floating):
                    acc[n].add(np.asarray(o), np.asarray(x))
    results = []
    for acc in sums:
        r = {"kind": "agreement"}
        r.update({n: a.result(n) for n, a in acc.items() if a.values})
        results.append(r)
    shapes = sorted({_feeds.describe_batch(b) for b in batches})
    return jsonable({"schema": EVAL_SCHEMA, "kind": "agreement", "orig": str(fo),
                     "new": [str(p) for p in paths],
                     "inputs": f"{len(batches)} batches: {'; '.join(shapes)}",
                     "results": results})


def jsonable(x):
    """``x`` with numpy scalars turned into Python numbers (lists for tuples), for json.dumps."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
