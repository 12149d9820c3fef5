#!/usr/bin/env python3
"""Regenerate BENCHMARKS.md, bench-out/report.html and bench-out/results.json.

    make bench                       # = python benchmarks/run.py
    python benchmarks/run.py --quick # MiniLM only, 3 variants, 5 runs: checks the script (< 3 min)
    python benchmarks/run.py --models smollm2 --runs 30 --threads 2

For each bundled model (SmolLM2-135M-Instruct with KV cache, all-MiniLM-L6-v2) it

1. exports the dense model with ``lrc export ALIAS -o DIR`` (model.onnx + tokenizer/config);
2. compresses it at several settings with the ``lrc compress`` CLI (folder in, folder out, exactly
   what a user gets): uniform ratios, MLP-only, attention-only, rank 64, plain SVD and -- when the
   installed lrc has ``--method`` -- the data-aware SVD-LLM whitening, and INT8 factors;
3. benchmarks the dense model, every variant and ORT's own baselines (INT8 dynamic per-channel,
   4-bit MatMulNBits, ORT transformer-optimized dense) in ONE interleaved ``lrc.bench.bench`` run
   per model (SmolLM2: prefill at seq 128 and per-token decode; MiniLM: batch 1 x seq 128 / 16);
4. measures quality against the dense model: SmolLM2 -- perplexity, KL(dense||new) and top-1
   agreement on in-domain news and on out-of-domain Python documentation (the dense model's
   logits are computed once and reused for every variant); MiniLM -- Pearson r with the Lee 2005
   human similarity ratings and the embedding cosine to the dense model;
5. writes the Markdown tables with observations computed from the numbers, the HTML report and the
   raw JSON.

Timings are only meaningful on a quiet machine: the script records the load average before the
benchmark and says so in BENCHMARKS.md when the machine was busy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.perf_counter()


def log(msg: str) -> None:
    el = time.perf_counter() - T0
    print(f"[{int(el // 60):02d}:{el % 60:04.1f}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# what to run
# --------------------------------------------------------------------------------------------

MODELS = {
    "smollm2": {"alias": "smollm2-135m", "title": "SmolLM2-135M-Instruct (decoder, KV cache)",
                "kind": "lm", "seq_lens": (128,), "decode_tokens": 16},
    "minilm": {"alias": "minilm-l6", "title": "all-MiniLM-L6-v2 (sentence encoder)",
               "kind": "encoder", "seq_lens": (128, 16), "decode_tokens": 16},
}


def _v(key, label, method="svd", ratio=None, rank=None, include=None, int8=False,
       exclude=None, update=False, quantize_rest=None, group=False, curve=False, policy=None):
    return {"key": key, "label": label, "method": method, "ratio": ratio, "rank": rank,
            "include": include, "int8": int8, "exclude": exclude, "update": update,
            "quantize_rest": quantize_rest, "group": group, "curve": curve, "policy": policy}


# the speed/quality curve of the best measured lrc setting (all projections but the head,
# --group-inputs --update), from 0.95 to 0.5 of the projection parameters; 0.78 is #5's target
CURVE = (0.95, 0.8, 0.78, 0.7, 0.5)
# a non-uniform allocation at 0.78 for SmolLM2: first and last blocks dense, attention compressed
# harder than the MLP (found by hand on SmolLM2, see the policy file and BENCHMARKS.md)
POLICIES = ROOT / "benchmarks" / "policies"


def variant_specs(quick: bool, have_method: bool, model: str = "") -> list[dict]:
    """The settings compressed for every model (data-aware ones only when lrc has --method)."""
    aware = "svd-llm" if have_method else "svd"
    if quick:
        specs = [_v("svd-all-0.8", "SVD all 0.8", ratio=0.8),
                 _v(f"{aware}-ffn-0.6", f"{aware.upper()} MLP 0.6", method=aware, ratio=0.6, include="ffn"),
                 _v(f"{aware}-ffn-0.6-int8", f"{aware.upper()} MLP 0.6 +int8", method=aware, ratio=0.6,
                    include="ffn", int8=True)]
        return specs
    specs = [
        _v("svd-all-0.8", "SVD all 0.8", ratio=0.8),
        _v("svd-all-0.5", "SVD all 0.5", ratio=0.5),
        _v("svd-ffn-0.8", "SVD MLP 0.8", ratio=0.8, include="ffn"),
        _v("svd-attn-0.8", "SVD attn 0.8", ratio=0.8, include="attn"),
        _v("svd-rank64", "SVD rank 64 (all)", rank=64),
    ]
    if not have_method:
        return specs + [_v("svd-ffn-0.8-int8", "SVD MLP 0.8 +int8", ratio=0.8, include="ffn",
                           int8=True)]
    # the head stays dense in the data-aware settings: it is tied to the embedding on SmolLM2
    # (factoring it adds parameters); MiniLM has none, so there "all but head" is all
    specs += [
        # whitening alone, each projection on its own, then with --group-inputs
        _v("svd-llm-nohead-0.8", "SVD-LLM all but head 0.8", method="svd-llm", ratio=0.8,
           exclude="head"),
        _v("svd-llm-g-nohead-0.8", "SVD-LLM grouped, all but head 0.8", method="svd-llm",
           ratio=0.8, exclude="head", group=True),
        _v("svd-llm-g-ffn-0.8", "SVD-LLM grouped, MLP 0.8", method="svd-llm", ratio=0.8,
           include="ffn", group=True),
    ]
    specs += [_v(f"svd-llm-gupd-nohead-{r}", f"SVD-LLM grouped+update, all but head {r}",
                 method="svd-llm", ratio=r, exclude="head", group=True, update=True, curve=True)
              for r in CURVE]
    if model == "smollm2":
        specs.append(_v("svd-llm-gupd-split-0.78", "SVD-LLM grouped+update, blocks 0 and 29 "
                        "dense, attn 0.62 / MLP 0.812 (0.78 overall)", method="svd-llm", ratio=0.78,
                        exclude="head", group=True, update=True,
                        policy=str(POLICIES / "smollm2-0.78.yaml")))
    specs += [
        # stacking: int8 factors + ORT INT8 on what low rank left dense
        _v("svd-llm-gupd-nohead-0.7-q", "SVD-LLM grouped+update 0.7 +int8 +rest int8",
           method="svd-llm", ratio=0.7, exclude="head", group=True, update=True, int8=True,
           quantize_rest="int8"),
        _v("svd-llm-g-ffn-0.8-int8", "SVD-LLM grouped, MLP 0.8 +int8", method="svd-llm",
           ratio=0.8, include="ffn", group=True, int8=True),
    ]
    if model == "minilm":  # cheap there (seconds): the same stack without --group-inputs
        specs.append(_v("svd-llm-upd-nohead-0.7-q", "SVD-LLM+update 0.7 +int8 +rest int8",
                        method="svd-llm", ratio=0.7, exclude="head", update=True, int8=True,
                        quantize_rest="int8"))
    return specs


BASELINE_LABELS = {"int8-dynamic": "ORT INT8 dynamic (per-channel)",
                   "int4-matmulnbits": "ORT 4-bit MatMulNBits (block 32)",
                   "ort-optimized": "ORT-optimized dense (fusions)"}


# --------------------------------------------------------------------------------------------
# export / compress
# --------------------------------------------------------------------------------------------

BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def blas_env() -> dict:
    """Single-threaded BLAS for the compress subprocess when the machine is oversubscribed.

    Multi-threaded OpenBLAS busy-waits: with the cores already taken by other work, one SVD of a
    576 x 1536 matrix measured 16 s with 2 threads against 1 s with 1 thread (2 cores, load 9).
    The factors are the same up to rounding; only the compression time changes."""
    if any(v in os.environ for v in BLAS_VARS):
        return {}
    from lrc.measure.machine import cpu_busy

    busy = cpu_busy(1.0)  # other work now (the load average would count our own last step)
    return {v: "1" for v in BLAS_VARS} if busy is not None and busy > 0.5 else {}


def lrc_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrc.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def cli_has_method() -> bool:
    r = lrc_cli("compress", "--help")
    return "--method" in (r.stdout + r.stderr)


def export_dense(name: str, out: Path, reuse: bool) -> tuple[Path, float | None]:
    d = out / "dense"
    if reuse and (d / "model.onnx").is_file():
        log(f"{name}: reusing export {d}")
        return d, None
    log(f"{name}: exporting {MODELS[name]['alias']} -> {d}")
    t = time.perf_counter()
    # the CLI in a subprocess: what users run, and torch never enters the benchmarking process
    r = lrc_cli("export", MODELS[name]["alias"], "-o", str(d), "--force", "--exporter", "optimum")
    if r.returncode != 0 or not (d / "model.onnx").is_file():
        raise RuntimeError(f"lrc export {MODELS[name]['alias']} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-800:]}")
    s = time.perf_counter() - t
    log(f"{name}: exported in {s:.0f} s")
    return d, s


def compress_variant(dense: Path, out: Path, spec: dict, calib_tokens: int, reuse: bool) -> dict:
    """Run ``lrc compress DENSE -o OUT ...``; returns its lrc.json plus the command and wall time."""
    # --recipe plain: each row is exactly the flags it names (no default grouping / update / dense
    # blocks / dense tied head)
    cmd = ["compress", str(dense), "-o", str(out), "--force", "--recipe", "plain"]
    if spec["rank"] is not None:
        cmd += ["--rank", str(spec["rank"])]
    else:
        cmd += ["--ratio", str(spec["ratio"])]
    if spec["include"]:
        cmd += ["--include", spec["include"]]
    if spec.get("exclude"):
        cmd += ["--exclude", spec["exclude"]]
    if spec.get("policy"):
        cmd += ["--policy", spec["policy"]]
    if spec.get("group"):
        cmd += ["--group-inputs"]
    if spec.get("update"):
        cmd += ["--update"]
    if spec.get("quantize_rest"):
        cmd += ["--quantize-rest", spec["quantize_rest"]]
    cmd += ["--method", spec["method"]]  # explicit: lrc's default is 'auto'
    if spec["method"] != "svd":
        cmd += ["--calib-tokens", str(calib_tokens)]
    if spec["int8"]:
        cmd += ["--int8"]
    stamp = out.with_name(out.name + ".cmd.json")
    if reuse and (out / "lrc.json").is_file() and stamp.is_file() \
            and json.loads(stamp.read_text()).get("cmd") == cmd:
        log(f"  {spec['key']}: reusing {out}")
        summ = json.loads((out / "lrc.json").read_text())
        summ["_bench"] = json.loads(stamp.read_text())
        return summ
    t = time.perf_counter()
    benv = blas_env()
    r = lrc_cli(*cmd, env=benv)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"lrc {' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    summ = json.loads((out / "lrc.json").read_text())
    meta = {"cmd": cmd, "wall_s": wall, "env": benv}
    stamp.write_text(json.dumps(meta))
    summ["_bench"] = meta
    tot = summ.get("totals", {})
    log(f"  {spec['key']}: {summ.get('summary', '')} [{wall:.0f} s{', 1 BLAS thread (busy machine)' if benv else ''}]"
        + (f" (params {tot.get('params_ratio', 0):.3f})" if tot else ""))
    return summ


# --------------------------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------------------------

def lm_quality(ref, path: Path, texts: list[str]) -> dict:
    """Quality of one variant against the dense model's logits kept by ``ref``
    (``lrc.measure.quality.LMReference``): one session on the variant for every text."""
    from lrc.measure.quality import load_model

    new = load_model(path, ref.model.tokenizer, ref.threads)
    out = {}
    for t in texts:
        c = ref.compare(new, t)
        out[t] = {"perplexity": c["new"]["perplexity"], "dense_perplexity": c["orig"]["perplexity"],
                  "ppl_ratio": c["ppl_ratio"], "kl": c["kl"], "top1_agreement": c["top1_agreement"],
                  "logits_cosine": c.get("logits_cosine"), "tokens": c.get("tokens"), "bos": c.get("bos")}
    return out


def encoder_quality(lee, docs, path: Path) -> dict:
    """Quality of one variant against the dense embeddings kept by ``lee`` (Lee 2005 documents)
    and ``docs`` (out-of-domain passages), both ``lrc.measure.quality.EncoderReference``."""
    from lrc.measure.quality import load_model

    new = load_model(path, lee.model.tokenizer, lee.threads)
    a, b = lee.compare(new), docs.compare(new)
    return {"lee_pearson": a["new"]["lee_pearson"], "dense_lee_pearson": a["orig"]["lee_pearson"],
            "embedding_cosine_lee": a["embedding_cosine"], "embedding_cosine_docs": b["embedding_cosine"],
            "embedding_cosine_docs_min": b["embedding_cosine_min"]}


# --------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------

def run_model(name: str, args, have_method: bool) -> dict:
    from lrc.measure.quality import EncoderReference, LMReference

    cfg = MODELS[name]
    mdir = (args.out / "models" / name).resolve()
    mdir.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    dense, timings["export_s"] = export_dense(name, mdir, args.reuse)

    # ---- compress
    specs = variant_specs(args.quick, have_method, name)
    variants = []
    t = time.perf_counter()
    log(f"{name}: compressing {len(specs)} variants"
        + ("" if have_method else " (this lrc has no --method: plain SVD only)"))
    for spec in specs:
        out = mdir / spec["key"]
        try:
            summ = compress_variant(dense, out, spec, args.calib_tokens, args.reuse)
        except RuntimeError as exc:
            log(f"  {spec['key']}: FAILED: {exc}")
            variants.append({**spec, "error": str(exc)})
            continue
        variants.append({**spec, "path": str(out), "summary": summ})
    timings["compress_s"] = time.perf_counter() - t
    ok = [v for v in variants if "error" not in v]

    # ---- bench (one interleaved run: dense first, variants, then ORT baselines)
    from lrc.measure.bench import bench

    work = mdir / "bench-work"
    if work.exists():
        shutil.rmtree(work)
    (work / "baselines").mkdir(parents=True)
    for f in dense.iterdir():  # tokenizer/config beside the baselines: feeds need config, eval needs both
        if f.is_file() and f.suffix != ".onnx" and f.name != "lrc.json":
            shutil.copy2(f, work / "baselines" / f.name)
    log(f"{name}: benchmarking {1 + len(ok)} models + ORT baselines, seq {list(cfg['seq_lens'])}, "
        f"{args.runs} runs, {args.threads} threads")
    t = time.perf_counter()
    res = bench([dense] + [Path(v["path"]) for v in ok], eps=("cpu",), threads=args.threads,
                batch_sizes=(1,), seq_lens=cfg["seq_lens"], decode_tokens=cfg["decode_tokens"],
                runs=args.runs, warmup=args.warmup, baselines=True, workdir=work,
                progress=lambda m: log(f"  bench {m}"))
    timings["bench_s"] = time.perf_counter() - t
    log(f"{name}: bench done in {timings['bench_s']:.0f} s")
    (mdir / "bench.json").write_text(json.dumps(res, indent=1, default=str))  # survives a later crash
    bmodels = res["models"]
    dense_name = bmodels[0]["name"]
    baselines = [{"key": m["name"].split("+", 1)[1], "label": BASELINE_LABELS.get(m["name"].split("+", 1)[1],
                                                                                   m["name"]),
                  "path": m["path"], "bench_name": m["name"], "baseline": m["baseline"]}
                 for m in bmodels if m.get("baseline")]
    for v, m in zip(ok, bmodels[1:1 + len(ok)]):
        v["bench_name"] = m["name"]

    # ---- quality
    t = time.perf_counter()
    log(f"{name}: quality of dense, {len(ok)} variants and {len(baselines)} baselines")
    quality_dense: dict
    if cfg["kind"] == "lm":
        texts = ["news", "docs"]
        with tempfile.TemporaryDirectory(prefix="lrc-bench-ref-", dir=mdir) as tmp:
            # the dense model's logits are computed once and kept in a memmap
            ref = LMReference(dense, texts, args.context, args.max_tokens, args.threads, Path(tmp))
            quality_dense = {tx: ref.dense(tx) for tx in texts}
            for tx, d in quality_dense.items():
                log(f"  dense {tx}: perplexity {d['perplexity']:.2f} on {d['tokens']} tokens "
                    f"({d['windows']} windows of {d['context']}; {d['bos']})")
            for v in ok + baselines:
                tv = time.perf_counter()
                try:
                    v["quality"] = lm_quality(ref, Path(v["path"]), texts)
                except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the run
                    v["quality_error"] = f"{type(exc).__name__}: {exc}"
                    log(f"  {v['key']}: quality FAILED: {v['quality_error'][:300]}")
                    continue
                q = v["quality"]
                log(f"  {v['key']}: ppl news {q['news']['perplexity']:.4g} (KL {q['news']['kl']:.3f}, "
                    f"top-1 {q['news']['top1_agreement']:.3f}), docs {q['docs']['perplexity']:.4g} "
                    f"[{time.perf_counter() - tv:.0f} s]")
            del ref
    else:
        lee = EncoderReference(dense, threads=args.threads)  # Lee 2005 documents
        docs = EncoderReference(lee.model, "docs", threads=args.threads)  # out-of-domain passages
        quality_dense = {"lee_pearson": lee.lee_pearson}
        log(f"  dense: Lee Pearson {quality_dense['lee_pearson']:.4f}")
        for v in ok + baselines:
            try:
                v["quality"] = encoder_quality(lee, docs, Path(v["path"]))
            except Exception as exc:  # noqa: BLE001
                v["quality_error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {v['key']}: quality FAILED: {v['quality_error'][:300]}")
                continue
            q = v["quality"]
            log(f"  {v['key']}: Lee Pearson {q['lee_pearson']:.4f}, embedding cosine "
                f"{q['embedding_cosine_lee']:.4f} (docs {q['embedding_cosine_docs']:.4f})")
    timings["quality_s"] = time.perf_counter() - t
    if not args.keep_models:
        shutil.rmtree(work / "baselines", ignore_errors=True)
    return {"name": name, "title": cfg["title"], "kind": cfg["kind"], "alias": cfg["alias"],
            "dense_path": str(dense), "dense_bench_name": dense_name, "dense_quality": quality_dense,
            "variants": variants, "baselines": baselines, "bench": res, "timings": timings,
            "eval": {"context": args.context, "max_tokens": args.max_tokens} if cfg["kind"] == "lm" else
            {"lee": "Lee 2005, 50 docs, 1225 pairs", "ood": "docs passages"}}


# --------------------------------------------------------------------------------------------
# tables and observations
# --------------------------------------------------------------------------------------------

def _runs_by(res: dict) -> dict:
    """(model name, phase, seq) -> run row."""
    return {(r["model"], r["phase"], r["seq"]): r for r in res["runs"]}


def shapes(m: dict) -> list[tuple[str, int, str]]:
    """(phase, seq, column label) for the speedup columns of a model."""
    if m["kind"] == "lm":
        return [("prefill", 128, "prefill s128"), ("decode", 128, "decode / token")]
    return [("encoder", s, f"b1 x s{s}") for s in MODELS["minilm"]["seq_lens"]]


def fmt_quality(x: float | None) -> str:
    """A quality figure as BENCHMARKS.md prints it (benchmarks/rows.py compares these digits)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 1e4:
        return f"{x:.1e}"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}"


