"""Tables for ``lrc tune`` results (see :func:`lrc.tune.tune` for the result's fields)."""

from __future__ import annotations


def format_tables(result: dict) -> list:
    """rich Tables: every candidate (quality, loss, size, speed), then the Pareto frontier."""
    from rich.table import Table

    lm = result["kind"] == "causal-lm"
    budget = result["budget"]["max_quality_loss"]
    rows = [result["dense"]] + result["candidates"]
    front = set(result["frontier"])
    t = Table(title=f"tune: {result['model']} ({result['kind']}, budget: "
                    f"{result['budget']['definition']})", header_style="bold")
    cols = ["candidate", "recipe"] + (["ppl news", "ppl docs"] if lm else ["Lee r"]) + \
        ["loss", "size MB", "speedup", "frontier"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("candidate", "recipe") else "right")
    for c in rows:
        q = c.get("quality") or {}
        qual = ([_f(q.get("news")), _f(q.get("docs"))] if lm else [_f(q.get("lee_pearson"), 4)])
        if c.get("error") or c.get("skipped"):
            note = (f"[red]failed: {c['error'][:60]}[/red]" if c.get("error")
                    else f"[dim]skipped: {c['skipped']}[/dim]")
            t.add_row(c["name"], f"{c['recipe']}\n{note}", *["-"] * len(qual), "-", "-", "-", "")
            continue
        loss = c.get("loss")
        over = loss is not None and loss > budget + 1e-12
        lstr = "-" if loss is None else (f"{loss:+.1%}" if lm else f"{loss:+.4f}")
        sp = c.get("speedup")
        t.add_row(c["name"] + (" [bold green]<- chosen[/bold green]"
                               if c["name"] == result.get("chosen") else ""),
                  c["recipe"], *qual, f"[red]{lstr}[/red]" if over else lstr,
                  f"{c.get('size_bytes', 0) / 1e6:.1f}",
                  "-" if sp is None else f"{sp:.2f}x", "*" if c["name"] in front else "")
    t.caption = ("loss: " + ("worse of ppl/dense - 1 over news and docs" if lm else
                             "dense Pearson - Pearson (absolute)")
                 + "; speedup: dense p50 / p50, interleaved (decoders: geometric mean of prefill "
                   "and decode); '-' = over budget, not timed; * = Pareto frontier of "
                 + ("speed" if result["objective"] == "latency" else "size") + " vs loss")
    return [t]


def _f(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"
