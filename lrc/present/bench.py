"""Terminal tables of a bench result (``lrc.measure.bench.bench``, schema ``lrc.bench/1``):
the machine and protocol with the runtimes measured on (version, device, precision, threads), the
models (size, load time, memory, parameter ratio, Amdahl bound), latencies per runtime and
execution provider, the profiled MatMul time fraction, and the notes (what a runtime could not
run, and why)."""

from __future__ import annotations

__all__ = ["format_tables"]

_MB = 1e6


def _paired(r: dict) -> str:
    ci = r.get("speedup_ci95")
    if r.get("paired_speedup") is None or not ci:
        return "-"
    return f"{r['paired_speedup']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt(x, spec=".2f", none="-") -> str:
    return none if x is None else format(x, spec)


def format_tables(result: dict) -> list:
    """rich Tables: machine/settings, models (size, load, memory, rho, bound), latencies per EP."""
    from rich.table import Table

    tables = []
    m, s = result.get("machine", {}), result.get("settings", {})
    t = Table(title="Machine", show_header=False)
    t.add_column("key")
    t.add_column("value")
    t.add_row("CPU", f"{m.get('cpu')} ({m.get('physical_cores')} physical / {m.get('logical_cores')} logical cores)")
    if m.get("gpu"):
        t.add_row("GPU", str(m["gpu"]))
    t.add_row("onnxruntime", f"{m.get('onnxruntime')} ({', '.join(m.get('available_providers', []))})")
    t.add_row("EPs", ", ".join(s.get("eps", [])))
    targets = {t_["key"]: t_ for t_ in s.get("targets", [])}
    if targets:
        t.add_row("runtimes", "; ".join(_target_label(x) for x in targets.values()))
    t.add_row("threads", str(s.get("threads") or s.get("threads_note", "default")))
    t.add_row("protocol", f"{s.get('warmup')} warm-ups, {s.get('runs')} runs round-robin, spinning off")
    tables.append(t)

    t = Table(title="Models")
    for col in ("model", "kind", "size MB", "load s", "RSS MB", "peak MB", "weight params", "rho", "Amdahl bound",
                "bytes bound"):
        t.add_column(col, justify="left" if col in ("model", "kind") else "right")
    for e in result.get("models", []):
        sess = next(iter(e.get("sessions", {}).values()), {})
        bound = e.get("amdahl_bound") or {}
        t.add_row(e["name"], e.get("kind", "?"), _fmt(e.get("size_bytes", 0) / _MB, ".1f"),
                  _fmt(sess.get("load_s"), ".2f"), _fmt(sess.get("rss_after_first_run_mb"), ".1f"),
                  _fmt(sess.get("peak_rss_mb"), ".1f"),
                  _fmt(e.get("weight_matmul_params"), ",d") if e.get("weight_matmul_params") is not None else "-",
                  _fmt(e.get("flop_ratio"), ".3f"),
                  " ".join(f"{k} {v:.2f}x" for k, v in bound.items()) or "-",
                  _fmt(e.get("bytes_bound"), ".2f") + "x" if e.get("bytes_bound") else "-")
    tables.append(t)

    rows = result.get("runs", [])
    for ep in dict.fromkeys(r["ep"] for r in rows):
        title = _target_label(targets[ep]) if ep in targets else ep
        t = Table(title=f"Latency ({title}); speedup: to the first model on the same runtime "
                        "(p50 / p50; paired: the median of round-by-round ratios, 95 % interval)")
        for col in ("model", "phase", "input", "p50 ms", "p90 ms", "p99 ms", "mean ms", "speedup",
                    "paired [95 %]", "tok/s"):
            t.add_column(col, justify="left" if col in ("model", "phase") else "right")
        for r in rows:
            if r["ep"] != ep:
                continue
            shape = r.get("input") or f"{r['batch']}x{r['seq']}"
            if r["phase"] == "decode":
                shape = f"{r['batch']}x1 after {shape}"
            t.add_row(r["model"], r["phase"], shape, _fmt(r["p50_ms"], ".3f"),
                      _fmt(r["p90_ms"], ".3f"), _fmt(r["p99_ms"], ".3f"), _fmt(r["mean_ms"], ".3f"),
                      _fmt(r.get("speedup"), ".2f"), _paired(r), _fmt(r.get("tokens_per_s"), ".1f"))
        tables.append(t)
    amd = result.get("amdahl")
    if amd:
        t = Table(title="Amdahl (time fraction in weight MatMuls of the first model)", show_header=False)
        t.add_column("phase")
        t.add_column("f")
        for ph, f in amd["matmul_fraction"].items():
            t.add_row(ph, f"{f:.3f}")
        tables.append(t)
    notes = list(result.get("notes", [])) + [f"{e['name']}: {n}" for e in result.get("models", [])
                                             for n in e.get("notes", [])]
    if notes:
        t = Table(title="Notes", show_header=False)
        t.add_column("note", overflow="fold")
        for n in notes:
            t.add_row(n)
        tables.append(t)
    return tables


def _target_label(target: dict) -> str:
    """"ONNX Runtime 1.32.0 cpu, f32, 2 threads" for one entry of ``settings.targets``."""
    d = target.get("describe") or {}
    title = d.get("title") or target.get("runtime", "?")
    thr = d.get("threads")
    return (f"{title} {d.get('version') or ''} {d.get('device') or target.get('key')}, "
            f"{d.get('precision', 'f32')}, {f'{thr} threads' if thr else 'default threads'}"
            ).replace("  ", " ")
