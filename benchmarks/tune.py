"""What ``lrc tune`` chooses for the bundled models, and every number it measured on the way.

Runs ``lrc tune`` with its defaults (budget 10 % perplexity increase on news *and* docs for
SmolLM2-135M, 0.01 absolute drop of the Lee Pearson r for all-MiniLM-L6-v2; objective latency;
CPU EP, 2 threads) on the dense exports and writes ``benchmarks/tune.md``: each candidate's
recipe, size, quality, loss, and speedup when it was within budget (only those are timed), the
Pareto frontier, the choice and tune's reason, and how long the search took.

    python benchmarks/tune.py                  # both models
    python benchmarks/tune.py --models minilm  # one

The dense models come from ``bench-out/models/<model>/dense`` when ``make bench`` left them,
else they are exported with ``lrc export`` into ``bench-out/tune``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"minilm": ("minilm-l6", "all-MiniLM-L6-v2"),
          "smollm2": ("smollm2-135m", "SmolLM2-135M-Instruct")}
T0 = time.perf_counter()


def log(msg: str) -> None:
    el = time.perf_counter() - T0
    print(f"[{int(el // 60):02d}:{el % 60:04.1f}] {msg}", flush=True)


def lrc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrc.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def dense_model(key: str, work: Path) -> Path:
    d = ROOT / "bench-out" / "models" / key / "dense"
    if (d / "model.onnx").is_file():
        return d
    d = work / key / "dense"
    if not (d / "model.onnx").is_file():
        log(f"exporting {MODELS[key][0]} -> {d}")
        r = lrc("export", MODELS[key][0], "-o", str(d), "--force", "--exporter", "optimum")
        if r.returncode != 0:
            raise SystemExit(f"export failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    return d


def _q(kind: str, q: dict | None) -> str:
    if not q:
        return "-"
    if kind == "encoder":
        return f"r {q['lee_pearson']:.3f}"
    return f"{q['news']:.1f} / {q['docs']:.1f}"


def table(res: dict) -> list[str]:
    kind = res["kind"]
    qh = "Lee r" if kind == "encoder" else "ppl news / docs"
    lines = [f"| candidate | recipe | size MB | {qh} | loss | within budget | speedup |",
             "|---|---|---|---|---|---|---|"]
    front = set(res["frontier"])
    for c in [res["dense"]] + res["candidates"]:
        name = c["name"] + (" **(chosen)**" if c["name"] == res["chosen"] else "") + \
            (" *(frontier)*" if c["name"] in front and c["name"] != "dense" else "")
        if c.get("skipped") or c.get("error"):
            lines.append(f"| {name} | {c['recipe']} | - | - | - | "
                         f"{'skipped: ' + c['skipped'] if c.get('skipped') else 'failed: ' + c['error']} | - |")
            continue
        sp = c.get("speedup")
        lat = c.get("latency") or {}
        detail = " / ".join(f"{ph} {v['speedup']:.2f}" for ph, v in lat.items() if v.get("speedup"))
        sp_s = "-" if sp is None else (f"{sp:.2f}" + (f" ({detail})" if detail and len(lat) > 1 else ""))
        lines.append(f"| {name} | {c['recipe']} | {c['size_bytes'] / 1e6:.1f} | {_q(kind, c.get('quality'))} "
                     f"| {c['loss']:+.4f} | {'yes' if c['within_budget'] else 'no'} | {sp_s} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "tune")
    ap.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "tune.md")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    sections = []
    for key in args.models:
        dense = dense_model(key, args.out)
        js = args.out / f"{key}.json"
        log(f"{key}: lrc tune {dense}")
        t = time.perf_counter()
        r = lrc("tune", str(dense), "-o", str(args.out / f"{key}-tuned"), "--force",
                "--save", str(js))
        secs = time.perf_counter() - t
        if not js.is_file():
            print(f"{key}: tune failed: {(r.stderr or r.stdout).strip()[-2000:]}", file=sys.stderr)
            return 1
        res = json.loads(js.read_text())
        log(f"{key}: chose {res['chosen']} in {secs:.0f} s: {res['reason']}")
        sections += [f"## {MODELS[key][1]}", "",
                     f"Budget: {res['budget']['definition']}. Search took {res['seconds'] / 60:.1f} min "
                     f"(exit code {r.returncode}; 1 means nothing was written).", ""]
        sections += table(res)
        sections += ["", f"**Choice: {res['chosen'] or 'nothing'}** — {res['reason']}", ""]
    lines = [
        "# `lrc tune` on the bundled models",
        "",
        f"Generated by `python benchmarks/tune.py` (`make bench-tune`). Date "
        f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, ONNX Runtime "
        f"{onnxruntime.__version__}, Python {platform.python_version()}; run took "
        f"{(time.perf_counter() - T0) / 60:.1f} min.",
        "",
        "`lrc tune MODEL` with its defaults: every candidate is built and evaluated (unless a measured "
        "model that keeps strictly more is already clearly over budget: *skipped*), those within "
        "budget are timed against dense in one interleaved bench (20 runs; decoders: geometric mean "
        "of the prefill-128 and decode speedups), and the fastest within budget is written — a plain "
        "quantised one unless low rank beats it by more than 5 %. Speedups are from this single run "
        "on a shared 2-core machine: differences under ~10 % are noise.",
        "",
        "Not the same settings as BENCHMARKS.md, so the numbers differ: tune evaluates perplexity on the "
        "first 1024 tokens (BENCHMARKS.md: 4096), and its *int8* quantises the weight MatMuls only "
        "(lrc.quantize), while BENCHMARKS.md's ORT INT8 baseline is `quantize_dynamic` with its default "
        "operator list, which also stores the embedding table (`Gather`) as int8 — hence 58.7 MB here "
        "and 22.9 MB there for MiniLM, with the same MatMul kernels.",
        "",
    ] + sections
    args.markdown.write_text("\n".join(lines) + "\n")
    log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
