#!/usr/bin/env python3
"""lrc's output forms on ONNX Runtime, OpenVINO and tract: what runs where, how exactly, how fast.

    python benchmarks/runtimes.py            # both bundled models, every form: BENCHMARKS.md
    python benchmarks/runtimes.py --quick    # 3 forms, 3 runs: checks the script (OUT/quick)
    python benchmarks/runtimes.py --render bench-out/runtimes/results.json   # Markdown only

For each bundled model (SmolLM2-135M, a decoder with a KV cache; all-MiniLM-L6-v2, an encoder) it

1. takes the dense export (``lrc export``; an export already made by benchmarks/run.py or
   quant.py under bench-out/ is reused: the export is deterministic);
2. compresses it into each of lrc's forms (``FORMS``: low rank at full rank and at rank 128
   with int8 factors, ``--quantize int4 --correct-rank 32`` and ``--quantize int8`` in ONNX
   Runtime's own ops and in the standard forms ``--target-runtime openvino / any`` writes)
   with ``lrc compress`` (a subprocess, as users run it);
3. loads every form on every runtime (``lrc.runtime.runtimes``, f32) and runs it on the same feeds
   as on ONNX Runtime (``lrc.measure.verify.verify(FORM, FORM, runtime=R)``): does it run, and how
   far are its outputs from the same model's on ORT (the runtime's own error, not the rewrite's);
4. benchmarks dense + every form in one ``lrc.measure.bench.bench`` call on ``ort,openvino,tract``
   (the interleaved protocol per runtime; prefill and per-token decode for SmolLM2, b1 x s128 for
   MiniLM): speed ratios to dense on each runtime;
5. writes the section between ``<!-- runtimes:begin -->`` and ``<!-- runtimes:end -->`` of
   BENCHMARKS.md (appended when absent; benchmarks/run.py keeps it), the matrices (a) between
   ``<!-- compat:begin -->`` and ``<!-- compat:end -->`` of README.md, and OUT/results.json: (a) a
   compatibility matrix form x runtime (runs? error vs ORT? speed vs dense), (b) the runtime table
   (ratios to dense per runtime and phase, agreement with ORT). Every cell comes from the run:
   what a runtime could not run is said with the runtime's own reason.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import quant as Q  # noqa: E402  (benchmarks/quant.py: lrc compress with reuse)
import run as R  # noqa: E402  (benchmarks/run.py: export, logging)

log = R.log
MARK_BEGIN, MARK_END = "<!-- runtimes:begin -->", "<!-- runtimes:end -->"
RUNTIMES = ("ort", "openvino", "tract")

# forms: (key, label, lrc compress arguments; None = the dense export itself). Edit here.
_LR = ["--rank", "128", "--method", "svd"]
_C32 = ["--correct-rank", "32"]
FORMS: list[tuple[str, str, list[str] | None]] = [
    ("dense", "dense (the export)", None),
    ("rank-full", "low rank, `--rank full` (exact rewrite)", ["--rank", "full", "--method", "svd"]),
    ("rank-128-int8", "rank 128, `--int8` factors (DynamicQuantizeLinear + MatMulInteger)",
     _LR + ["--int8"]),
    ("int4-c32", "`--quantize int4 --correct-rank 32` (MatMulNBits, GatherBlockQuantized)",
     ["--quantize", "int4", *_C32]),
    ("int8", "`--quantize int8` (DynamicQuantizeMatMul, GatherBlockQuantized)",
     ["--quantize", "int8"]),
    ("int4-c32-ov", "`--quantize int4 --correct-rank 32 --target-runtime openvino` "
     "(block-wise DequantizeLinear, opset 21)",
     ["--quantize", "int4", *_C32, "--target-runtime", "openvino"]),
    ("int8w-any", "`--quantize int8-weight --target-runtime any` (per-column DequantizeLinear)",
     ["--quantize", "int8-weight", "--target-runtime", "any"]),
    ("int8-any", "`--quantize int8 --target-runtime any` (DynamicQuantizeLinear + "
     "MatMulInteger)", ["--quantize", "int8", "--target-runtime", "any"]),
]
QUICK_FORMS = ("dense", "int4-c32", "int4-c32-ov")
EXACT, CLOSE = 1e-4, 1e-2  # relative error vs ORT: f32 rounding / quantisation rounding


def find_dense(name: str, out: Path, reuse_any: bool) -> Path:
    """The dense export: OUT's own, else one benchmarks/run.py or quant.py made, else a new one."""
    cands = [out / "dense"]
    if reuse_any:
        cands += [ROOT / "bench-out" / "models" / name / "dense",
                  ROOT / "bench-out" / "quant" / "models" / name / "dense"]
    for c in cands:
        if (c / "model.onnx").is_file():
            log(f"{name}: dense export {c}")
            return c
    return R.export_dense(name, out, reuse=False)[0]


