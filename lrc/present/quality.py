"""Tables of eval results (:mod:`lrc.measure.quality`, :mod:`lrc.measure.drift`) for the terminal.

``format_table`` takes any result of those modules (perplexity, compare_*, evaluate,
evaluate_many -- one column per compared model --, a list of layer_drift rows) or its JSON
string and returns a ``rich`` Table.
"""

from __future__ import annotations

import json as _json

import numpy as np

from lrc.measure.metrics import LM_METRICS, METRICS

__all__ = ["format_table", "short_names"]


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not np.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def format_table(result, title: str | None = None):
    """A rich Table for any eval result (perplexity, compare_*, evaluate, layer_drift rows)."""
    from rich.table import Table

    if isinstance(result, str):
        result = _json.loads(result)
    if isinstance(result, list):
        return _drift_table(result, title)
    if result.get("kind") == "agreement":
        return _agreement_table(result, title)
    if "results" in result:  # several models against one (lrc.measure.quality.evaluate_many)
        return _evaluate_table(result["results"], title,
                               names=short_names(result.get("new") or []))
    if "kind" in result:
        return _evaluate_table([result], title)
    if "kl" in result or "embedding_cosine" in result:
        return _evaluate_table([{"kind": "", "result": result}], title)
    t = Table(title=title or "perplexity")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.items():
        t.add_row(k, _fmt(v))
    return t


def short_names(paths) -> list[str]:
    """Column names for model paths: the folder of an exported folder's model file, else the
    file's stem (the names ``lrc bench`` gives), made unique."""
    from lrc.measure.bench import model_name

    taken: set[str] = set()
    return [model_name(p, taken) for p in paths]


def _evaluate_table(results: list[dict], title: str | None, names: list[str] | None = None):
    """One row per (text, metric); columns: the original, then one per compared model (a single
    model's column is called "compressed")."""
    from rich.table import Table

    first = results[0]
    names = names if names and len(names) == len(results) else (
        ["compressed"] if len(results) == 1 else [f"model {i + 1}" for i in range(len(results))])
    t = Table(title=title or f"quality ({first['kind']})".replace(" ()", ""))
    for c in ("text", "metric", "original", *names):
        t.add_column(c, justify="left" if c in ("text", "metric") else "right")
    notes = []
    for key, r in first.items():
        if not isinstance(r, dict):
            continue
        rs = [res.get(key) or {} for res in results]
        label = f"{r.get('text', key)}"
        if "kl" in r:
            t.add_row(label, "perplexity", _fmt(r["orig"]["perplexity"]),
                      *(_fmt((x.get("new") or {}).get("perplexity")) for x in rs))
            for m in LM_METRICS.values():
                if m.key in r:
                    t.add_row("", m.label, "", *(_fmt(x.get(m.key)) for x in rs))
            notes.append(f"{label}: {r['tokens']} tokens, {r['windows']} windows of {r['context']}, "
                         f"stride {r['stride']}; {r['bos']}")
        else:
            if "lee_pearson" in r.get("orig", {}):
                t.add_row(label, "Lee Pearson r", _fmt(r["orig"]["lee_pearson"]),
                          *(_fmt((x.get("new") or {}).get("lee_pearson")) for x in rs))
                label = ""
            t.add_row(label, "embedding cosine (mean)", "",
                      *(_fmt(x.get("embedding_cosine")) for x in rs))
            t.add_row("", "embedding cosine (min)", "",
                      *(_fmt(x.get("embedding_cosine_min")) for x in rs))
    if notes:
        t.caption = "\n".join(notes)
    return t


AGREEMENT = (("cosine", "cosine (mean)"), ("cosine_min", "cosine (min)"),
             ("rel_error", "relative error"), ("max_abs", "max abs error"),
             ("top1_agreement", "top-1 agreement"))


def _agreement_table(result: dict, title: str | None):
    """``lrc.measure.quality.agreement``: one row per (output, metric), one column per model."""
    from rich.table import Table

    results = result["results"]
    names = short_names(result.get("new") or []) if len(results) > 1 else ["compressed"]
    t = Table(title=title or "output agreement with the original")
    for c in ("output", "metric", *names):
        t.add_column(c, justify="left" if c in ("output", "metric") else "right")
    for out, first in results[0].items():
        if not isinstance(first, dict):
            continue
        label = out
        for key, name in AGREEMENT:
            if key == "top1_agreement" and first.get("top1_agreement") is None:
                continue
            t.add_row(label, name, *(_fmt((r.get(out) or {}).get(key)) for r in results))
            label = ""
    t.caption = f"on {result.get('inputs', '?')}"
    return t


def _drift_table(rows: list[dict], title: str | None, limit: int = 20):
    from rich.table import Table

    t = Table(title=title or "layer drift (worst first)")
    t.add_column("tensor")
    keys = ("cosine", "rel_error", "max_abs")
    for k in keys:
        t.add_column(METRICS[k].label, justify="right")
    for r in rows[:limit]:
        t.add_row(r["tensor"], *(_fmt(r[k], 6 if k == "cosine" else 4) for k in keys))
    if len(rows) > limit:
        t.caption = f"{len(rows) - limit} more tensors"
    return t