def rows_for(m: dict) -> list[dict]:
    """One record per row of the model's table: dense, variants, baselines, with numbers pulled together."""
    res = m["bench"]
    runs = _runs_by(res)
    bm = {e["name"]: e for e in res["models"]}
    out = []
    entries = [{"key": "dense", "label": "dense (fp32)", "bench_name": m["dense_bench_name"],
                "dense": True, "quality": None}]
    entries += [dict(v, kind="lrc") for v in m["variants"] if "error" not in v]
    entries += [dict(b, kind="baseline") for b in m["baselines"]]
    for e in entries:
        b = bm.get(e["bench_name"], {})
        rec = {"key": e["key"], "label": e["label"], "kind": e.get("kind", "dense"),
               "size_mb": b.get("size_bytes", 0) / 1e6, "speed": {}, "ms": {}, "bound": {},
               "method": (e.get("method") or "") + ("+update" if e.get("update") else "")
               + ("+rest" if e.get("quantize_rest") else "") if e.get("method") else None,
               "int8": e.get("int8"), "include": e.get("include"), "exclude": e.get("exclude"),
               "group": bool(e.get("group")), "curve": bool(e.get("curve")),
               "ratio": e.get("ratio"), "rank": e.get("rank"), "policy": e.get("policy")}
        tot = (e.get("summary") or {}).get("totals") or {}
        rec["params_kept"] = tot.get("params_ratio") if e.get("summary") else (1.0 if e.get("dense") else None)
        rec["weight_ratio"] = b.get("flop_ratio")
        for ph, seq, col in shapes(m):
            r = runs.get((e["bench_name"], ph, seq))
            rec["speed"][col] = r.get("speedup") if r else None
            rec["ms"][col] = r.get("p50_ms") if r else None
            rec["bound"][col] = (b.get("amdahl_bound") or {}).get(ph)
        if m["kind"] == "lm":
            if e.get("dense"):
                rec["q"] = {t: {"perplexity": m["dense_quality"][t]["perplexity"], "kl": 0.0,
                                "top1_agreement": 1.0} for t in ("news", "docs")}
            else:
                rec["q"] = e.get("quality")
        else:
            rec["q"] = ({"lee_pearson": m["dense_quality"]["lee_pearson"], "embedding_cosine_lee": 1.0,
                         "embedding_cosine_docs": 1.0} if e.get("dense") else e.get("quality"))
        out.append(rec)
    return out


