"""The one registry of lrc's metrics: how far a new model's numbers are from the original's.

Two kinds, one name per quantity everywhere (JSON keys, tables, benchmarks):

* **tensor** metrics compare two arrays of the same values (``lrc verify``'s outputs,
  ``lrc eval --layers``' intermediate tensors, ``lrc eval --inputs``' agreement), in float64:
  ``max_abs`` and ``mean_abs`` (absolute difference), ``rel_error`` (``‖b−a‖/‖a‖``; a zero
  reference gives 0 when both are zero, else 1) and ``cosine`` (1 when both are zero);
* **distribution** metrics compare a causal LM's next-token distributions on the scored
  positions of a window (``lrc eval``): ``kl`` (KL(orig‖new)), ``top1_agreement``,
  ``top5_agreement`` (the original's next token among the new model's five most likely) and
  ``logits_cosine``; each gives one value per position and ``compare_lm`` reports the mean over
  every scored token.

A new metric is one :class:`Metric` in :data:`METRICS` (and its test): verify, eval, the
benchmarks and the tables read the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Metric:
    """``kind``: "tensor" (``fn(a, b)`` -> one float for two float64 vectors of the same
    values) or "distribution" (``fn(lp_o, lp_n, lo, ln)`` -> one value per position, given
    the log-softmax and the logits of both models, [positions, vocab] float32). ``label``: the
    table heading."""

    key: str
    label: str
    kind: str
    fn: Callable


def _max_abs(a, b):
    d = np.abs(a - b)
    return float(d.max()) if d.size else 0.0


def _mean_abs(a, b):
    d = np.abs(a - b)
    return float(d.mean()) if d.size else 0.0


def _rel_error(a, b):
    na = np.linalg.norm(a)
    return float(np.linalg.norm(a - b) / na) if na > 0 else float(np.linalg.norm(b) > 0)


def _cosine(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)


def _kl(lp_o, lp_n, lo, ln):  # float32 math, float64 sums
    return (np.exp(lp_o) * (lp_o - lp_n)).sum(axis=-1, dtype=np.float64)


def _top1(lp_o, lp_n, lo, ln):
    return lo.argmax(-1) == ln.argmax(-1)


def _top5(lp_o, lp_n, lo, ln):
    """The original's next token is among the new model's five most likely."""
    k = min(5, ln.shape[-1])
    top = np.argpartition(-ln, k - 1, axis=-1)[:, :k]
    return (top == lo.argmax(-1)[:, None]).any(axis=-1)


def _logits_cosine(lp_o, lp_n, lo, ln):
    dot = np.einsum("ij,ij->i", lo, ln, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", lo, lo, dtype=np.float64)
                    * np.einsum("ij,ij->i", ln, ln, dtype=np.float64))
    return dot / (norms + 1e-30)


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("max_abs", "max abs", "tensor", _max_abs),
    Metric("mean_abs", "mean abs", "tensor", _mean_abs),
    Metric("rel_error", "rel err", "tensor", _rel_error),
    Metric("cosine", "cosine", "tensor", _cosine),
    Metric("kl", "KL(orig||new)", "distribution", _kl),
    Metric("top1_agreement", "top-1 agreement", "distribution", _top1),
    Metric("top5_agreement", "top-5 agreement", "distribution", _top5),
    Metric("logits_cosine", "logits cosine", "distribution", _logits_cosine),
)}


def of_kind(kind: str) -> dict[str, Metric]:
    return {k: m for k, m in METRICS.items() if m.kind == kind}


TENSOR_METRICS = of_kind("tensor")
LM_METRICS = of_kind("distribution")


def compare_tensors(a, b) -> dict:
    """Every tensor metric of ``b`` against the reference ``a`` (compared element by element,
    whatever their shapes); ``{"shape_mismatch": [...]}`` when their sizes differ."""
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    if a64.shape != b64.shape:
        return {"shape_mismatch": [list(np.shape(a)), list(np.shape(b))]}
    return {k: m.fn(a64, b64) for k, m in TENSOR_METRICS.items()}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row of ``a`` with the same row of ``b`` (sentence embeddings,
    samples of an output)."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


__all__ = ["LM_METRICS", "METRICS", "Metric", "TENSOR_METRICS", "compare_tensors",
           "cosine_rows", "of_kind"]
