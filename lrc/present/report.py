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
   carry ``variants``.

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


def _variants_section(item: dict) -> str:
    variants = [v for v in item.get("variants") or []
                if isinstance(v, dict) and isinstance(v.get("speedup"), (int, float))
                and isinstance(v.get("quality"), (int, float))]
    if not variants:
        return ""
    default_metric = item.get("metric", "quality")
    default_hib = item.get("higher_is_better", True)
    by_metric: dict[tuple[str, bool], list[dict]] = {}
    for v in variants:
        key = (v.get("metric", default_metric), bool(v.get("higher_is_better", default_hib)))
        by_metric.setdefault(key, []).append(v)
    parts = [f"<h2>Speed vs quality{': ' + _esc(item['title']) if item.get('title') else ''}</h2>"]
    plt = _plt()
    for (metric, hib), vs in by_metric.items():
        pts = [(float(v["speedup"]), float(v["quality"])) for v in vs]
        front = pareto_front(pts, hib)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="#7a9cc6", zorder=2, label="variants")
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.plot(fx, fy, "-o", color="#c0392b", zorder=3, label="Pareto frontier")
        for v, (x, y) in zip(vs, pts):
            ax.annotate(str(v.get("name", "")), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if not hib and all(p[1] > 0 for p in pts) and max(p[1] for p in pts) / min(p[1] for p in pts) > 50:
            ax.set_yscale("log")
        ax.set_xlabel("speedup (x)")
        ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        parts.append(f"<h3>{_esc(metric)}</h3>")
        parts.append(_fig_to_img(fig, f"speed vs {metric}"))
        on_front = set(front)
        rows = [[v.get("name"), _Raw(_num(float(v["speedup"]), ".2f")), _Raw(_num(float(v["quality"]), ".4g")),
                 _Raw(_num(v.get("size_mb"), ".1f")), "yes" if i in on_front else ""]
                for i, v in enumerate(vs)]
        parts.append(_table(["variant", "speedup", metric, "size MB", "Pareto"], rows))
    return "".join(parts)


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
    for r in results:
        if "runs" in r or r.get("schema", "").startswith("lrc.bench"):
            nb += 1
            body.append(_bench_section(r, nb))
    for r in results:
        if "variants" in r:
            body.append(_variants_section(r))
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
