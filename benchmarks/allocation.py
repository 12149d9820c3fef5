#!/usr/bin/env python3
"""Where to spend a fixed parameter budget: uniform ratio vs dense blocks vs role split.

    python benchmarks/allocation.py            # ~15 min on 2 cores; writes benchmarks/allocation.md
    python benchmarks/allocation.py --reuse    # reuse compressed folders of an earlier run

Every variant keeps 0.78 of the projection parameters (the head, tied to the embedding, is left
dense and not counted) and is compressed with ``lrc compress --method svd-llm --group-inputs
--update`` (16384 calibration tokens of lrc's bundled mix: news, wiki markup, forum
dialogue, Python code). The
variants differ only in where the budget goes:

* uniform 0.78 everywhere;
* block 0 kept dense, the other 29 blocks at a uniform 0.7724;
* block 15 kept dense instead (a control: does *any* dense block help?), same ratios;
* blocks 0 and 29 kept dense, the other 28 at a uniform 0.7643 (``--dense-edges --ratio
  0.7643``; ``--target-params`` would count the head, which stays dense, in its total);
* blocks 0 and 29 dense, attention 0.62 / MLP 0.812 in the others
  (``benchmarks/policies/smollm2-0.78.yaml``, the variant BENCHMARKS.md reports).

Perplexity is measured on five texts: ``news`` and ``docs`` (the two BENCHMARKS.md uses, which
the policy file was chosen on) and ``wiki``, ``forum`` and ``code`` (held-out halves of three
calibration domains, never looked at when choosing), windows of 256 tokens, first 4096 tokens of each
(lrc.evaluate.perplexity). The dense model comes from ``bench-out/models/smollm2/dense`` when
``make bench`` left one, else it is exported with ``lrc export``.

Then the same question on all-MiniLM-L6-v2 (6 blocks), at 0.7 of all projection parameters
(BENCHMARKS.md's MiniLM operating point), same method: uniform 0.7; block 0 dense, others 0.64;
block 3 dense (control), others 0.64; block 5 (the last) dense, others 0.64; blocks 0 and 5 dense
(``--dense-edges --target-params 0.7``, others 0.55). Quality: Lee 2005 Pearson r and the mean
cosine between the variant's and the dense model's sentence embeddings, on the Lee documents and
on out-of-domain Python-docs passages (``lrc eval``). The Lee r is a noisy 1225-pair correlation
(compressed models score above dense); the embedding cosine is the steadier measure of damage.
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
POLICY = ROOT / "benchmarks" / "policies"
TEXTS = ("news", "docs", "wiki", "forum", "code")
T0 = time.perf_counter()


def log(msg: str) -> None:
    el = time.perf_counter() - T0
    print(f"[{int(el // 60):02d}:{el % 60:04.1f}] {msg}", flush=True)


def variants(work: Path) -> list[dict]:
    def pol(name: str, text: str) -> str:
        p = work / f"{name}.yaml"
        p.write_text(text)
        return str(p)

    return [
        {"key": "uniform", "label": "uniform 0.78", "args": ["--ratio", "0.78"]},
        {"key": "b0", "label": "block 0 dense, others 0.7724",
         "args": ["--policy", pol("b0", 'ratio: 0.7724\nblocks: {"0": skip}\n')]},
        {"key": "b15", "label": "block 15 dense (control), others 0.7724",
         "args": ["--policy", pol("b15", 'ratio: 0.7724\nblocks: {"15": skip}\n')]},
        {"key": "b0b29", "label": "blocks 0 and 29 dense (--dense-edges), others 0.7643",
         "args": ["--dense-edges", "--ratio", "0.7643"]},
        {"key": "split", "label": "blocks 0 and 29 dense, attn 0.62 / MLP 0.812 (policy file)",
         "args": ["--policy", str(POLICY / "smollm2-0.78.yaml")]},
    ]


def lrc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrc.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "allocation")
    ap.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "allocation.md")
    ap.add_argument("--reuse", action="store_true", help="reuse compressed folders of an earlier run")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from lrc.measure.quality import perplexity

    dense = ROOT / "bench-out" / "models" / "smollm2" / "dense"
    if not (dense / "model.onnx").is_file():
        dense = args.out / "dense"
        if not (dense / "model.onnx").is_file():
            log(f"exporting smollm2-135m -> {dense}")
            r = lrc("export", "smollm2-135m", "-o", str(dense), "--force", "--exporter", "optimum")
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
    rows = []
    q = {t: perplexity(dense, text=t)["perplexity"] for t in TEXTS}
    rows.append({"key": "dense", "label": "dense", "ppl": q, "params": None, "seconds": None})
    log("dense: " + ", ".join(f"{t} {v:.2f}" for t, v in q.items()))
    for v in variants(args.out):
        out = args.out / v["key"]
        if not (args.reuse and (out / "lrc.json").is_file()):
            t = time.perf_counter()
            r = lrc("compress", str(dense), "-o", str(out), "--force", "--recipe", "plain",
                    "--exclude", "head",
                    "--method", "svd-llm", "--group-inputs", "--update", *v["args"])
            if r.returncode != 0:
                print(f"{v['key']}: {(r.stderr or r.stdout).strip()[-1000:]}", file=sys.stderr)
                return 1
            secs = time.perf_counter() - t
        else:
            secs = None
        rep = json.loads((out / "lrc.json").read_text())
        # parameters kept over every projection but the head (dense blocks count in full)
        kept = total = 0
        for x in rep["rewritten"]:
            kept, total = kept + x["params_after"], total + x["params_before"]
        for x in rep["skipped"]:
            if x.get("role") != "head" and x.get("shape"):
                n = int(x["shape"][0]) * int(x["shape"][1])
                kept, total = kept + n, total + n
        q = {t: perplexity(out, text=t)["perplexity"] for t in TEXTS}
        rows.append({"key": v["key"], "label": v["label"], "ppl": q,
                     "params": kept / total if total else None, "seconds": secs})
        log(f"{v['key']}: params {kept / total:.4f}, " + ", ".join(f"{t} {x:.2f}" for t, x in q.items())
            + (f" [{secs:.0f} s]" if secs else ""))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    d = rows[0]["ppl"]
    import onnxruntime

    lines = [
        "# Where to spend the parameters: uniform ratio vs dense blocks",
        "",
        "Generated by `benchmarks/allocation.py` — do not edit by hand (its docstring says what it "
        f"runs). Date {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, ONNX Runtime "
        f"{onnxruntime.__version__}, Python {platform.python_version()}; run took "
        "@RUN_MIN@ min.",
        "",
        "## SmolLM2-135M, 0.78 of the projection parameters",
        "",
        "All variants: `lrc compress --method svd-llm --group-inputs --update --exclude head` at "
        "0.78 of the projection parameters (the head, tied to the embedding, is not counted). "
        "Perplexity (x dense); *news* and *docs* are the texts the policy file was chosen on, "
        "*wiki*, *forum* and *code* were not looked at when choosing it (the policy was chosen "
        "before *forum* joined the calibration mix).",
        "",
        "| variant | params kept | " + " | ".join(TEXTS) + " | compress s |",
        "|---|---|" + "---|" * len(TEXTS) + "---|",
    ]
    for r in rows:
        cells = []
        for t in TEXTS:
            x = r["ppl"][t]
            cells.append(f"{x:.2f}" if r["key"] == "dense" else f"{x:.2f} (x{x / d[t]:.2f})")
        lines.append(f"| {r['label']} | {'1' if r['params'] is None else format(r['params'], '.4f')} | "
                     + " | ".join(cells) + f" | {'-' if not r['seconds'] else format(r['seconds'], '.0f')} |")
    by = {r["key"]: r for r in rows}
    if all(k in by for k in ("uniform", "b0", "b15", "b0b29", "split")):
        def gain(a, b):
            return ", ".join(f"{t} {by[b]['ppl'][t] / by[a]['ppl'][t] - 1:+.0%}" for t in TEXTS)
        lines += [
            "",
            "Perplexity change against uniform 0.78 (negative is better):",
            "",
            f"- block 0 dense: {gain('uniform', 'b0')}",
            f"- block 15 dense (control): {gain('uniform', 'b15')}",
            f"- blocks 0 and 29 dense: {gain('uniform', 'b0b29')}",
            f"- blocks 0 and 29 dense + attention 0.62 / MLP 0.812: {gain('uniform', 'split')}",
        ]
    lines += minilm_section(args)
    text = "\n".join(lines) + "\n"
    args.markdown.write_text(text.replace("@RUN_MIN@", f"{(time.perf_counter() - T0) / 60:.1f}"))
    log(f"wrote {args.markdown}")
    return 0


def minilm_section(args) -> list[str]:
    dense = ROOT / "bench-out" / "models" / "minilm" / "dense"
    if not (dense / "model.onnx").is_file():
        dense = args.out / "minilm-dense"
        if not (dense / "model.onnx").is_file():
            log(f"exporting minilm-l6 (all-MiniLM-L6-v2) -> {dense}")
            r = lrc("export", "minilm-l6", "-o", str(dense), "--force")
            if r.returncode != 0:
                raise SystemExit(r.stderr[-2000:])
    work = args.out / "minilm"
    work.mkdir(parents=True, exist_ok=True)

    def pol(name: str, text: str) -> str:
        p = work / f"{name}.yaml"
        p.write_text(text)
        return str(p)

    variants = [
        ("uniform 0.7", ["--ratio", "0.7"]),
        ("block 0 dense, others 0.64", ["--policy", pol("b0", 'ratio: 0.64\nblocks: {"0": skip}\n')]),
        ("block 3 dense (control), others 0.64",
         ["--policy", pol("b3", 'ratio: 0.64\nblocks: {"3": skip}\n')]),
        ("block 5 (last) dense, others 0.64",
         ["--policy", pol("b5", 'ratio: 0.64\nblocks: {"5": skip}\n')]),
        ("blocks 0 and 5 dense (--dense-edges), others 0.55", ["--dense-edges", "--target-params", "0.7"]),
    ]
    rows = []
    for i, (label, extra) in enumerate(variants):
        out = work / f"v{i}"
        t = time.perf_counter()
        r = lrc("compress", str(dense), "-o", str(out), "--force", "--recipe", "plain",
                "--method", "svd-llm",
                "--group-inputs", "--update", *extra)
        if r.returncode != 0:
            raise SystemExit(f"{label}: {(r.stderr or r.stdout).strip()[-1000:]}")
        secs = time.perf_counter() - t
        rep = json.loads((out / "lrc.json").read_text())
        dense_n = sum(int(x["shape"][0]) * int(x["shape"][1]) for x in rep["skipped"]
                      if x.get("shape") and x.get("role") != "head")
        kept = sum(x["params_after"] for x in rep["rewritten"]) + dense_n
        total = sum(x["params_before"] for x in rep["rewritten"]) + dense_n
        e = lrc("eval", str(dense), str(out), "--json")
        if e.returncode != 0:
            raise SystemExit(f"{label}: eval: {(e.stderr or e.stdout).strip()[-1000:]}")
        q = json.loads(e.stdout)
        rows.append({"label": label, "params": kept / total, "seconds": secs,
                     "dense_r": q["in_domain"]["orig"]["lee_pearson"],
                     "r": q["in_domain"]["new"]["lee_pearson"],
                     "cos_in": q["in_domain"]["embedding_cosine"],
                     "cos_ood": q["out_of_domain"]["embedding_cosine"]})
        log(f"minilm {label}: params {kept / total:.4f}, r {rows[-1]['r']:.3f}, cosine "
            f"{rows[-1]['cos_in']:.3f} / {rows[-1]['cos_ood']:.3f} [{secs:.0f} s]")
    (args.out / "minilm-results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "",
        "## all-MiniLM-L6-v2, 0.7 of the projection parameters",
        "",
        "`lrc compress --method svd-llm --group-inputs --update`. Lee r (dense "
        f"{rows[0]['dense_r']:.3f}; noisy: compressed models score above dense) and the mean cosine "
        "of each sentence embedding to the dense model's (1 = unchanged) on the Lee documents and "
        "on out-of-domain Python-docs passages.",
        "",
        "| variant | params kept | Lee r | embedding cosine, Lee | embedding cosine, docs | compress s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['params']:.4f} | {r['r']:.3f} | {r['cos_in']:.3f} | "
                     f"{r['cos_ood']:.3f} | {r['seconds']:.0f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
