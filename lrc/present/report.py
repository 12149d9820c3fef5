"""One self-contained HTML report (inline CSS, PNG plots as base64 data URIs, no network).

``write_report(results, out_html, summaries=None)`` accepts these JSON shapes; every section is
optional and one that has no data is left out (unknown keys are ignored):

1. Benchmark result -- the dict ``lrc.bench.bench()`` returns (``"schema": "lrc.bench/1"``;
   see ``lrc.bench`` for every field). Rendered as tables (machine, models, latencies, Amdahl
   fraction) and a bar chart of speedups per (EP, phase, batch, seq).

2. Speed / quality variants -- an item of ``results`` with a ``variants`` list::

       {"title": "SmolLM2-135M on Lee news",          # optional
        "metric": "perplexity",                        # optional default for every variant
        "higher_is_better": false,                     # optional default (true if absent)
        "variants": [{"name": "dense", "speedup": 1.0, "quality": 32.07,
                      "metric": "perplexity",          # optional, overrides the default
                      "higher_is_better": false,       # optional
                      "size_mb": 541.7}, ...]}         # optional

   Rendered as a speed-vs-quality scatter with the Pareto frontier (variants no other variant
   beats on both speedup and quality) and a table. One plot per metric. A bench result may also
   carry ``variants``. With ``"x": "size_mb"`` on the item the x axis is the file size instead
   (``size_mb`` required on each variant; smaller is better on that axis). A lower-is-better
   value over ``OFF_SCALE`` (10) times the best of its plot (a broken model: perplexity 7e7)
   is drawn as a triangle on the top edge with its value in its label; the table keeps it.

   Bench + eval, joined: when ``results`` hold a bench result and eval results (``lrc eval
   --save``: one model's ``{"kind", "in_domain", "out_of_domain"}``, or several models'
   ``{"schema": "lrc.eval/1", "orig", "new", "results"}``), :func:`join_bench_eval` matches
   the bench's models to the evaluated ones -- by path (as given to both commands), else by the
   bench's model name (folder of an exported folder's model file, else the file's stem; an ORT
   baseline ``DENSE+int4-matmulnbits`` matches a file ``int4-matmulnbits.onnx``, which is what
   ``lrc bench --keep-baselines DIR`` writes) -- and turns them into variants items: one per
   bench shape (EP, phase, batch, sequence; decode first) with every quality metric of the
   eval (LMs: perplexity on each text, lower is better; encoders: Lee Pearson r and embedding
   cosine), and one of file size against the same metrics. The eval's original is the dense
   point (speedup 1 when it is the bench's first model). Eval results also get a quality table.

3. Compression summaries (``summaries``, or items of ``results`` that have ``rewritten`` /
   ``nodes``) -- what ``lrc compress`` / ``lrc analyse`` write::

       {"model": "name",                                           # optional title
        "rewritten": [{"name": str, "role": str, "block": int|null, "rank": int,
                       "shape": [in, out], "spectrum": [float, ...]}],   # spectrum optional
        "nodes": [{"name": str, "role": str, "block": int|null, "shape": [in, out],
                   "spectrum": [float, ...]}],                       # analysis; optional
        "totals": {"params_before": int, "params_after": int, ...}}   # optional

   ``spectrum`` is the list of singular values of that weight (descending; whitened or plain,
   as the tool computed it). Rendered: singular-value spectra per role (sigma / sigma_max on a
   log scale, one line per layer, the chosen rank marked when known), ranks chosen per layer
   (absolute and as the fraction of the dense parameters kept), and a totals table.

4. Peers' points (``benchmarks/peers.py --json``: other toolchains on the same dense weights
   and texts)::

       {"date": str, "machine": str, "max_tokens": int, "dense": {"news": ppl, "docs": ppl},
        "rows": [{"name": str, "bytes": int, "x_news": ratio, "x_docs": ratio,   # or None
                  "why": str|None}]}                        # why a peer has no point

   With a bench + eval of LMs in the same report: perplexity as a ratio to each run's own
   dense model (in-domain text = news, out-of-domain = docs) against the model files' bytes,
   this report's models and the peers' on one plot per text, and a table of both. Ratios, not
   perplexities, are compared: the peers' run may score another number of tokens.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;background:#fff;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #357;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:1.6em;color:#235}
h3{font-size:1.05em;color:#345}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccd;padding:.25em .6em;text-align:right}
th{background:#e8eef6}
td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#f7f9fc}
img{max-width:100%;border:1px solid #dde;margin:.4em 0}
.note{color:#555;font-size:.9em}
"""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return format(x, spec)
    return _esc(x)