def table_md(m: dict, rows: list[dict]) -> str:
    cols = [c for _, _, c in shapes(m)]
    if m["kind"] == "lm":
        head = ["variant", "params kept (targets / all MatMuls)", "file MB", "ppl news (KL, top-1)",
                "ppl docs (KL, top-1)"]
    else:
        head = ["variant", "params kept (targets / all MatMuls)", "file MB", "Lee r", "emb. cos (Lee / docs)"]
    head += [f"speedup {c}" for c in cols] + ["Amdahl bound (" + " / ".join(cols) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pk = "-" if r["params_kept"] is None else f"{r['params_kept']:.2f}"
        if r["kind"] == "lrc" and r.get("weight_ratio") is not None:
            pk += f" / {r['weight_ratio']:.2f}"
        cells = [r["label"], pk, f"{r['size_mb']:.1f}"]
        q = r.get("q") or {}
        if m["kind"] == "lm":
            for t in ("news", "docs"):
                qt = q.get(t)
                cells.append("-" if not qt else
                             (f"{fmt_quality(qt['perplexity'])}" if r["kind"] == "dense" else
                              f"{fmt_quality(qt['perplexity'])} ({qt['kl']:.2f}, {qt['top1_agreement']:.2f})"))
        else:
            cells.append("-" if "lee_pearson" not in q else f"{q['lee_pearson']:.3f}")
            cells.append("-" if r["kind"] == "dense" or "embedding_cosine_lee" not in q else
                         f"{q['embedding_cosine_lee']:.3f} / {q['embedding_cosine_docs']:.3f}")
        for c in cols:
            s = r["speed"].get(c)
            if r["kind"] == "dense":
                cells.append(f"1.00 ({r['ms'][c]:.1f} ms)" if r["ms"].get(c) else "-")
            else:
                cells.append("-" if s is None else f"{s:.2f}")
        bounds = [r["bound"].get(c) for c in cols]
        if r.get("int8"):
            cells.append("n/a (int8)")  # the bound counts parameters; int8 changes the kernels, not them
        else:
            cells.append(" / ".join("-" if b is None else f"{b:.2f}" for b in bounds)
                         if any(b is not None for b in bounds) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _quality_key(m: dict):
    """(value of a row, higher_is_better, label) for the model's headline quality."""
    if m["kind"] == "lm":
        return (lambda r: (r.get("q") or {}).get("news", {}).get("perplexity")), False, "news perplexity"
    return (lambda r: (r.get("q") or {}).get("lee_pearson")), True, "Lee r"


def observations(m: dict, rows: list[dict], runs: int) -> list[str]:
    obs: list[str] = []
    cols = [c for _, _, c in shapes(m)]
    main = cols[0]
    qf, hib, qlabel = _quality_key(m)
    dense = rows[0]
    lrc_rows = [r for r in rows if r["kind"] == "lrc" and r["speed"].get(main) is not None]
    base = {r["key"]: r for r in rows if r["kind"] == "baseline"}
    dq = qf(dense)

    def qtxt(r):
        v = qf(r)
        return "-" if v is None else (fmt_quality(v) if not hib else f"{v:.3f}")

    # equal-quality tolerance: perplexity within 10 % of dense (news AND docs) / Lee r within 0.01
    if m["kind"] == "lm":
        def keeps(r):
            q = r.get("q") or {}
            return all(t in q and q[t]["perplexity"] <= 1.10 * dense["q"][t]["perplexity"] for t in ("news", "docs"))
        tol = "perplexity within 10 % of dense on both texts"
    else:
        def keeps(r):
            v = qf(r)
            return v is not None and v >= dq - 0.01
        tol = f"Lee r within 0.01 of dense ({dq:.3f})"

    good = [r for r in lrc_rows if keeps(r)]
    if good:
        best = max(good, key=lambda r: r["speed"][main])
        obs.append(f"Fastest lrc variant at equal quality ({tol}): **{best['label']}**, "
                   f"{best['speed'][main]:.2f}x at {main}, {qlabel} {qtxt(best)} (dense {qtxt(dense)}).")
    else:
        obs.append(f"No lrc variant keeps quality ({tol}).")
        if lrc_rows:
            better = (max if hib else min)(lrc_rows, key=lambda r: qf(r) if qf(r) is not None else
                                           (-1e30 if hib else 1e30))
            obs.append(f"The best-quality lrc variant is {better['label']}: {qlabel} {qtxt(better)} "
                       f"(dense {qtxt(dense)}), {better['speed'][main]:.2f}x at {main}.")
    if lrc_rows:
        fast = max(lrc_rows, key=lambda r: r["speed"][main])
        obs.append(f"Fastest lrc variant overall: {fast['label']}, {fast['speed'][main]:.2f}x at {main}, "
                   f"{qlabel} {qtxt(fast)}.")

    i8 = base.get("int8-dynamic")
    if i8 and i8["speed"].get(main) is not None:
        i8s = ", ".join(f"{i8['speed'][c]:.2f}x {c}" for c in cols)

        def q_at_least(r, o):  # r's quality >= o's on every measured quality number
            if m["kind"] == "lm":
                rq, oq = r.get("q") or {}, o.get("q") or {}
                return all(t in rq and t in oq and rq[t]["perplexity"] <= oq[t]["perplexity"] for t in ("news", "docs"))
            a, b = qf(r), qf(o)
            return a is not None and b is not None and a >= b

        faster = [r for r in lrc_rows if all((r["speed"].get(c) or 0) > (i8["speed"].get(c) or 0) for c in cols)]
        both = [r for r in faster if q_at_least(r, i8)]
        if both:
            obs.append("lrc beats ORT INT8 dynamic (" + i8s + f", {qlabel} {qtxt(i8)}) on speed and quality with: "
                       + ", ".join(f"{r['label']} ({r['speed'][main]:.2f}x, {qtxt(r)})" for r in both) + ".")
        else:
            txt = (f"**No lrc configuration beats ORT INT8 dynamic** ({i8s}; {qlabel} {qtxt(i8)}) "
                   "on both speed and quality.")
            if faster:
                txt += (" Faster on every shape (by any margin; under ~10 % is noise) but worse in quality: "
                        + ", ".join(f"{r['label']} ({r['speed'][main]:.2f}x, {qtxt(r)})" for r in faster) + ".")
            else:
                txt += " None is even faster on every shape."
            better_q = [r for r in lrc_rows if q_at_least(r, i8)]
            if not better_q:
                txt += " None matches its quality either."
            obs.append(txt)
    # Pareto frontier on (main speedup, headline quality) among everything measured
    pts = [r for r in rows if r["speed"].get(main) is not None and qf(r) is not None]
    front = []
    for r in pts:
        dominated = False
        for o in pts:
            if o is r:
                continue
            sq, oq = qf(r), qf(o)
            qge = (oq >= sq) if hib else (oq <= sq)
            qgt = (oq > sq) if hib else (oq < sq)
            if o["speed"][main] >= r["speed"][main] and qge and (o["speed"][main] > r["speed"][main] or qgt):
                dominated = True
                break
        if not dominated:
            front.append(r)
    front.sort(key=lambda r: r["speed"][main])
    obs.append("Pareto front (speedup at " + main + " vs " + qlabel + "): "
               + ", ".join(f"{r['label']} ({r['speed'][main]:.2f}x, {qtxt(r)})" for r in front)
               + (". No lrc variant is on it." if not any(r["kind"] == "lrc" for r in front) else "."))
    # data-aware vs plain SVD at the same setting
    def skey(r, **over):
        k = {"method": r["method"], "include": r["include"], "exclude": r.get("exclude"),
             "ratio": r["ratio"], "rank": r["rank"], "int8": bool(r["int8"]),
             "group": r.get("group", False), "policy": r.get("policy")}
        k.update(over)
        return tuple(sorted(k.items()))

    by = {skey(r): r for r in lrc_rows}
    pairs = []
    for r in lrc_rows:
        if r["method"] and r["method"] != "svd":
            p = by.get(skey(r, method="svd", group=False))
            if p and qf(p) is not None and qf(r) is not None:
                pairs.append((p, r))
    if pairs:
        if m["kind"] == "lm":
            obs.append("Data-aware vs plain SVD at the same setting (news / docs perplexity): " + "; ".join(
                f"{r['label']} {fmt_quality(r['q']['news']['perplexity'])} / {fmt_quality(r['q']['docs']['perplexity'])} vs "
                f"{p['label']} {fmt_quality(p['q']['news']['perplexity'])} / {fmt_quality(p['q']['docs']['perplexity'])}"
                for p, r in pairs) + ".")
        else:
            obs.append("Data-aware vs plain SVD at the same setting (Lee r): " + "; ".join(
                f"{r['label']} {qtxt(r)} vs {p['label']} {qtxt(p)}" for p, r in pairs) + ".")
    gpairs = [(by[skey(r, group=False)], r) for r in lrc_rows
              if r.get("group") and skey(r, group=False) in by]
    if gpairs:
        def qq(r):
            if m["kind"] == "lm":
                return f"{fmt_quality(r['q']['news']['perplexity'])} / {fmt_quality(r['q']['docs']['perplexity'])}"
            return qtxt(r)
        obs.append("`--group-inputs` (one A shared by the projections that read one tensor) vs "
                   "each projection on its own, same parameters (" + ("news / docs perplexity"
                   if m["kind"] == "lm" else qlabel) + "): " + "; ".join(
                       f"{r['label']} {qq(r)} vs {p['label']} {qq(p)}" for p, r in gpairs) + ".")
    alloc = [(by.get(skey(r, policy=None)), r) for r in lrc_rows if r.get("policy")]
    alloc = [(u, r) for u, r in alloc if u is not None and u.get("q") and r.get("q")]
    if alloc and m["kind"] == "lm":
        dn, dd = dense["q"]["news"]["perplexity"], dense["q"]["docs"]["perplexity"]
        obs.append("Allocation at the same parameters, policy file vs uniform ratio (ppl news / docs, "
                   "multiples of dense, speedup at " + main + "): " + "; ".join(
                       f"{r['label']}: {fmt_quality(r['q']['news']['perplexity'])} / "
                       f"{fmt_quality(r['q']['docs']['perplexity'])} (x{r['q']['news']['perplexity'] / dn:.2f}"
                       f" / x{r['q']['docs']['perplexity'] / dd:.2f}), {r['speed'][main]:.2f}x vs "
                       f"uniform {fmt_quality(u['q']['news']['perplexity'])} / "
                       f"{fmt_quality(u['q']['docs']['perplexity'])} (x{u['q']['news']['perplexity'] / dn:.2f}"
                       f" / x{u['q']['docs']['perplexity'] / dd:.2f}), {u['speed'][main]:.2f}x"
                       for u, r in alloc) + ". Held-out texts and a control (a middle block kept "
                   "dense instead): benchmarks/allocation.md, from benchmarks/allocation.py.")
    curve = sorted((r for r in lrc_rows if r.get("curve")), key=lambda r: -(r["ratio"] or 0))
    if curve:
        if m["kind"] == "lm":
            dn, dd = dense["q"]["news"]["perplexity"], dense["q"]["docs"]["perplexity"]
            obs.append("Curve (" + curve[0]["label"].rsplit(" ", 1)[0] + "), params kept: ppl news "
                       "/ docs as multiples of dense, speedup at " + main + ": " + "; ".join(
                           f"{r['ratio']:g}: x{r['q']['news']['perplexity'] / dn:.2f} / "
                           f"x{r['q']['docs']['perplexity'] / dd:.2f}, {r['speed'][main]:.2f}x"
                           for r in curve if r.get("q")) + ".")
        else:
            obs.append("Curve (" + curve[0]["label"].rsplit(" ", 1)[0] + "), params kept: "
                       f"{qlabel}, speedup at {main}: " + "; ".join(
                           f"{r['ratio']:g}: {qtxt(r)}, {r['speed'][main]:.2f}x" for r in curve) + ".")
    if m["kind"] == "lm":
        ood = [r for r in lrc_rows if r.get("q")]
        if ood:
            dn, dd = dense["q"]["news"]["perplexity"], dense["q"]["docs"]["perplexity"]
            ratios = [(r, r["q"]["news"]["perplexity"] / dn, r["q"]["docs"]["perplexity"] / dd) for r in ood]
            worse = [x for x in ratios if x[2] > x[1]]
            best = min(ratios, key=lambda x: x[2])
            obs.append(f"Out-of-domain (Python docs) vs in-domain (news): the perplexity grows more out of domain "
                       f"for {len(worse)} of {len(ratios)} lrc variants; the smallest docs increase is "
                       f"x{best[2]:.2f} ({best[0]['label']}; news x{best[1]:.2f})."
                       + (" In-domain numbers alone would overstate quality." if len(worse) > len(ratios) / 2 else ""))
    bigger = [r for r in lrc_rows if r["size_mb"] > dense["size_mb"] * 1.001]
    if bigger:
        obs.append("Files larger than the dense model despite fewer projection parameters: "
                   + ", ".join(f"{r['label']} ({r['size_mb']:.0f} MB)" for r in bigger)
                   + f" vs dense {dense['size_mb']:.0f} MB -- the tied lm_head is factorised into new weights "
                   "while the embedding it shares stays (exclude `head` to avoid this).")
    # measured vs Amdahl bound
    ach = [(r, r["speed"][main] / r["bound"][main]) for r in lrc_rows
           if r["bound"].get(main) and not r.get("int8")]
    if ach:
        lo_r, lo = min(ach, key=lambda x: x[1])
        hi_r, hi = max(ach, key=lambda x: x[1])
        obs.append(f"Measured speedup / Amdahl bound at {main} (float factors): {lo:.2f} ({lo_r['label']}) to "
                   f"{hi:.2f} ({hi_r['label']}); the bound assumes MatMul time shrinks with the parameters.")
    obs.append(f"Latency differences under ~10 % are within the noise of shared cores (median of {runs} "
               "interleaved runs).")
    return obs


def variants_items(m: dict, rows: list[dict]) -> list[dict]:
    """``variants`` items for lrc.report: one per speed shape, each holding every quality metric."""
    items = []
    for _, _, col in shapes(m):
        vs = []
        for r in rows:
            s = r["speed"].get(col)
            q = r.get("q") or {}
            if s is None:
                continue
            # short names: the plot labels of close points overlap otherwise
            name = {"baseline": "ORT " + r["key"]}.get(r["kind"], r["key"])
            if m["kind"] == "lm":
                for t in ("news", "docs"):
                    if t in q:
                        vs.append({"name": name, "label": r["label"], "speedup": s, "quality": q[t]["perplexity"],
                                   "metric": f"perplexity ({t})", "higher_is_better": False,
                                   "size_mb": r["size_mb"]})
            elif "lee_pearson" in q:
                vs.append({"name": name, "label": r["label"], "speedup": s, "quality": q["lee_pearson"],
                           "metric": "Lee Pearson r",
                           "higher_is_better": True, "size_mb": r["size_mb"]})
        items.append({"title": f"{m['title']}: speedup at {col}", "model": m["name"], "shape": col,
                      "variants": vs})
    return items


def write_markdown(path: Path, results: dict, all_rows: dict) -> None:
    mach = results["machine"]
    s = results["settings"]
    L = ["# Benchmarks", "",
         "Generated by `benchmarks/run.py` — do not edit by hand. Rerun with `make bench` (runs "
         "`python benchmarks/run.py`; `--quick` for a 3-minute smoke test, `--models smollm2,minilm`, "
         "`--runs`, `--threads`). Raw numbers: `bench-out/results.json`; plots: `bench-out/report.html`.",
         "",
         f"- Date: {results['date']}",
         f"- Machine: {mach.get('cpu')} — {mach.get('physical_cores')} physical / {mach.get('logical_cores')} "
         f"logical cores (affinity {mach.get('affinity_cores')}), {mach.get('platform')}",
         f"- ONNX Runtime {mach.get('onnxruntime')} (CPU EP), onnx {mach.get('onnx')}, numpy {mach.get('numpy')}, "
         f"Python {mach.get('python')}",
         f"- Threads: {s.get('threads')} intra-op; {s.get('warmup')} warm-ups then {s.get('runs')} timed runs per "
         "shape, all models of one table interleaved round-robin in one process, thread spinning off; "
         "speedup = p50(dense) / p50(variant).",
         f"- Load average when the run started: "
         + ", ".join(f"{k} {v:.2f}" for k, v in results["loadavg_before"].items() if v is not None)
         + ("" if results.get("cpu_busy_start") is None else
            f"; CPU in use by other work then: {results['cpu_busy_start']:.0%} (2 s sample of "
            "/proc/stat; each table's bench samples again right before it starts)"),
         f"- Whole run: {results['total_s'] / 60:.1f} min" + (" (`--quick`)" if results["args"]["quick"] else ""),
         ""]
    if results.get("busy_note"):
        L += [f"> **Note:** {results['busy_note']}", ""]
    if not results["have_method"]:
        L += ["> The installed lrc has no `--method` option: only plain-SVD variants were measured "
              "(data-aware SVD-LLM rows are missing).", ""]
    L += ["Columns: *params kept* = parameters of the targeted projections after / before "
          "(`totals.params_ratio` of `lrc.json`) / of all weight MatMuls in the graph (the `rho` of the Amdahl "
          "bound; int8 factors count as parameters, not bytes); *file MB* = model file(s) on disk; *Amdahl bound* = "
          "`1 / ((1 - f) + f * rho)` with `f` the dense model's measured time fraction in weight MatMuls and "
          "`rho` the weight-MatMul parameters kept (what the parameter cut could give if MatMul time "
          "shrank in proportion). Baselines are ORT's own tools applied to the same dense export.", ""]
    for m in results["models"]:
        rows = all_rows[m["name"]]
        L += [f"## {m['title']}", ""]
        if m["kind"] == "lm":
            dq = m["dense_quality"]
            L += [f"Quality: perplexity on the first {m['eval']['max_tokens']} tokens of in-domain *news* (Lee "
                  f"background corpus; calibration mixes news, wiki markup, forum dialogue and Python code, with no shared "
                  f"16-gram) and out-of-domain *docs* (Python documentation, absent from calibration), "
                  f"windows of {m['eval']['context']} tokens; {dq['news'].get('bos', '')}. "
                  "KL = mean KL(dense || variant) per token, top-1 = agreement of the argmax with the dense "
                  "model. Speed: prefill of 128 tokens, and mean per-token decode step over "
                  f"{m['bench']['settings']['decode_tokens']} steps after it (KV cache).", ""]
        else:
            L += ["Quality: Pearson r between mean-pooled embedding cosines and the Lee 2005 human similarity "
                  "ratings (50 documents, 1225 pairs); embedding cosine to the dense model on Lee and on "
                  "out-of-domain Python-docs passages. Speed: one forward pass at batch 1.", ""]
        L += [table_md(m, rows), ""]
        L += ["Observations (computed from the numbers above):", ""]
        L += [f"- {o}" for o in observations(m, rows, s.get("runs"))]
        amd = m["bench"].get("amdahl")
        if amd:
            L += [f"- Dense time fraction in weight MatMuls (ORT profile): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in amd["matmul_fraction"].items()) + "."]
        notes = m["bench"].get("notes") or []
        if notes:
            L += [f"- Bench notes: " + "; ".join(notes)]
        failed = [v for v in m["variants"] if "error" in v]
        for v in failed:
            L += [f"- {v['label']}: compression failed: {v['error'][:300]}"]
        for v in m["variants"] + m["baselines"]:
            if v.get("quality_error"):
                L += [f"- {v['label']}: quality evaluation failed: {v['quality_error'][:300]}"]
        t = m["timings"]
        exp = "reused" if t.get("export_s") is None else f"{t['export_s']:.0f} s"
        L += [f"- Time: export {exp}, compress {t['compress_s']:.0f} s, bench "
              f"{t['bench_s']:.0f} s, quality {t['quality_s']:.0f} s.", ""]
    text = "\n".join(L) + "\n"
    old = path.read_text() if path.is_file() else ""
    for sec in kept_sections(old):
        text = text.rstrip("\n") + "\n\n" + sec + "\n"
    path.write_text(text)


def kept_sections(old: str) -> list[str]:
    """The sections other scripts write into BENCHMARKS.md (quant.py, runtimes.py,
    genai_builder.py ...: ``<!-- name:begin -->`` .. ``<!-- name:end -->``, names with hyphens
    too), markers included, in order: kept as they are when this script rewrites the file."""
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->",
                                            old, re.S)]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def render(results: dict, md_path: Path, out_dir: Path) -> None:
    """Write OUT/results.json, the Markdown and OUT/report.html from a results dict."""
    from lrc.present.report import write_report

    models = results["models"]
    all_rows = {m["name"]: rows_for(m) for m in models}
    items = [it for m in models for it in variants_items(m, all_rows[m["name"]])]
    results["rows"] = all_rows
    results["variants"] = [{**v, "model": it["model"], "shape": it["shape"]} for it in items
                           for v in it["variants"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = out_dir / "results.json"
    out_json.write_text(json.dumps(results, indent=1, default=str))
    write_markdown(md_path, results, all_rows)
    log(f"wrote {md_path} and {out_json}")
    summaries = []
    for m in models:
        for v in m["variants"]:
            if "summary" in v:
                sm = {k: v["summary"][k] for k in ("rewritten", "totals") if k in v["summary"]}
                sm["model"] = f"{m['name']}: {v['label']}"
                summaries.append(sm)
    html = write_report([m["bench"] for m in models] + items, out_dir / "report.html", summaries=summaries)
    log(f"wrote {html}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="MiniLM only, 3 variants, runs=5, max_tokens 1024: tests the script in < 3 min")
    ap.add_argument("--models", default=None, help="comma-separated: smollm2,minilm (default both; --quick: minilm)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default bench-out; --quick: bench-out/quick)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="where to write the Markdown (default BENCHMARKS.md at the repo root; --quick: OUT/BENCHMARKS.md)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per shape (default 30; --quick 5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="LM eval tokens per text (default 4096; --quick 1024)")
    ap.add_argument("--context", type=int, default=256, help="LM eval window (default 256)")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens for svd-llm")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse exports and compressed folders from an earlier run with the same settings")
    ap.add_argument("--keep-models", action="store_true",
                    help="keep the ORT baseline models (the compressed folders are always kept under OUT/models)")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only rewrite the Markdown, results.json and report.html from a saved results.json")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        args.out = args.out or args.render.parent
        quick = saved.get("args", {}).get("quick")
        render(saved, args.markdown or (args.out / "BENCHMARKS.md" if quick else ROOT / "BENCHMARKS.md"), args.out)
        return 0
    args.runs = args.runs or (5 if args.quick else 30)
    args.max_tokens = args.max_tokens or (1024 if args.quick else 4096)
    names = [n.strip() for n in (args.models or ("minilm" if args.quick else "smollm2,minilm")).split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")
    if args.out is None:
        args.out = Path("bench-out/quick" if args.quick else "bench-out")
    md_path = args.markdown or (args.out / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LRC_CACHE_DIR", str((args.out / "cache").resolve()))

    have_method = cli_has_method()
    log(f"models {names}; runs {args.runs}, threads {args.threads}; data-aware method "
        + ("available" if have_method else "NOT available (plain SVD only)"))
    load_before = {}
    try:
        la = os.getloadavg()
        load_before = {"1min": la[0], "5min": la[1], "15min": la[2]}
    except OSError:
        pass
    from lrc.measure.machine import cpu_busy

    busy_start = cpu_busy()
    models = []
    for n in names:
        models.append(run_model(n, args, have_method))
        (args.out / "models" / n / "result.json").write_text(json.dumps(models[-1], indent=1, default=str))

    # machine/settings from the (first) bench result
    b0 = models[0]["bench"]
    cores = b0["machine"].get("affinity_cores") or b0["machine"].get("logical_cores") or 1
    busy = [f"{m['name']}: {nt}" for m in models for nt in m["bench"].get("notes", []) if "busy" in nt]
    busy_note = None
    if busy or (busy_start or 0) > 0.25:
        busy_note = ("the machine was busy while these numbers were taken ("
                     + ("; ".join(busy) if busy else f"{busy_start:.0%} of the CPU in use by other "
                        "work when the run started")
                     + "): absolute times are inflated and speedups are noisier than usual. "
                     "Regenerate on a quiet machine before quoting them.")
    results = {
        "schema": "lrc.benchmarks/1",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "have_method": have_method,
        "machine": b0["machine"], "settings": b0["settings"],
        "loadavg_before": load_before, "cpu_busy_start": busy_start, "busy_note": busy_note,
        "models": models,
        "total_s": time.perf_counter() - T0,
    }
    render(results, md_path, args.out)
    log(f"total {(time.perf_counter() - T0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