def agreement(dense: Path, form: Path, threads: int) -> dict:
    """Per runtime: does the form run, how far are its outputs from the same file on ONNX Runtime
    (``rel``, ``max_abs``, ``cosine``: every output), and how far is its first output (logits /
    last hidden state) from the dense model's on ORT (``vs_dense``; ORT's own is the yardstick:
    a runtime that computes a quantised op differently can be as close to dense as ORT or not)."""
    from lrc.errors import LrcError
    from lrc.measure.metrics import compare_tensors as compare_arrays
    from lrc.runtime import feeds as F
    from lrc.runtime import runtimes as RT

    ref = RT.load(dense, "ort", threads=threads)
    feeds = F.random_feeds(ref.sess, seed=0)
    want = ref.run(feeds)
    on_ort = RT.load(form, "ort", threads=threads).run(feeds)
    out = {"ort": {"runs": True, "vs_dense": compare_arrays(want[0], on_ort[0])["rel_error"]}}
    for rt in RUNTIMES[1:]:
        try:
            got = RT.load(form, rt, threads=threads).run(feeds)
        except LrcError as exc:
            out[rt] = {"runs": False, "error": str(exc)}
            continue
        cmp = [compare_arrays(a, b) for a, b in zip(on_ort, got)]
        out[rt] = {"runs": True, "rel_error": max(c["rel_error"] for c in cmp),
                   "max_abs": max(c["max_abs"] for c in cmp), "cosine": cmp[0]["cosine"],
                   "vs_dense": compare_arrays(want[0], got[0])["rel_error"]}
    return out


def run_model(name: str, args) -> dict:
    from lrc.measure.bench import bench

    cfg = R.MODELS[name]
    mdir = (args.out / "models" / name).resolve()
    mdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dense = find_dense(name, mdir, not args.fresh_export)
    forms = []
    for key, label, extra in FORMS:
        if args.quick and key not in QUICK_FORMS:
            continue
        if extra is None:
            forms.append({"key": key, "label": label, "path": str(dense), "args": []})
        else:
            forms.append(Q.compress(key, label, extra, dense, mdir, True))
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    for f in forms:
        f["agreement"] = {} if "error" in f else agreement(dense, Path(f["path"]), args.threads)
        for rt, a in f["agreement"].items():
            log(f"  {f['key']} on {rt}: " + (f"vs dense {a['vs_dense']:.2g}" + (
                f", vs ORT {a['rel_error']:.2g}" if "rel_error" in a else "") if a["runs"] else a["error"][:160]))
    t_agree = time.perf_counter() - t0

    t0 = time.perf_counter()
    built = [f for f in forms if "error" not in f]
    res = bench([Path(f["path"]) for f in built], runtimes=RUNTIMES, threads=args.threads,
                seq_lens=cfg["seq_lens"][:1] if args.quick else cfg["seq_lens"],
                decode_tokens=4 if args.quick else cfg["decode_tokens"], warmup=args.warmup,
                runs=args.runs, memory=False, amdahl=False, progress=log)
    names = [m["name"] for m in res["models"]]
    for f, n in zip(built, names):
        f["bench_name"] = n
    return {"name": name, "title": cfg["title"], "kind": cfg["kind"], "dense": str(dense),
            "forms": forms, "bench": res,
            "timings": {"build_s": t_build, "agreement_s": t_agree,
                        "bench_s": time.perf_counter() - t0}}


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _speed(m: dict) -> dict:
    """(bench name, runtime key, phase) -> ratio to dense; and (runtime key, phase) -> dense p50."""
    out = {}
    for r in m["bench"]["runs"]:  # one target per runtime here: ORT on its CPU EP only
        out[(r["model"], r["runtime"], r["phase"])] = r["speedup"]
        if r["model"] == m["bench"]["models"][0]["name"]:
            out[("p50", r["runtime"], r["phase"])] = r["p50_ms"]
    return out