def _table(headers: list[str], rows: Iterable[list[Any]], left: int = 1, cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>']
    out += [f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(headers)]
    out.append("</tr>")
    n = 0
    for row in rows:
        n += 1
        out.append("<tr>" + "".join(
            f'<td class="{"l" if i < left else ""}">{c if isinstance(c, _Raw) else _esc(c)}</td>'
            for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out) if n else ""


class _Raw(str):
    """Already-formatted cell text (numbers)."""


def _fig_to_img(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# bench section
# --------------------------------------------------------------------------------------------

def _bench_section(res: dict, idx: int) -> str:
    parts = [f"<h2>Benchmark {idx}</h2>"]
    m, s = res.get("machine") or {}, res.get("settings") or {}
    if m or s:
        io_b = s.get("io_binding") or {}
        rows = [
            ["CPU", f"{m.get('cpu', '?')} ({m.get('physical_cores', '?')} physical / "
                    f"{m.get('logical_cores', '?')} logical cores)"],
            ["GPU", m.get("gpu")] if m.get("gpu") else None,
            ["onnxruntime", f"{m.get('onnxruntime', '?')}; providers: {', '.join(m.get('available_providers', []))}"],
            ["platform", m.get("platform")],
            ["EPs", ", ".join(s.get("eps", []))],
            ["threads", s.get("threads") or s.get("threads_note", "default")],
            ["protocol", f"{s.get('warmup', '?')} warm-ups, {s.get('runs', '?')} timed runs, round-robin across "
                         "models, thread spinning off"
                         + (", IO binding on " + ", ".join(f"{k}: {v}" for k, v in io_b.items()) if io_b else "")],
            ["memory", s.get("memory_method")] if s.get("memory_method") else None,
        ]
        parts.append(_table(["machine", ""], [r for r in rows if r], left=2))

    models = res.get("models") or []
    if models:
        rows = []
        for e in models:
            sess = next(iter((e.get("sessions") or {}).values()), {})
            bound = e.get("amdahl_bound") or {}
            size = e.get("size_bytes")
            rows.append([
                e.get("name"), e.get("kind", ""), e.get("baseline") or "",
                _Raw(_num(size / 1e6, ".1f") if isinstance(size, (int, float)) else "-"),
                _Raw(_num(sess.get("load_s"), ".2f")), _Raw(_num(sess.get("rss_after_first_run_mb"), ".1f")),
                _Raw(_num(sess.get("peak_rss_mb"), ".1f")), _Raw(_num(e.get("weight_matmul_params"))),
                _Raw(_num(e.get("flop_ratio"), ".3f")),
                ", ".join(f"{k} {v:.2f}x" for k, v in bound.items()) or "-",
            ])
        parts.append("<h3>Models</h3>")
        parts.append(_table(["model", "kind", "baseline", "size MB", "load s", "RSS MB", "peak RSS MB",
                             "weight-MatMul params", "rho", "Amdahl bound"], rows, left=3))

    runs = res.get("runs") or []
    if runs:
        parts.append("<h3>Latency</h3>")
        rows = [[r.get("model"), r.get("ep"), r.get("phase"), _Raw(_num(r.get("batch"))), _Raw(_num(r.get("seq"))),
                 _Raw(_num(r.get("p50_ms"), ".3f")), _Raw(_num(r.get("p90_ms"), ".3f")),
                 _Raw(_num(r.get("p99_ms"), ".3f")), _Raw(_num(r.get("mean_ms"), ".3f")),
                 _Raw(_num(r.get("speedup"), ".2f")), _Raw(_num(r.get("tokens_per_s"), ".1f"))] for r in runs]
        parts.append(_table(["model", "EP", "phase", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                             "speedup", "tokens/s"], rows, left=3))
        parts.append('<p class="note">speedup = p50 of the first model / p50 of this model, same EP, phase, '
                     'batch and sequence length; decode rows are per generated token.</p>')
        img = _speedup_plot(runs)
        if img:
            parts.append(img)

    amd = res.get("amdahl")
    if amd and amd.get("matmul_fraction"):
        parts.append("<h3>Amdahl</h3>")
        parts.append(_table(["phase", "f (time in weight MatMuls)"],
                            [[ph, _Raw(_num(f, ".3f"))] for ph, f in amd["matmul_fraction"].items()]))
        parts.append(f'<p class="note">Profiled {_esc(amd.get("model"))} on {_esc(amd.get("ep"))} at batch '
                     f'{_esc(amd.get("batch"))}, seq {_esc(amd.get("seq"))}. {_esc(amd.get("note"))}. '
                     'Bound = 1 / ((1 - f) + f &middot; rho).</p>')
    notes = res.get("notes") or []
    if notes:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    return "".join(parts)


def _speedup_plot(runs: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("speedup") is None:
            continue
        groups.setdefault((r.get("ep"), r.get("phase"), r.get("batch"), r.get("seq")), []).append(r)
    if not groups:
        return ""
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for g in groups.values() for r in g))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(models)) / 2), 3.6))
    width = 0.8 / max(1, len(models))
    for j, mname in enumerate(models):
        xs, ys = [], []
        for i, g in enumerate(groups.values()):
            r = next((r for r in g if r["model"] == mname), None)
            if r is not None:
                xs.append(i + j * width)
                ys.append(r["speedup"])
        ax.bar(xs, ys, width=width, label=mname)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{ep} {ph}\nb{b} s{s}" for ep, ph, b, s in groups], fontsize=8)
    ax.set_ylabel("speedup vs first model (p50)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _fig_to_img(fig, "speedups")


# --------------------------------------------------------------------------------------------
# variants: speed vs quality with the Pareto frontier
# --------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of points (speedup, quality) that no other point matches-or-beats on both axes
    while beating on one. Sorted by speedup."""
    sign = 1.0 if higher_is_better else -1.0
    idx = []
    for i, (s, q) in enumerate(points):
        dominated = False
        for j, (s2, q2) in enumerate(points):
            if j != i and s2 >= s and sign * q2 >= sign * q and (s2 > s or sign * q2 > sign * q):
                dominated = True
                break
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


_X_AXES = {"speedup": ("speedup (x, higher is better)", True, "speedup"),
           "size_mb": ("file size (MB, smaller is better)", False, "size MB")}


OFF_SCALE = 10.0  # lower-is-better quality above this multiple of the best is drawn off scale


def _label_offsets(points: list[tuple[float, float]], logy: bool) -> list[int]:
    """Vertical label offsets (points) so that labels of nearby points do not overlap."""
    if not points:
        return []
    ys = [math.log10(y) if logy and y > 0 else y for _, y in points]
    xs = [x for x, _ in points]
    sx = (max(xs) - min(xs)) or 1.0
    sy = (max(ys) - min(ys)) or 1.0
    norm = [((x - min(xs)) / sx, (y - min(ys)) / sy) for x, y in zip(xs, ys)]
    out = []
    for i, (x, y) in enumerate(norm):  # the lower of two close points gets its label below
        below = any(abs(nx - x) < 0.15 and abs(ny - y) < 0.1 and (ny > y or (ny == y and j < i))
                    for j, (nx, ny) in enumerate(norm) if j != i)
        out.append(-9 if below else 3)
    return out


def _variants_section(item: dict) -> str:
    xkey = item.get("x", "speedup")
    xlabel, x_hib, xcol = _X_AXES.get(xkey, (xkey, True, xkey))
    variants = [v for v in item.get("variants") or []
                if isinstance(v, dict) and isinstance(v.get(xkey), (int, float))
                and isinstance(v.get("quality"), (int, float))
                and math.isfinite(float(v["quality"]))]
    if not variants:
        return ""
    default_metric = item.get("metric", "quality")
    default_hib = item.get("higher_is_better", True)
    by_metric: dict[tuple[str, bool], list[dict]] = {}
    for v in variants:
        key = (v.get("metric", default_metric), bool(v.get("higher_is_better", default_hib)))
        by_metric.setdefault(key, []).append(v)
    heading = "Speed vs quality" if xkey == "speedup" else "Size vs quality"
    parts = [f"<h2>{heading}{': ' + _esc(item['title']) if item.get('title') else ''}</h2>"]
    plt = _plt()
    for (metric, hib), vs in by_metric.items():
        pts = [(float(v[xkey]), float(v["quality"])) for v in vs]
        sign = 1.0 if x_hib else -1.0
        front = pareto_front([(sign * x, q) for x, q in pts], hib)
        front = sorted(front, key=lambda i: pts[i][0])
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ys = [p[1] for p in pts]
        # a broken variant (lower-is-better metric over OFF_SCALE x the best) would squash the
        # others into one line: drawn as a triangle on the top edge, its value in its label
        cap = (OFF_SCALE * min(ys) if not hib and min(ys) > 0 and max(ys) > OFF_SCALE * min(ys)
               else None)
        off = [cap is not None and y > cap for y in ys]
        shown = [(x, cap if o else y) for (x, y), o in zip(pts, off)]
        logy = not hib and min(ys) > 0 and max(y for _, y in shown) / min(ys) > 5
        inside = [p for p, o in zip(shown, off) if not o]
        ax.scatter([p[0] for p in inside], [p[1] for p in inside], c="#7a9cc6", zorder=2, label="variants")
        if cap is not None:
            ax.scatter([p[0] for p, o in zip(shown, off) if o], [cap] * sum(off), marker="^", s=60,
                       c="#999999", zorder=2, label=f"off scale (> {OFF_SCALE:g}x the best)")
        fx, fy = [shown[i][0] for i in front], [shown[i][1] for i in front]
        ax.plot(fx, fy, "-o", color="#c0392b", zorder=3, label="Pareto frontier")
        for v, (x, y), o, dy in zip(vs, shown, off, _label_offsets(shown, logy)):
            name = str(v.get("name", "")) + (f" ({pts[vs.index(v)][1]:.3g})" if o else "")
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, dy), textcoords="offset points",
                        va="top" if o else "baseline")
        if logy:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(  # 20, 30, 50, 200, ... only
                lambda t, _: f"{t:g}" if t > 0 and round(t / 10 ** math.floor(math.log10(t))) in (2, 3, 5)
                else ""))
        if xkey == "speedup":
            ax.axvline(1.0, color="k", lw=0.6, alpha=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        parts.append(f"<h3>{_esc(metric)}</h3>")
        parts.append(_fig_to_img(fig, f"{xcol} vs {metric}"))
        on_front = set(front)
        if xkey == "speedup":
            rows = [[v.get("name"), _Raw(_num(float(v["speedup"]), ".2f")),
                     _Raw(_num(float(v["quality"]), ".4g")), _Raw(_num(v.get("size_mb"), ".1f")),
                     "yes" if i in on_front else ""] for i, v in enumerate(vs)]
            parts.append(_table(["variant", "speedup", metric, "size MB", "Pareto"], rows))
        else:
            rows = [[v.get("name"), _Raw(_num(float(v[xkey]), ".1f")),
                     _Raw(_num(float(v["quality"]), ".4g")), "yes" if i in on_front else ""]
                    for i, v in enumerate(vs)]
            parts.append(_table(["variant", xcol, metric, "Pareto"], rows))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# bench + eval: joined into variants
# --------------------------------------------------------------------------------------------

EVAL_SCHEMA = "lrc.eval/1"  # lrc.measure.quality.evaluate_many
_BASELINE_LABELS = {"int8-dynamic": "ORT int8", "int4-matmulnbits": "ORT int4",
                    "ort-optimized": "ORT optimized"}
_PHASE_ORDER = {"decode": 0, "prefill": 1, "encoder": 2}


def is_bench(item: Any) -> bool:
    return isinstance(item, dict) and ("runs" in item or str(item.get("schema", "")).startswith("lrc.bench"))


def is_eval(item: Any) -> bool:
    """An ``lrc eval --save`` result: one model's or several models' (``lrc.eval/1``)."""
    return isinstance(item, dict) and (
        item.get("schema") == EVAL_SCHEMA
        or ("kind" in item and isinstance(item.get("in_domain"), dict)))


def eval_pairs(item: dict) -> tuple[str | None, list[tuple[str | None, dict]]]:
    """(original's path, [(compared model's path, its single-model result)]) of an eval result."""
    if item.get("schema") == EVAL_SCHEMA:
        results = [r for r in item.get("results") or [] if isinstance(r, dict)]
        news = list(item.get("new") or [])
        news += [None] * (len(results) - len(news))
        return item.get("orig"), list(zip(news, results))
    part = item.get("in_domain") or {}
    return ((part.get("orig") or {}).get("model"),
            [((part.get("new") or {}).get("model"), item)])


def _metrics(res: dict, side: str) -> dict[str, tuple[float, bool]]:
    """{metric: (value, higher_is_better)} of one side ("orig" / "new") of a single result."""
    out: dict[str, tuple[float, bool]] = {}
    for key in ("in_domain", "out_of_domain"):
        c = res.get(key)
        if not isinstance(c, dict):
            continue
        s = c.get(side) or {}
        text = c.get("text", key)
        if isinstance(s.get("perplexity"), (int, float)):
            out[f"perplexity ({text})"] = (float(s["perplexity"]), False)
        if isinstance(s.get("lee_pearson"), (int, float)):
            out["Lee Pearson r"] = (float(s["lee_pearson"]), True)
        if "embedding_cosine" in c:
            cos = 1.0 if side == "orig" else c.get("embedding_cosine")
            if isinstance(cos, (int, float)):
                out[f"embedding cosine ({text})"] = (float(cos), True)
    return out


def _norm(path: Any) -> str | None:
    import os

    return os.path.normpath(os.path.abspath(str(path))) if path else None


def _model_name(path: Any) -> str | None:
    """``lrc bench``'s name of a model file: its folder for an exported folder's model file,
    else its stem."""
    if not path:
        return None
    from pathlib import PurePath

    from lrc.graph.model import ONNX_NAMES

    p = PurePath(str(path))
    return p.parent.name if p.name in ONNX_NAMES and p.parent.name else p.stem


def join_bench_eval(bench: dict, evals: list[dict]) -> dict:
    """Join a bench result with eval results (see the module docstring).

    Returns ``{"items": [variants items], "models": [{"name", "label", "path", "dense",
    "quality"}] (the bench's models with a quality), "unmatched_bench": [names],
    "unmatched_eval": [paths]}``."""
    records: list[dict] = []  # {"path", "metrics", "dense"}
    for ev in evals:
        orig, pairs = eval_pairs(ev)
        if pairs:
            records.append({"path": orig, "metrics": _metrics(pairs[0][1], "orig"), "dense": True})
        for path, r in pairs:
            records.append({"path": path, "metrics": _metrics(r, "new"), "dense": False})
    records = [r for r in records if r["metrics"]]

    entries = [e for e in bench.get("models") or [] if isinstance(e, dict)]

    def find(e: dict) -> dict | None:
        ep = _norm(e.get("path"))
        for r in reversed(records):  # a later eval wins
            if ep and _norm(r["path"]) == ep:
                return r
        for r in reversed(records):
            name = _model_name(r["path"])
            if name and (name == e.get("name") or (e.get("baseline") and name == e["baseline"])):
                return r
        return None

    joined, used = [], set()
    for e in entries:
        r = find(e)
        if r is None:
            continue
        used.add(id(r))
        label = ("dense" if r["dense"] else
                 _BASELINE_LABELS.get(e.get("baseline"), f"ORT {e.get('baseline')}") if e.get("baseline")
                 else str(e.get("name")))
        size, read = e.get("size_bytes"), e.get("bytes_read")
        joined.append({"name": e.get("name"), "label": label, "path": e.get("path"),
                       "dense": r["dense"], "quality": r["metrics"],
                       "size_mb": size / 1e6 if isinstance(size, (int, float)) else None,
                       "read_mb": read / 1e6 if isinstance(read, (int, float)) else None})
    items: list[dict] = []
    groups: dict[tuple, dict[str, float]] = {}
    for run in bench.get("runs") or []:
        if isinstance(run, dict) and isinstance(run.get("speedup"), (int, float)):
            key = (run.get("ep"), run.get("phase"), run.get("batch"), run.get("seq"))
            groups.setdefault(key, {})[run.get("model")] = float(run["speedup"])
    for key in sorted(groups, key=lambda k: (_PHASE_ORDER.get(k[1], 9), str(k))):
        ep, phase, batch, seq = key
        vs = []
        for m in joined:
            sp = groups[key].get(m["name"])
            if sp is None:
                continue
            for metric, (q, hib) in m["quality"].items():
                vs.append({"name": m["label"], "speedup": sp, "quality": q, "metric": metric,
                           "higher_is_better": hib, "size_mb": m["size_mb"]})
        if vs:
            what = {"decode": "decode per token"}.get(phase, phase)
            items.append({"title": f"{what} ({ep}, batch {batch}, seq {seq})",
                          "variants": vs})
    sized = [{"name": m["label"], "size_mb": m["size_mb"], "quality": q, "metric": metric,
              "higher_is_better": hib}
             for m in joined if m["size_mb"] is not None for metric, (q, hib) in m["quality"].items()]
    if sized:
        items.append({"title": "model file", "x": "size_mb", "variants": sized})
    return {"items": items, "models": joined,
            "unmatched_bench": [e.get("name") for e in entries
                                if e.get("name") not in {m["name"] for m in joined}],
            "unmatched_eval": list(dict.fromkeys(
                r["path"] for r in records
                if _norm(r["path"]) not in {_norm(x["path"]) for x in records if id(x) in used}))}


def _quality_section(evals: list[dict]) -> str:
    """A table per eval result: every model's quality next to the original's."""
    parts = []
    for ev in evals:
        orig, pairs = eval_pairs(ev)
        if not pairs:
            continue
        rows = []
        first = pairs[0][1]
        for key in ("in_domain", "out_of_domain"):
            c0 = first.get(key)
            if not isinstance(c0, dict):
                continue
            text = c0.get("text", key)
            o = c0.get("orig") or {}
            if "perplexity" in o:
                rows.append([_model_name(orig) or "original", "(original)", text,
                             _Raw(_num(o.get("perplexity"), ".4g")), "", "", "", ""])
            elif "lee_pearson" in o:
                rows.append([_model_name(orig) or "original", "(original)", text,
                             _Raw(_num(o.get("lee_pearson"), ".4g")), "", "", "", ""])
            for path, r in pairs:
                c = r.get(key) or {}
                n = c.get("new") or {}
                if "perplexity" in n:
                    rows.append([_model_name(path) or "?", "", text, _Raw(_num(n.get("perplexity"), ".4g")),
                                 _Raw(_num(c.get("ppl_ratio"), ".3g")), _Raw(_num(c.get("kl"), ".4g")),
                                 _Raw(_num(c.get("top1_agreement"), ".3f")),
                                 _Raw(_num(c.get("logits_cosine"), ".4f"))])
                elif "embedding_cosine" in c:
                    rows.append([_model_name(path) or "?", "", text,
                                 _Raw(_num(n.get("lee_pearson"), ".4g")), "", "", "",
                                 _Raw(_num(c.get("embedding_cosine"), ".4f"))])
        lm = ev.get("kind") == "causal-lm"
        heads = (["model", "", "text", "perplexity", "x original", "KL", "top-1", "logits cosine"] if lm else
                 ["model", "", "text", "Lee Pearson r", "", "", "", "embedding cosine"])
        table = _table(heads, rows, left=3)
        if table:
            parts.append(table)
            if lm:
                c0 = first.get("in_domain") or {}
                parts.append(f'<p class="note">Sliding windows of {_esc(c0.get("context"))} tokens, '
                             f'{_esc(c0.get("tokens"))} scored tokens per text; {_esc(c0.get("bos"))}.</p>')
    return ("<h2>Quality</h2>" + "".join(parts)) if parts else ""


# --------------------------------------------------------------------------------------------
# peers' points: quality per byte against other toolchains
# --------------------------------------------------------------------------------------------

_PEER_COLOURS = {"NNCF": ("tab:green", "^"), "llama.cpp": ("tab:purple", "D"),
                 "ORT": ("tab:red", "s")}


def is_peers(item: Any) -> bool:
    """``benchmarks/peers.py``'s JSON: rows of other toolchains' ratios to dense and bytes."""
    return (isinstance(item, dict) and isinstance(item.get("rows"), list)
            and isinstance(item.get("dense"), dict))


def _peers_section(peers: dict, models: list[dict], evals: list[dict]) -> str:
    """This report's LMs (bench joined with eval) and the peers' points: perplexity / dense
    against bytes on disk and, where the bench read them, against the constants a decoded token
    reads; one panel per text. A peer row without ``bytes_read`` (NNCF's IR, llama.cpp's GGUF:
    their embedding table is also the head, so every weight is read) stands at its file size."""
    first = next((pairs[0][1] for _, pairs in map(eval_pairs, evals) if pairs), None)
    dense = next((m for m in models if m["dense"]), None)
    if first is None or dense is None or first.get("kind") not in (None, "causal-lm"):
        return ""
    texts = [(part, key, (first.get(part) or {}).get("text"))
             for part, key in (("in_domain", "x_news"), ("out_of_domain", "x_docs"))]
    ours = []
    for m in models:
        if m["dense"] or m["size_mb"] is None:
            continue
        ratios = {}
        for _, key, text in texts:
            q, d = m["quality"].get(f"perplexity ({text})"), dense["quality"].get(
                f"perplexity ({text})")
            if q and d:
                ratios[key] = q[0] / d[0]
        if len(ratios) == len(texts):
            ours.append({"name": m["label"], "mb": m["size_mb"], "read": m.get("read_mb"),
                         **ratios})
    theirs = [{"name": r.get("name"), "mb": r["bytes"] / 1e6, "x_news": r["x_news"],
               "x_docs": r["x_docs"], "read": (r.get("bytes_read") or r["bytes"]) / 1e6,
               "rule": not r.get("bytes_read"),
               "grid": bool((r.get("on_source_grid") or {}).get("on_grid"))} for r in peers["rows"]
              if isinstance(r, dict) and isinstance(r.get("x_news"), (int, float))
              and isinstance(r.get("x_docs"), (int, float)) and r.get("bytes")]
    if not ours or not theirs:
        return ""
    plt = _plt()
    sizes = [("mb", "model files (MB)")]
    if any(p["read"] for p in ours):
        sizes.append(("read", "constants read per decoded token (MB)"))
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 4.2 * len(sizes)), squeeze=False)
    for row_axes, (size, xlabel) in zip(axes, sizes):
        for ax, (part, key, text) in zip(row_axes, texts):
            mine = [p for p in ours if p[size]]
            ax.scatter([p[size] for p in mine], [p[key] for p in mine], c="tab:blue", marker="o",
                       label="this report's models", zorder=3)
            for p in mine:
                ax.annotate(p["name"], (p[size], p[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            for who, (colour, marker) in _PEER_COLOURS.items():
                ps = [p for p in theirs if str(p["name"]).startswith(who)]
                if ps:  # hollow: a peer whose weights are the reference GGUF's own again
                    ax.scatter([p[size] for p in ps], [p[key] for p in ps],
                               facecolors=["none" if p["grid"] else colour for p in ps],
                               edgecolors=colour, marker=marker, label=who, zorder=2)
            rest = [p for p in theirs if not str(p["name"]).startswith(tuple(_PEER_COLOURS))]
            if rest:
                ax.scatter([p[size] for p in rest], [p[key] for p in rest], c="tab:gray",
                           marker="x", label="other peers", zorder=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity / dense (lower is better)")
            ax.set_title(f"{text or part} ({'in' if part == 'in_domain' else 'out of'} domain)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)

    def read(p):
        return "-" if not p["read"] else ("≈ " if p.get("rule") else "") + _num(p["read"], ".1f")

    rows = [["this report", p["name"], _Raw(_num(p["mb"], ".1f")), _Raw(read(p)),
             _Raw(_num(p["x_news"], ".3f")), _Raw(_num(p["x_docs"], ".3f"))] for p in ours]
    rows += [["peers", p["name"] + (" (the reference's own grid again)" if p["grid"] else ""),
              _Raw(_num(p["mb"], ".1f")), _Raw(read(p)),
              _Raw(_num(p["x_news"], ".3f")), _Raw(_num(p["x_docs"], ".3f"))] for p in theirs]
    rows += [["peers", r.get("name"), "-", "-", r.get("why") or "no result", ""]
             for r in peers["rows"] if isinstance(r, dict) and r.get("x_news") is None]
    tokens = (first.get("in_domain") or {}).get("tokens")
    runs: dict = {}  # a JSON of merged runs: each row says when and where it ran
    for r in peers["rows"]:
        if isinstance(r, dict):
            runs.setdefault(r.get("date") or peers.get("date"),
                            r.get("machine") or peers.get("machine"))
    when = "; ".join(f"{_esc(d)} ({_esc(m)})" for d, m in sorted(runs.items(), key=str))
    note = (f'<p class="note">Peers measured by benchmarks/peers.py on {when} '
            f'on the same dense weights and texts, '
            f'{_esc(peers.get("max_tokens"))} tokens per text; this report\'s models on '
            f'{_esc(tokens)} scored tokens. Each point is a ratio to its own run\'s dense '
            f'perplexity; MB: the model files on disk; read: the constants a decoded token '
            f'reads (every weight but a table only a Gather reads; ≈: a peer whose embedding '
            f'table is also the head, at its file size); hollow: a peer whose quantised '
            f'weights are the reference GGUF\'s own values again (on_source_grid), a measure of '
            f'the source, not of the quantiser.</p>')
    return ("<h2>Quality per byte: this report's models and the peers'</h2>"
            + _fig_to_img(fig, "perplexity / dense against model bytes, with peers") + note
            + _table(["source", "model", "MB", "MB read per token", "x dense (in domain)",
                      "x dense (out of domain)"], rows, left=2))


# --------------------------------------------------------------------------------------------
# compression summaries: spectra and ranks
# --------------------------------------------------------------------------------------------

def _records(summary: dict, key: str) -> list[dict]:
    return [r for r in summary.get(key) or [] if isinstance(r, dict)]


def _spectra_plot(summary: dict) -> str:
    recs = [r for r in _records(summary, "nodes") + _records(summary, "rewritten")
            if isinstance(r.get("spectrum"), list) and len(r["spectrum"]) > 1]
    if not recs:
        return ""
    ranks = {r.get("name"): r.get("rank") for r in _records(summary, "rewritten")}
    seen, by_role = set(), {}
    for r in recs:
        if r.get("name") in seen:
            continue
        seen.add(r.get("name"))
        by_role.setdefault(str(r.get("role") or "other"), []).append(r)
    plt = _plt()
    from matplotlib import cm

    n = len(by_role)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    for ax, (role, rs) in zip(axes.flat, sorted(by_role.items())):
        blocks = [r.get("block") for r in rs if isinstance(r.get("block"), int)]
        bmax = max(blocks) if blocks else 1
        for r in rs:
            sv = [float(x) for x in r["spectrum"]]
            top = max(sv[0], 1e-30)
            y = [max(x / top, 1e-12) for x in sv]
            b = r.get("block")
            color = cm.viridis(b / max(1, bmax)) if isinstance(b, int) else "gray"
            ax.plot(range(1, len(y) + 1), y, color=color, lw=0.9)
            k = ranks.get(r.get("name"))
            if isinstance(k, int) and 0 < k <= len(y):
                ax.plot([k], [y[k - 1]], "v", color=color, ms=4)
        ax.set_yscale("log")
        ax.set_title(f"{role} ({len(rs)} weights)", fontsize=9)
        ax.set_xlabel("index", fontsize=8)
        ax.set_ylabel("sigma / sigma_max", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Singular-value spectra per role (colour = block, triangle = chosen rank)", fontsize=10)
    fig.tight_layout()
    return _fig_to_img(fig, "singular value spectra")


def _ranks_plot(summary: dict) -> str:
    recs = [r for r in _records(summary, "rewritten") if isinstance(r.get("rank"), (int, float))]
    if not recs:
        return ""
    plt = _plt()
    by_role: dict[str, list[dict]] = {}
    for r in recs:
        by_role.setdefault(str(r.get("role") or "other"), []).append(r)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for role, rs in sorted(by_role.items()):
        rs = sorted(rs, key=lambda r: (r.get("block") if isinstance(r.get("block"), int) else -1, str(r.get("name"))))
        xs = [r.get("block") if isinstance(r.get("block"), int) else i for i, r in enumerate(rs)]
        a1.plot(xs, [r["rank"] for r in rs], "o-", ms=3, label=role)
        fx, fy = [], []
        for x, r in zip(xs, rs):
            sh = r.get("shape")
            if isinstance(sh, (list, tuple)) and len(sh) == 2 and all(isinstance(d, int) and d > 0 for d in sh):
                fx.append(x)
                fy.append(r["rank"] * (sh[0] + sh[1]) / (sh[0] * sh[1]))
        if fx:
            a2.plot(fx, fy, "o-", ms=3, label=role)
    a1.set_xlabel("block")
    a1.set_ylabel("rank")
    a1.set_title("rank chosen per layer", fontsize=10)
    a2.set_xlabel("block")
    a2.set_ylabel("params kept: r(in+out)/(in*out)")
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_title("fraction of dense parameters kept", fontsize=10)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    return _fig_to_img(fig, "ranks per layer")


def _summary_section(summary: dict, idx: int) -> str:
    parts = []
    spectra = _spectra_plot(summary)
    ranks = _ranks_plot(summary)
    totals = summary.get("totals") if isinstance(summary.get("totals"), dict) else {}
    if not (spectra or ranks or totals):
        return ""
    title = summary.get("model") or summary.get("name") or f"summary {idx}"
    parts.append(f"<h2>Compression: {_esc(title)}</h2>")
    if totals:
        parts.append(_table(["total", "value"], [[k, _Raw(_num(v))] for k, v in totals.items()
                                                 if isinstance(v, (int, float, str))]))
    if spectra:
        parts.append("<h3>Singular-value spectra</h3>" + spectra)
    if ranks:
        parts.append("<h3>Ranks</h3>" + ranks)
        recs = _records(summary, "rewritten")
        rows = [[r.get("name"), r.get("role"), _Raw(_num(r.get("block"))), _Raw(_num(r.get("rank"))),
                 _esc("x".join(str(d) for d in r.get("shape") or []))] for r in recs]
        parts.append(_table(["node", "role", "block", "rank", "shape"], rows, left=2))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def render_report(results: list[dict], summaries: list[dict] | None = None, title: str = "lrc report") -> str:
    """The HTML text of the report (see the module docstring for the accepted shapes)."""
    results = [r for r in (results or []) if isinstance(r, dict)]
    summaries = [s for s in (summaries or []) if isinstance(s, dict)]
    # summaries passed in results are accepted too
    summaries += [r for r in results if ("rewritten" in r or "nodes" in r) and r not in summaries]
    body: list[str] = []
    nb = 0
    benches = [r for r in results if is_bench(r)]
    evals = [r for r in results if is_eval(r)]
    for r in benches:
        nb += 1
        body.append(_bench_section(r, nb))
    joins = [join_bench_eval(b, evals) for b in benches] if evals else []
    for i, joined in enumerate(joins, 1):
        for item in joined["items"]:
            if len(benches) > 1:
                item["title"] = f"benchmark {i}, {item['title']}"
            body.append(_variants_section(item))
    for r in results:
        if "variants" in r:
            body.append(_variants_section(r))
    for p in (r for r in results if is_peers(r)):
        for joined in joins[:1]:
            body.append(_peers_section(p, joined["models"], evals))
    if evals:
        body.append(_quality_section(evals))
    for i, s in enumerate(summaries, 1):
        body.append(_summary_section(s, i))
    body = [b for b in body if b]
    if not body:
        body.append('<p class="note">No data: nothing to report.</p>')
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_esc(title)}</h1><p class=\"note\">Generated {stamp} by lrc.</p>"
            + "".join(body) + "</body></html>\n")


def write_report(results: list[dict], out_html: Path, summaries: list[dict] | None = None,
                 title: str = "lrc report") -> Path:
    """Write the self-contained HTML report to ``out_html`` and return its path."""
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(results, summaries, title), encoding="utf-8")
    return out
