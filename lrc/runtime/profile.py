"""Amdahl's bound: how much of a model's time its weight MatMuls take, from an ORT profile.

The model is run with ORT profiling at one ``batch x seq``; ``f`` is the fraction of node kernel
time spent in MatMul-like nodes (``lrc.graph.locate.MATMUL_OPS``) whose weight is a constant
(initializer, possibly through Transpose / Cast / Reshape). A decoder is profiled twice: the
prefill, and one decode step after a cache of ``seq`` positions (the cache comes from an
unprofiled session). Shrinking those MatMuls by a parameter ratio ``rho`` can at best give
``amdahl_bound(f, rho) = 1 / ((1 - f) + f * rho)``: bench prints it beside the measured speedups
and ``--target-speedup`` inverts it.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from lrc.graph.locate import MATMUL_OPS, weight_matmuls
from lrc.runtime.feeds import model_config
from lrc.runtime.runner import Runner, timing_session

__all__ = ["amdahl_bound", "matmul_fraction_from_trace", "profile_matmul_fraction"]


def amdahl_bound(f: float, rho: float) -> float:
    """Best speedup when a fraction ``f`` of time scales by ``rho`` and the rest is fixed."""
    return 1.0 / ((1.0 - f) + f * rho)


def matmul_fraction_from_trace(trace_file: str, weight_names: set[str]) -> tuple[float, bool]:
    """(fraction of node kernel time in weight MatMuls, matched_by_name) of an ORT profile.

    Without node names to match (``weight_names`` empty), every MatMul-like node counts: an
    over-estimate, flagged by ``matched_by_name`` False."""
    events = json.loads(Path(trace_file).read_text())
    total = mm = mm_any = 0.0
    cache: dict[str, bool] = {}
    have_names = any(weight_names)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        dur = float(e.get("dur", 0))
        total += dur
        op = (e.get("args") or {}).get("op_name", "")
        if op not in MATMUL_OPS:
            continue
        mm_any += dur
        node = e["name"][: -len("_kernel_time")]
        hit = cache.get(node)
        if hit is None:
            hit = node in weight_names or any(w and w in node for w in weight_names)
            cache[node] = hit
        if hit:
            mm += dur
    if total <= 0:
        return 0.0, have_names
    return (mm / total if have_names else mm_any / total), have_names


def profile_matmul_fraction(path: Path, provider: str, threads: int | None, batch: int, seq: int,
                            decode_tokens: int, runs: int, work: Path) -> dict[str, Any]:
    """Profile ``path`` on ``provider`` (profiles are written under ``work``).

    Returns ``{"matmul_fraction": {"encoder"|"prefill"[, "decode"]: f}, "note": str,
    "phase": "encoder"|"prefill"}``; the decode step is profiled when ``decode_tokens > 0``."""
    import onnx

    path = Path(path)
    weights = set(weight_matmuls(onnx.load(str(path), load_external_data=False)))
    out: dict[str, float] = {}
    note = ""
    sess = timing_session(path, provider, threads, profile_prefix=str(Path(work) / "prefill_profile"))
    config = model_config(sess)
    r = Runner(sess, "profile", provider, config)
    phase = "prefill" if r.is_decoder else "encoder"
    r.prepare(batch, seq, 0)
    for _ in range(2 + runs):
        r.run_bound(r.prefill_values)
    f, named = matmul_fraction_from_trace(sess.end_profiling(), weights)
    out[phase] = f
    del r, sess
    if not named:
        note = "node names missing: f counts all MatMul-like time (an over-estimate)"
    if phase == "prefill" and decode_tokens > 0:
        # the cache comes from an unprofiled session, copied to the host
        sess = timing_session(path, provider, threads)
        r = Runner(sess, "profile", provider, config)
        _, outs = r.run_bound(r.to_device(r.feeds(batch, seq)))
        past = {p: outs[o].numpy() for o, p in r.present_to_past.items()}
        del r, sess, outs
        sess = timing_session(path, provider, threads, profile_prefix=str(Path(work) / "decode_profile"))
        r = Runner(sess, "profile", provider, config)
        step = r.to_device({**r.feeds(batch, 1, past_len=seq, with_past=False), **past})
        for _ in range(2 + runs):
            r.run_bound(step)
        out["decode"], _ = matmul_fraction_from_trace(sess.end_profiling(), weights)
        del r, sess
    gc.collect()
    return {"matmul_fraction": out, "note": note, "phase": phase}