def _phases(m: dict) -> list[str]:
    return ["prefill", "decode"] if m["kind"] == "lm" else ["encoder"]


def _why(text: str) -> str:
    """A runtime's reason, shortened for a table cell (the full text is in the notes below)."""
    t = text.split(": ", 1)[1] if " cannot " in text.split(": ", 1)[0] else text
    for cut in (" (the graph uses",):
        t = t.split(cut)[0]
    return t.replace("|", "/")[:140]


def _not_measured(m: dict, key: str, name: str) -> str | None:
    for n in m["bench"].get("notes", []):
        if n.startswith(f"[{key}] {name}") and ("not measured" in n):
            return n
    return None


def _err(a: dict, ort: dict) -> str:
    """"exact" / "close" to ORT on the same file; otherwise whether the runtime's result is as
    near the dense model as ORT's (a different rounding of a quantised op) or further."""
    rel = a["rel_error"]
    if rel < CLOSE:
        return f"{'exact' if rel < EXACT else 'close'} (rel {rel:.1g})"
    worse = a["vs_dense"] > 1.25 * ort["vs_dense"] + EXACT
    return (f"{'**further from dense than ORT**' if worse else 'differs from ORT'} (rel {rel:.2g}; "
            f"vs dense {a['vs_dense']:.2g}, ORT {ort['vs_dense']:.2g})")


def matrix_md(m: dict) -> list[str]:
    sp, phases = _speed(m), _phases(m)
    head = "| form | " + " | ".join(R_TITLES[r] for r in RUNTIMES) + " |"
    L = [head, "|---" * (len(RUNTIMES) + 1) + "|"]
    for f in m["forms"]:
        if "error" in f:
            L.append(f"| {f['label']} | " + " | ".join(["compress failed"] * len(RUNTIMES)) + " |")
            continue
        cells = []
        for rt in RUNTIMES:
            a = f["agreement"][rt] if rt != "ort" else None
            if a is not None and not a["runs"]:
                cells.append(f"no: {_why(a['error'])}")
                continue
            speed = " / ".join(f"{sp.get((f['bench_name'], rt, ph)):.2f}x"
                               if sp.get((f["bench_name"], rt, ph)) else "-" for ph in phases)
            miss = _not_measured(m, rt, f["bench_name"])
            if miss and "decode" in miss:
                speed += f" (decode: {_why(miss.split('prefill only): ', 1)[-1])})"
            elif miss:
                speed = f"not timed: {_why(miss.split('not measured: ', 1)[-1])}"
            cells.append(("reference" if a is None else _err(a, f["agreement"]["ort"])) + f"; {speed}")
        L.append(f"| {f['label']} | " + " | ".join(cells) + " |")
    return L


def runtime_table_md(m: dict) -> list[str]:
    sp, phases = _speed(m), _phases(m)
    cols = [f"{R_TITLES[rt]} {ph}" for rt in RUNTIMES for ph in phases]
    agree = [f"{R_TITLES[rt]} vs ORT" for rt in RUNTIMES[1:]] + [
        f"vs dense on {R_TITLES[rt]}" for rt in RUNTIMES]
    L = ["| form | " + " | ".join(cols + agree) + " |", "|---" * (len(cols) + len(agree) + 1) + "|"]
    L.append("| dense p50 ms | " + " | ".join(
        f"{sp[('p50', rt, ph)]:.1f}" if sp.get(("p50", rt, ph)) else "-"
        for rt in RUNTIMES for ph in phases) + " |" + " |" * len(agree))
    for f in m["forms"]:
        if "error" in f:
            continue
        vals = [f"{sp[(f['bench_name'], rt, ph)]:.2f}" if sp.get((f["bench_name"], rt, ph)) else "-"
                for rt in RUNTIMES for ph in phases]
        ag = []
        for rt in RUNTIMES[1:]:
            a = f["agreement"][rt]
            ag.append(f"max {a['max_abs']:.2g}, rel {a['rel_error']:.2g}, cos {a['cosine']:.6f}"
                      if a["runs"] else "does not run")
        ag += [f"{f['agreement'][rt]['vs_dense']:.2g}" if f["agreement"][rt]["runs"] else "-"
               for rt in RUNTIMES]
        L.append(f"| {f['label']} | " + " | ".join(vals + ag) + " |")
    return L


