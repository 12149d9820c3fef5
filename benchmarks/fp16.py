#!/usr/bin/env python3
"""A float16 export of SmolLM2-135M end to end: export, compress, eval, bench, peak memory.

    python benchmarks/fp16.py            # measure, print the section
    python benchmarks/fp16.py --write    # also write it into BENCHMARKS.md
    python benchmarks/fp16.py --render-only --write   # the section from OUT/results.json

What it does (every figure measured in the run):

1. the float32 export (``lrc export smollm2-135m``; one benchmarks/run.py, quant.py or
   memory.py made is reused: the export is deterministic) and ``lrc export smollm2-135m
   --dtype float16`` (ONNX Runtime's float16 converter, float32 inputs and outputs), kept in OUT;
2. ``lrc compress DENSE --ratio 0.8`` (the default recipe: auto -> SVD-LLM + update) of each,
   in a fresh process whose peak RSS is recorded (benchmarks/memory.py's ``peak_run``);
3. ``lrc eval`` of the float16 export and of both compressed models against the float32 export
   (perplexity on 2048 tokens of the news text, in the calibration domain, and of the Python
   docs, out of it; KL and top-1 against float32 dense);
4. one interleaved ``lrc bench`` of the four (ONNX Runtime CPU EP: prefill of 128 tokens and the
   per-token decode step), so the ratios come from one process;
5. prints a Markdown section; ``--write`` replaces the text between ``<!-- fp16:begin -->`` and
   ``<!-- fp16:end -->`` in BENCHMARKS.md (appended when absent).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import memory  # noqa: E402  (peak_run)
import run as R  # noqa: E402  (export, logging)
from recipe import lrc as _lrc  # noqa: E402  (the CLI in a subprocess, failing in one line)

log = R.log
MARK_BEGIN, MARK_END = "<!-- fp16:begin -->", "<!-- fp16:end -->"
MB = 1e6
FLAGS = ["--ratio", "0.8"]


def lrc(*args):
    return _lrc(*map(str, args))


def dense32(out: Path) -> Path:
    for c in (ROOT / "bench-out" / "models" / "smollm2" / "dense",
              ROOT / "bench-out" / "memory" / "dense", out / "dense32"):
        if (c / "model.onnx").is_file():
            return c
    log("lrc export smollm2-135m (float32)")
    lrc("export", "smollm2-135m", "-o", out / "dense32", "--force", "--exporter", "optimum")
    return out / "dense32"


def measure(args) -> dict:
    from lrc.graph.model import file_size
    from lrc.measure.machine import machine_info

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    d32 = dense32(out)
    d16 = out / "dense16"
    if not (d16 / "model.onnx").is_file():
        log("lrc export smollm2-135m --dtype float16")
        t = time.perf_counter()
        lrc("export", "smollm2-135m", "-o", d16, "--force", "--dtype", "float16",
            "--exporter", "optimum")
        log(f"  {time.perf_counter() - t:.0f} s")
    models = {"dense32": d32, "dense16": d16}
    rows: dict = {k: {"path": str(p), "size": file_size(p / "model.onnx")} for k, p in models.items()}
    for src, key in (("dense32", "c32"), ("dense16", "c16")):
        dst = out / key
        log(f"compress {src} {' '.join(FLAGS)}")
        env = {"LRC_CACHE_DIR": str(out / "cache"), **R.blas_env()}
        r = memory.peak_run(["compress", str(models[src]), "-o", str(dst), "--force", *FLAGS],
                            out / f"{key}.log", env=env)
        if r["rc"]:
            raise SystemExit(f"compress {src} failed: {r.get('error')}")
        rep = json.loads((dst / "lrc.json").read_text())
        rows[key] = {"path": str(dst), "size": file_size(dst / "model.onnx"),
                     "peak_rss": r["peak_rss"], "wall_s": r["wall_s"], "source": src,
                     "method": rep.get("method")}
        rows[src]["compress_peak_rss"] = r["peak_rss"]
        models[key] = dst
    for key in ("dense16", "c32", "c16"):
        log(f"eval dense32 {key}")
        res = json.loads(lrc("eval", d32, models[key], "--max-tokens", args.max_tokens,
                             "--json").stdout)
        rows[key]["in"], rows[key]["ood"] = res["in_domain"], res["out_of_domain"]
        rows["dense32"].setdefault("in", {"new": res["in_domain"]["orig"]})
        rows["dense32"].setdefault("ood", {"new": res["out_of_domain"]["orig"]})
    log("bench (interleaved, CPU EP)")
    order = ["dense32", "dense16", "c32", "c16"]
    bench = json.loads(lrc("bench", *[models[k] for k in order], "--runs", args.runs,
                           "--json").stdout)
    names = list(dict.fromkeys(r["model"] for r in bench["runs"]))
    for key, name in zip(order, names):
        for r in bench["runs"]:
            if r["model"] == name:
                rows[key].setdefault("bench", {})[r["phase"]] = {
                    "p50_ms": r.get("p50_ms"), "speedup": r.get("speedup"), "seq": r.get("seq")}
    mach = machine_info()
    return {"date": time.strftime("%Y-%m-%d"), "rows": rows, "max_tokens": args.max_tokens,
            "runs": args.runs, "machine": {"cpu": mach.get("cpu"),
                                           "cores": mach.get("logical_cores"),
                                           "onnxruntime": mach.get("onnxruntime"),
                                           "python": platform.python_version()},
            "notes": bench.get("notes", [])}


def _ppl(row: dict, dom: str, ref: float) -> str:
    p = row[dom]["new"]["perplexity"]
    return f"{p:.1f} (x{p / ref:.2f})"


def render(res: dict) -> str:
    rows = res["rows"]
    ref_in = rows["dense32"]["in"]["new"]["perplexity"]
    ref_ood = rows["dense32"]["ood"]["new"]["perplexity"]
    labels = {"dense32": "float32 export (`lrc export smollm2-135m --exporter optimum`)",
              "dense16": "float16 export (`--dtype float16`)",
              "c32": f"float32, compressed (`lrc compress DENSE {' '.join(FLAGS)}`)",
              "c16": f"float16, compressed (`lrc compress DENSE {' '.join(FLAGS)}`)"}
    m = res["machine"]
    L = [MARK_BEGIN, "## A float16 export end to end (SmolLM2-135M)", "",
         f"`python benchmarks/fp16.py --write`, {res['date']}, {m['cpu']} ({m['cores']} cores), "
         f"ONNX Runtime {m['onnxruntime']}. The float16 model is `lrc export smollm2-135m "
         "--exporter optimum --dtype float16` (ONNX Runtime's float16 converter; inputs, "
         "outputs and KV cache stay float32 behind Casts). Both exports are compressed by the default command "
         f"(`{' '.join(FLAGS)}`: auto, SVD-LLM + update, recipe best); the float16 one keeps "
         "float16 factors. Quality against the float32 export on "
         f"{res['max_tokens']} tokens of the news text (calibration domain) and of the Python "
         f"docs (out of domain); speed from one interleaved `lrc bench` (CPU EP, {res['runs']} "
         "runs, medians: prefill of 128 tokens, one decode step), speedups against float32 "
         "dense; peak RSS of `lrc compress` in a fresh process (`benchmarks/memory.py`'s "
         "measure).", "",
         "| model | file MB | ppl news (x fp32 dense) | ppl docs (x fp32 dense) | KL news / docs "
         "| prefill ms (x) | decode ms (x) | compress peak RSS |",
         "|---|---|---|---|---|---|---|---|"]
    for key in ("dense32", "dense16", "c32", "c16"):
        r = rows[key]
        kl = (f"{r['in']['kl']:.4f} / {r['ood']['kl']:.4f}" if "kl" in r["in"] else "-")
        b = r.get("bench", {})

        def ms(ph):
            x = b.get(ph) or {}
            if x.get("p50_ms") is None:
                return "-"
            return f"{x['p50_ms']:.1f} (x{x['speedup']:.2f})" if x.get("speedup") else \
                f"{x['p50_ms']:.1f}"

        rss = r.get("peak_rss")
        src = rows.get(r.get("source", ""), {})
        rss_txt = f"{rss / MB:,.0f} MB ({rss / src['size']:.2f}x its input)" if rss else "-"
        L.append(f"| {labels[key]} | {r['size'] / MB:,.0f} | {_ppl(r, 'in', ref_in)} | "
                 f"{_ppl(r, 'ood', ref_ood)} | {kl} | {ms('prefill')} | {ms('decode')} | {rss_txt} |")
    c32, c16 = rows["c32"], rows["c16"]
    d16 = rows["dense16"]
    L += ["",
          f"- float16 halves the file ({rows['dense32']['size'] / MB:,.0f} -> "
          f"{d16['size'] / MB:,.0f} MB dense, {c32['size'] / MB:,.0f} -> {c16['size'] / MB:,.0f} MB "
          f"compressed) and moves dense perplexity by x{d16['in']['new']['perplexity'] / ref_in:.3f}"
          f" / x{d16['ood']['new']['perplexity'] / ref_ood:.3f}; compressed, float16 gives "
          f"x{c16['in']['new']['perplexity'] / ref_in:.2f} / x{c16['ood']['new']['perplexity'] / ref_ood:.2f} "
          f"of float32 dense against x{c32['in']['new']['perplexity'] / ref_in:.2f} / "
          f"x{c32['ood']['new']['perplexity'] / ref_ood:.2f} for float32.",
          "- ONNX Runtime's CPU EP has no float16 MatMul kernel: it runs the float16 graph "
          "through float32 casts it inserts itself, so the speed column is what a CPU user sees, "
          "not what a GPU would do.",
          f"- Compress peak RSS: float32 {c32['peak_rss'] / MB:,.0f} MB "
          f"({c32['peak_rss'] / rows['dense32']['size']:.2f}x its {rows['dense32']['size'] / MB:,.0f} MB "
          f"input), float16 {c16['peak_rss'] / MB:,.0f} MB "
          f"({c16['peak_rss'] / d16['size']:.2f}x its {d16['size'] / MB:,.0f} MB input); wall "
          f"{c32['wall_s']:.0f} / {c16['wall_s']:.0f} s.",
          f"- Machine: {platform.machine()}, Python {m['python']}."
          + (" Bench notes: " + "; ".join(res["notes"]) if res.get("notes") else ""),
          MARK_END]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "fp16")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    if args.render_only:
        res = json.loads((args.out / "results.json").read_text())
    else:
        res = measure(args)
        (args.out / "results.json").write_text(json.dumps(res, indent=1))
    section = render(res)
    print(section)
    if args.write:
        from quant import write_section

        write_section(ROOT / "BENCHMARKS.md", section, MARK_BEGIN, MARK_END)
        log("wrote the fp16 section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