R_TITLES = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "tract": "tract"}


def observations(m: dict) -> list[str]:
    """What the numbers say, computed from them (failures, disagreements, fastest per runtime)."""
    out = []
    for rt in RUNTIMES[1:]:
        fails = [f["key"] for f in m["forms"] if "error" not in f and not f["agreement"][rt]["runs"]]
        ok = [(f, f["agreement"][rt], f["agreement"]["ort"]) for f in m["forms"]
              if "error" not in f and f["agreement"][rt]["runs"]]
        differs = [f"{f['key']} (rel {a['rel_error']:.2g})" for f, a, o in ok if a["rel_error"] >= CLOSE]
        worse = [f"{f['key']} ({a['vs_dense']:.2g} from dense against ORT's {o['vs_dense']:.2g})"
                 for f, a, o in ok if a["rel_error"] >= CLOSE and a["vs_dense"] > 1.25 * o["vs_dense"] + EXACT]
        if fails:
            out.append(f"{R_TITLES[rt]} does not run: {', '.join(fails)}.")
        if differs:
            out.append(f"{R_TITLES[rt]} runs but computes differently from ONNX Runtime on the same "
                       f"file: {', '.join(differs)}"
                       + (f"; further from the dense model than ORT: {', '.join(worse)}" if worse
                          else "; no further from the dense model than ORT's result") + ".")
    sp = _speed(m)
    for rt in RUNTIMES:
        for ph in _phases(m):
            best = max(((sp.get((f.get("bench_name"), rt, ph)) or 0, f["key"]) for f in m["forms"]
                        if f.get("bench_name") and f["key"] != "dense"), default=(0, None))
            if best[1] and best[0] > 0:
                out.append(f"Fastest form on {R_TITLES[rt]} ({ph}): {best[1]}, {best[0]:.2f}x dense.")
    return out


def section_md(results: dict) -> str:
    s = results["settings"]
    vers = "; ".join(f"{R_TITLES[t['runtime']]} {t['describe']['version']} "
                     f"({t['describe']['device']}, {t['describe']['precision']}, "
                     f"{t['describe']['threads'] or 'default'} thread"
                     f"{'' if t['describe']['threads'] == 1 else 's'})"
                     for t in s.get("targets", []) if t.get("describe"))
    L = [MARK_BEGIN, "", "## Runtimes: lrc's forms on ONNX Runtime, OpenVINO and tract", "",
         f"Generated by `{results['command']}` on {results['date'][:10]} "
         f"({results['total_s'] / 60:.0f} min{', --quick' if results['args'].get('quick') else ''}); "
         f"{results['machine'].get('cpu')}; {vers}. Medians of {s.get('runs')} interleaved runs per "
         "runtime; speed is the ratio to the dense model on the same runtime (runtimes are "
         "measured one after another, so compare absolute times across runtimes with care). "
         f"Agreement: the form on that runtime against the same file on ONNX Runtime's CPU EP, "
         f"on the same random feeds (exact: rel < {EXACT:g}; close: < {CLOSE:g}); where they "
         "differ more, both results are compared with the dense model on ORT (rel error of the "
         "first output): a quantised op rounded differently is not wrong if it is as near dense.", ""]
    if results.get("busy_note"):
        L += [f"**Note:** {results['busy_note']}", ""]
    for m in results["models"]:
        ph = " / ".join(_phases(m))
        L += [f"### {m['title']}", "", f"(a) Compatibility: runs? error vs ORT; speed vs dense ({ph})", ""]
        L += matrix_md(m) + ["", f"(b) Speed ratio to dense per runtime, and agreement with ORT", ""]
        L += runtime_table_md(m) + [""]
        L += [f"- {o}" for o in observations(m)]
        notes = [n for n in m["bench"].get("notes", []) if "busy" not in n]
        L += [f"- Note: {n}" for n in notes]
        t = m["timings"]
        L += [f"- Time: compress {t['build_s']:.0f} s, agreement {t['agreement_s']:.0f} s, "
              f"bench {t['bench_s']:.0f} s.", ""]
    L += [MARK_END]
    return "\n".join(L)


COMPAT_BEGIN, COMPAT_END = "<!-- compat:begin -->", "<!-- compat:end -->"


def compat_md(results: dict) -> str:
    """README's compatibility matrix: part (a) of each model's section, with its provenance."""
    L = [COMPAT_BEGIN, "", f"Compatibility matrix, generated by `{results['command']}` on "
         f"{results['date'][:10]} ({results['machine'].get('cpu')}; every cell from the run; "
         "speed is the ratio to dense on the same runtime; BENCHMARKS.md has the full tables):", ""]
    for m in results["models"]:
        L += [f"{m['title']} (error vs the same file on ORT; speed {' / '.join(_phases(m))}):", ""]
        L += matrix_md(m) + [""]
    L += [COMPAT_END]
    return "\n".join(L)


def render(results: dict, md_path: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    Q.write_section(md_path, section_md(results), MARK_BEGIN, MARK_END)
    readme = out_dir / "README-compat.md" if results["args"].get("quick") else ROOT / "README.md"
    Q.write_section(readme, compat_md(results), COMPAT_BEGIN, COMPAT_END)
    log(f"wrote {md_path} (section {MARK_BEGIN}), {readme} ({COMPAT_BEGIN}) and "
        f"{out_dir / 'results.json'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"forms {', '.join(QUICK_FORMS)}, 3 runs, "
                    "4 decode tokens: checks the script; writes under OUT/quick, not BENCHMARKS.md")
    ap.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2,minilm")
    ap.add_argument("--out", type=Path, default=Path("bench-out/runtimes"))
    ap.add_argument("--markdown", type=Path, default=None,
                    help="file whose runtimes section is written (default BENCHMARKS.md; --quick: "
                         "OUT/quick/BENCHMARKS.md)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per shape (default 20; --quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of every runtime (default 2)")
    ap.add_argument("--fresh-export", action="store_true",
                    help="export again instead of reusing bench-out/{models,quant/models}/NAME/dense")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only rewrite the section and results.json from a saved results.json")
    args = ap.parse_args(argv)
    if args.render:  # a --quick result renders under its own folder, a full one into BENCHMARKS.md
        saved = json.loads(args.render.read_text())
        here = args.render.parent
        render(saved, args.markdown or (here / "BENCHMARKS.md" if saved["args"].get("quick")
                                         else ROOT / "BENCHMARKS.md"), here)
        return 0
    args.runs = args.runs or (3 if args.quick else 20)
    names = [n for n in (x.strip() for x in args.models.split(",")) if n]
    if set(names) - set(R.MODELS):
        ap.error(f"unknown model(s) in {args.models!r}; choose from {list(R.MODELS)}")
    from lrc.runtime.runtimes import resolve_runtime

    for rt in RUNTIMES:
        resolve_runtime(rt)  # a missing runtime stops here, with its pip line
    res_dir = args.out / "quick" if args.quick else args.out
    md_path = args.markdown or (res_dir / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # calibration statistics shared with benchmarks/run.py and quant.py (keyed by the model's hash)
    os.environ.setdefault("LRC_CACHE_DIR", str((ROOT / "bench-out" / "cache").resolve()))
    from lrc.measure.machine import cpu_busy

    busy = cpu_busy()
    models = [run_model(n, args) for n in names]
    b0 = models[0]["bench"]
    busy_notes = [n for m in models for n in m["bench"].get("notes", []) if "busy" in n]
    results = {
        "schema": "lrc.benchmarks.runtimes/1",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/runtimes.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": b0["machine"], "settings": b0["settings"], "cpu_busy_start": busy,
        "busy_note": ("the machine was busy while these numbers were taken ("
                      + ("; ".join(dict.fromkeys(busy_notes)) or f"{busy:.0%} of the CPU in use by other work at the start")
                      + "): ratios are noisier than usual; regenerate on a quiet machine before "
                      "quoting them") if busy_notes or (busy or 0) > 0.25 else None,
        "forms": [{"key": k, "label": lab, "args": a} for k, lab, a in FORMS],
        "models": models, "total_s": time.perf_counter() - R.T0,
    }
    render(results, md_path, res_dir)
    log(f"total {(time.perf_counter() - R.T0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
