#!/usr/bin/env python3
"""The quantisation frontier: lrc's quantise + low-rank-correction variants against ONNX Runtime's
own quantisers, on the bundled SmolLM2-135M (and optionally all-MiniLM-L6-v2).

    make bench-quant                      # = python benchmarks/quant.py
    python benchmarks/quant.py --quick    # dense + ORT 4-bit + one lrc variant, 3 runs: checks the script
    python benchmarks/quant.py --reuse    # reuse the export, baselines and lrc folders under bench-out/quant
    python benchmarks/quant.py --render bench-out/quant/results.json   # only rewrite Markdown + plots

For each model it

1. exports the dense model with ``lrc export ALIAS -o DIR`` (benchmarks/run.py's ``export_dense``);
2. builds ONNX Runtime's baselines from it (``BASELINES``: MatMulNBits 4-bit and 8-bit weight-only,
   ``quantize_dynamic`` INT8 per-channel with and without ``reduce_range``, k_quant 4-bit), each
   into a folder with the tokenizer/config beside it;
3. runs ``lrc compress DENSE -o OUT <args>`` for every entry of ``LRC_VARIANTS`` (one list of
   (key, label, CLI args) to edit; skipped, and said so, while ``lrc compress`` has no ``--quantize``);
4. benchmarks dense + everything in ONE interleaved ``lrc.measure.bench`` run (SmolLM2: prefill at
   seq 128 and per-token decode with the KV cache; MiniLM: b1 x s128 / s16), CPU EP;
5. measures quality against the dense model (run.py's ``lm_quality`` on an ``LMReference``:
   perplexity on news and Python docs, KL(dense||new) and top-1 agreement; MiniLM: Lee r and
   embedding cosine), file size and the bytes of all weight initializers (the "bytes bound" on
   the decode speedup = dense initializer bytes / variant initializer bytes);
6. writes the section between ``<!-- quant:begin -->`` and ``<!-- quant:end -->`` of BENCHMARKS.md
   (appended when absent; benchmarks/run.py keeps it), bench-out/quant/results.json and the
   Pareto plots benchmarks/quant-{decode,prefill,size}.png, with observations computed from the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import run as R  # noqa: E402  (benchmarks/run.py: export, CLI calls, quality, formatting)

log = R.log

# --------------------------------------------------------------------------------------------
# what to run
# --------------------------------------------------------------------------------------------

BLOCK = 32            # block size of every 4/8-bit weight-only variant
ACCURACY_LEVEL = 4    # MatMulNBits accuracy_level (4 = int8 compute on the CPU EP)
MARK_BEGIN, MARK_END = "<!-- quant:begin -->", "<!-- quant:end -->"

_I4 = ["--quantize", "int4", "--block-size", str(BLOCK), "--accuracy-level", str(ACCURACY_LEVEL)]

# lrc variants: (key, label, extra CLI args of `lrc compress DENSE -o OUT`). Edit here.
LRC_VARIANTS: list[tuple[str, str, list[str]]] = [
    # int4: every weight MatMul incl. the tied lm_head, embedding table int8 (lrc's defaults)
    ("lrc-int4-r0", "lrc int4, no correction", _I4 + ["--correct-rank", "0"]),
    ("lrc-int4-r16", "lrc int4 + rank-16 correction", _I4 + ["--correct-rank", "16"]),
    ("lrc-int4-r32", "lrc int4 + rank-32 correction", _I4 + ["--correct-rank", "32"]),
    ("lrc-int4-r64", "lrc int4 + rank-64 correction", _I4 + ["--correct-rank", "64"]),
    ("lrc-int4-r32-h128", "lrc int4 + rank-32 correction, head rank 128",
     _I4 + ["--correct-rank", "32,head=128"]),
    ("lrc-int4-r32-h128-seq", "lrc int4 + rank-32 correction, head rank 128, sequential (--update)",
     _I4 + ["--correct-rank", "32,head=128", "--update"]),
    ("lrc-int4-auto", "lrc int4 + correction, ranks allocated (the bytes of uniform 32)",
     _I4 + ["--correct-rank", "auto"]),
    ("lrc-int4-r32-fhead", "lrc int4 + rank-32 correction, head float",
     _I4 + ["--correct-rank", "32", "--exclude", "head"]),
    ("lrc-int4-r32-add", "lrc int4 + rank-32 correction, unfused add form",
     _I4 + ["--correct-rank", "32", "--correct-form", "add"]),
    # int8: DynamicQuantizeMatMul, 7-bit weights; SmoothQuant folded into the norms / up
    ("lrc-int8", "lrc int8 (7-bit weights)", ["--quantize", "int8"]),
    ("lrc-int8-s5", "lrc int8 + SmoothQuant 0.5", ["--quantize", "int8", "--smooth", "0.5"]),
    ("lrc-int8-s5-r32", "lrc int8 + SmoothQuant 0.5 + rank-32 correction",
     ["--quantize", "int8", "--smooth", "0.5", "--correct-rank", "32"]),
]
QUICK_LRC = ("lrc-int4-r32",)

# ONNX Runtime baselines: (key, label, short name for the observations); built by make_baseline(key, ...)
BASELINES: list[tuple[str, str, str]] = [
    ("ort-int4", f"ORT 4-bit MatMulNBits (block {BLOCK}, symmetric, accuracy_level {ACCURACY_LEVEL})", "ORT 4-bit"),
    ("ort-int8-wo", f"ORT 8-bit weight-only MatMulNBits (block {BLOCK}, symmetric, accuracy_level {ACCURACY_LEVEL})",
     "ORT 8-bit weight-only"),
    ("ort-int8-dyn", "ORT INT8 dynamic (quantize_dynamic, per-channel, QInt8)", "ORT INT8 dynamic"),
    ("ort-int8-dyn-rr", "ORT INT8 dynamic reduce_range (per-channel, 7-bit weights)", "ORT INT8 dynamic reduce_range"),
    ("ort-kquant4", f"ORT k_quant 4-bit MatMulNBits (block {BLOCK}, asymmetric, accuracy_level {ACCURACY_LEVEL})",
     "ORT k_quant 4-bit"),
]
QUICK_BASELINES = ("ort-int4",)


# --------------------------------------------------------------------------------------------
# building the variants
# --------------------------------------------------------------------------------------------

def copy_side_files(dense: Path, dst: Path) -> None:
    """Tokenizer and config beside a baseline's model.onnx: feeds need config, eval needs both."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in dense.iterdir():
        if f.is_file() and f.suffix not in (".onnx", ".data") and f.name != "lrc.json":
            shutil.copy2(f, dst / f.name)


@contextlib.contextmanager
def _silence():
    """ORT's vendored neural_compressor prints a progress bar on stdout and logs per node."""
    nc = logging.getLogger("neural_compressor")
    lvl = nc.level
    nc.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nc.setLevel(lvl)


def make_baseline(key: str, src: Path, dst: Path) -> None:
    """Write ORT baseline ``key`` of ``src`` (a .onnx file) to ``dst`` (a .onnx file)."""
    from lrc.runtime import quantizers as Q

    if key == "ort-int4":
        Q.matmul_nbits(src, dst, bits=4, block_size=BLOCK, symmetric=True, accuracy_level=ACCURACY_LEVEL)
    elif key == "ort-int8-wo":
        Q.matmul_nbits(src, dst, bits=8, block_size=BLOCK, symmetric=True, accuracy_level=ACCURACY_LEVEL)
    elif key == "ort-int8-dyn":
        Q.int8_dynamic(src, dst, per_channel=True)
    elif key == "ort-int8-dyn-rr":
        # lrc.runtime.quantizers.int8_dynamic has no reduce_range: ORT's quantize_dynamic directly,
        # with everything else as int8_dynamic sets it (QInt8, per-channel, ORT's default op list)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with Q.quiet():
            quantize_dynamic(str(src), str(dst), per_channel=True, reduce_range=True,
                             weight_type=QuantType.QInt8)
    elif key == "ort-kquant4":
        import onnx

        with Q.quiet(), _silence():
            from onnxruntime.quantization.matmul_nbits_quantizer import (KQuantWeightOnlyQuantConfig,
                                                                         MatMulNBitsQuantizer)

            cfg = KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
            q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=BLOCK, is_symmetric=False,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",),
                                     algo_config=cfg)
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:
        raise ValueError(f"unknown baseline {key}")


def _check_session(path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def build_baseline(key: str, label: str, short: str, dense: Path, mdir: Path, reuse: bool) -> dict:
    import onnxruntime as ort

    out = mdir / key
    stamp = mdir / f"{key}.cmd.json"
    meta = {"baseline": key, "onnxruntime": ort.__version__, "block": BLOCK, "accuracy_level": ACCURACY_LEVEL}
    rec = {"key": key, "label": label, "short": short, "kind": "ort", "path": str(out)}
    if reuse and (out / "model.onnx").is_file() and stamp.is_file() and \
            {k: v for k, v in json.loads(stamp.read_text()).items() if k != "wall_s"} == meta:
        log(f"  {key}: reusing {out}")
        return {**rec, "build": json.loads(stamp.read_text())}
    if out.exists():
        shutil.rmtree(out)
    copy_side_files(dense, out)
    t = time.perf_counter()
    try:
        make_baseline(key, dense / "model.onnx", out / "model.onnx")
        _check_session(out / "model.onnx")
    except Exception as exc:  # noqa: BLE001 - record "did not run: why" and go on
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        log(f"  {key}: did not run: {reason}")
        shutil.rmtree(out, ignore_errors=True)
        return {**rec, "error": reason}
    meta["wall_s"] = time.perf_counter() - t
    stamp.write_text(json.dumps(meta))
    log(f"  {key}: built in {meta['wall_s']:.0f} s")
    return {**rec, "build": meta}


def cli_has_quantize() -> bool:
    r = R.lrc_cli("compress", "--help")
    return re.search(r"--quantize(?![-\w])", r.stdout + r.stderr) is not None


def compress(key: str, label: str, extra: list[str], dense: Path, mdir: Path, reuse: bool) -> dict:
    """``lrc compress DENSE -o OUT --force EXTRA``; reused when the recorded command matches."""
    out = mdir / key
    cmd = ["compress", str(dense), "-o", str(out), "--force", "--recipe", "plain", *extra]
    stamp = mdir / f"{key}.cmd.json"
    rec = {"key": key, "label": label, "kind": "lrc", "path": str(out), "args": list(extra)}
    if reuse and (out / "lrc.json").is_file() and stamp.is_file() \
            and json.loads(stamp.read_text()).get("cmd") == cmd:
        log(f"  {key}: reusing {out}")
        return {**rec, "summary": json.loads((out / "lrc.json").read_text()), "build": json.loads(stamp.read_text())}
    t = time.perf_counter()
    benv = R.blas_env()
    r = R.lrc_cli(*cmd, env=benv)
    wall = time.perf_counter() - t
    if r.returncode != 0 or not (out / "lrc.json").is_file():
        err = (r.stderr or r.stdout).strip()
        reason = f"lrc {' '.join(cmd[3:])} failed ({r.returncode}): {err[-600:]}"
        log(f"  {key}: FAILED: {err[-300:]}")
        return {**rec, "error": reason}
    meta = {"cmd": cmd, "wall_s": wall, "env": benv}
    stamp.write_text(json.dumps(meta))
    summ = json.loads((out / "lrc.json").read_text())
    log(f"  {key}: {summ.get('summary', 'done')} [{wall:.0f} s]")
    return {**rec, "summary": summ, "build": meta}


# --------------------------------------------------------------------------------------------
# bytes of the weights
# --------------------------------------------------------------------------------------------

def initializer_bytes(model: Path) -> int:
    """Bytes of the constants a decode step reads (``lrc.graph.locate.bytes_read_per_token``:
    every initializer except tables only Gather-like nodes read — an embedding lookup reads one
    row; a tied head reading the table through a Transpose reads all of it)."""
    import onnx

    from lrc.graph.locate import bytes_read_per_token

    return bytes_read_per_token(onnx.load(str(model), load_external_data=False))


def isa_flags() -> dict:
    try:
        flags = set()
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("flags"):
                flags = set(ln.split(":", 1)[1].split())
                break
    except OSError:
        return {}
    return {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags,
            "VNNI": bool(flags & {"avx512_vnni", "avx_vnni"}), "AMX": "amx_int8" in flags}


# --------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------

def selected(key: str, args, quick_keys) -> bool:
    if args.only:
        return key in {k.strip() for k in args.only.split(",")}
    return not args.quick or key in quick_keys


def run_model(name: str, args) -> dict:
    from lrc.measure.bench import bench
    from lrc.measure.quality import EncoderReference, LMReference

    cfg = R.MODELS[name]
    mdir = (args.out / "models" / name).resolve()
    mdir.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    dense, timings["export_s"] = R.export_dense(name, mdir, args.reuse)

    # ---- baselines
    t = time.perf_counter()
    base_sel = [b for b in BASELINES if selected(b[0], args, QUICK_BASELINES)]
    log(f"{name}: {len(base_sel)} ONNX Runtime baselines")
    entries = [build_baseline(k, lab, sh, dense, mdir, args.reuse) for k, lab, sh in base_sel]
    timings["baselines_s"] = time.perf_counter() - t

    # ---- lrc variants
    t = time.perf_counter()
    lrc_sel = [v for v in LRC_VARIANTS if selected(v[0], args, QUICK_LRC)]
    have_q = cli_has_quantize()
    if not have_q:
        log(f"{name}: `lrc compress` has no --quantize: the {len(lrc_sel)} lrc variants are skipped")
        entries += [{"key": k, "label": lab, "kind": "lrc", "args": list(a),
                     "error": "not run: this lrc's `compress` has no --quantize option"} for k, lab, a in lrc_sel]
    else:
        log(f"{name}: compressing {len(lrc_sel)} lrc variants")
        entries += [compress(k, lab, a, dense, mdir, args.reuse) for k, lab, a in lrc_sel]
    timings["compress_s"] = time.perf_counter() - t
    ok = [e for e in entries if "error" not in e]

    # ---- sizes and bytes
    from lrc.graph.model import file_size

    dense_rec = {"key": "dense", "label": "dense (fp32)", "kind": "dense", "path": str(dense)}
    for e in [dense_rec] + ok:
        p = Path(e["path"]) / "model.onnx"
        e["size_bytes"] = file_size(p)
        e["weight_bytes"] = initializer_bytes(p)
    for e in ok:
        e["bytes_bound"] = dense_rec["weight_bytes"] / e["weight_bytes"] if e["weight_bytes"] else None

    # ---- speed: one interleaved run, dense first
    work = mdir / "bench-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log(f"{name}: benchmarking {1 + len(ok)} models interleaved, seq {list(cfg['seq_lens'])}, "
        f"{args.runs} runs, {args.threads} threads")
    t = time.perf_counter()
    res = bench([dense] + [Path(e["path"]) for e in ok], eps=("cpu",), threads=args.threads,
                batch_sizes=(1,), seq_lens=cfg["seq_lens"], decode_tokens=cfg["decode_tokens"],
                runs=args.runs, warmup=args.warmup, baselines=False, workdir=work,
                progress=lambda m: log(f"  bench {m}"))
    timings["bench_s"] = time.perf_counter() - t
    log(f"{name}: bench done in {timings['bench_s']:.0f} s")
    (mdir / "bench.json").write_text(json.dumps(res, indent=1, default=str))
    dense_rec["bench_name"] = res["models"][0]["name"]
    for e, bm in zip(ok, res["models"][1:]):
        e["bench_name"] = bm["name"]

    # ---- quality
    t = time.perf_counter()
    log(f"{name}: quality of dense and {len(ok)} variants")
    if cfg["kind"] == "lm":
        texts = ["news", "docs"]
        with tempfile.TemporaryDirectory(prefix="lrc-quant-ref-", dir=mdir) as tmp:
            ref = LMReference(dense, texts, args.context, args.max_tokens, args.threads, Path(tmp))
            dense_rec["quality"] = {tx: ref.dense(tx) for tx in texts}
            for tx, d in dense_rec["quality"].items():
                log(f"  dense {tx}: perplexity {d['perplexity']:.2f} on {d['tokens']} tokens")
            for e in ok:
                tv = time.perf_counter()
                try:
                    e["quality"] = R.lm_quality(ref, Path(e["path"]), texts)
                except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the run
                    e["quality_error"] = f"{type(exc).__name__}: {exc}"
                    log(f"  {e['key']}: quality FAILED: {e['quality_error'][:300]}")
                    continue
                q = e["quality"]
                log(f"  {e['key']}: ppl news {q['news']['perplexity']:.4g} (KL {q['news']['kl']:.3f}, "
                    f"top-1 {q['news']['top1_agreement']:.3f}), docs {q['docs']['perplexity']:.4g} "
                    f"[{time.perf_counter() - tv:.0f} s]")
            del ref
    else:
        lee = EncoderReference(dense, threads=args.threads)
        docs = EncoderReference(lee.model, "docs", threads=args.threads)
        dense_rec["quality"] = {"lee_pearson": lee.lee_pearson, "embedding_cosine_lee": 1.0,
                                "embedding_cosine_docs": 1.0}
        log(f"  dense: Lee Pearson {lee.lee_pearson:.4f}")
        for e in ok:
            try:
                e["quality"] = R.encoder_quality(lee, docs, Path(e["path"]))
            except Exception as exc:  # noqa: BLE001
                e["quality_error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {e['key']}: quality FAILED: {e['quality_error'][:300]}")
                continue
            q = e["quality"]
            log(f"  {e['key']}: Lee r {q['lee_pearson']:.4f}, cosine {q['embedding_cosine_lee']:.4f} "
                f"(docs {q['embedding_cosine_docs']:.4f})")
    timings["quality_s"] = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    return {"name": name, "title": cfg["title"], "kind": cfg["kind"], "alias": cfg["alias"],
            "dense": dense_rec, "entries": entries, "bench": res, "timings": timings,
            "eval": {"context": args.context, "max_tokens": args.max_tokens} if cfg["kind"] == "lm" else
            {"lee": "Lee 2005, 50 docs, 1225 pairs", "ood": "docs passages"}}


# --------------------------------------------------------------------------------------------
# rows, table, observations
# --------------------------------------------------------------------------------------------

def speed_cols(m: dict) -> list[tuple[str, int, str]]:
    """(phase, seq, short column name)."""
    if m["kind"] == "lm":
        return [("prefill", 128, "prefill"), ("decode", 128, "decode")]
    return [("encoder", s, f"s{s}") for s in R.MODELS[m["name"]]["seq_lens"]]


def rows_for(m: dict) -> list[dict]:
    runs = {(r["model"], r["phase"], r["seq"]): r for r in m["bench"]["runs"]}
    out = []
    for e in [m["dense"]] + [e for e in m["entries"] if "error" not in e]:
        r = {k: e.get(k) for k in ("key", "label", "kind", "size_bytes", "weight_bytes", "args")}
        r["short"] = e.get("short") or {k: sh for k, _, sh in BASELINES}.get(e["key"]) or e["label"]
        r["bytes_bound"] = 1.0 if e["kind"] == "dense" else e.get("bytes_bound")
        r["size_mb"] = (e.get("size_bytes") or 0) / 1e6
        r["speed"], r["ms"] = {}, {}
        for ph, seq, col in speed_cols(m):
            x = runs.get((e.get("bench_name"), ph, seq))
            r["speed"][col] = x.get("speedup") if x else None
            r["ms"][col] = x.get("p50_ms") if x else None
        q = e.get("quality")
        r["q"] = q
        if m["kind"] == "lm" and q:
            dq = m["dense"]["quality"]
            r["ratio"] = {t: q[t]["perplexity"] / dq[t]["perplexity"] for t in ("news", "docs") if t in q}
        out.append(r)
    return out


def _x(v: float) -> str:
    return "-" if v is None else (f"x{v:.3f}" if v < 10 else f"x{v:.2g}")


def table_md(m: dict, rows: list[dict]) -> str:
    cols = [c for _, _, c in speed_cols(m)]
    if m["kind"] == "lm":
        head = ["variant", "ppl news (x dense)", "ppl docs (x dense)", "KL news", "top-1 news",
                "prefill s128 x", "decode x", "bytes bound", "file MB"]
    else:
        head = ["variant", "Lee r", "emb. cos (Lee / docs)"] + [f"b1 x {c} x" for c in cols] + ["bytes bound", "file MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = r.get("q") or {}
        cells = [r["label"]]
        if m["kind"] == "lm":
            for t in ("news", "docs"):
                cells.append("-" if t not in q else f"{R.fmt_quality(q[t]['perplexity'])}"
                             + ("" if r["kind"] == "dense" else f" ({_x(r['ratio'][t])})"))
            cells.append("-" if r["kind"] == "dense" or "news" not in q else f"{q['news']['kl']:.3f}")
            cells.append("-" if r["kind"] == "dense" or "news" not in q else f"{q['news']['top1_agreement']:.3f}")
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
        cells.append("-" if r["bytes_bound"] is None else f"{r['bytes_bound']:.2f}")
        cells.append(f"{r['size_mb']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _qual(m: dict):
    """(quality numbers of a row as a tuple, lower is better on each) or None."""
    if m["kind"] == "lm":
        return lambda r: (r["ratio"]["news"], r["ratio"]["docs"]) if r.get("ratio") and len(r["ratio"]) == 2 else None
    return lambda r: ((-r["q"]["lee_pearson"], -r["q"]["embedding_cosine_docs"])
                      if r.get("q") and "lee_pearson" in r["q"] else None)


def _axes(m: dict) -> list[tuple[str, str, bool]]:
    """(axis key, description, higher is better) for dominance and the plots."""
    ax = [(c, c if m["kind"] == "lm" else f"b1 x {c}", True) for _, _, c in speed_cols(m)]
    return ax + [("size", "size", False)]


def _axval(r: dict, ax: str):
    return r["size_mb"] if ax == "size" else r["speed"].get(ax)


def dominates(a: dict, b: dict, ax: str, hib: bool, qf) -> bool:
    """a at least as good as b in quality (every number) and on axis ax, strictly better somewhere."""
    qa, qb, va, vb = qf(a), qf(b), _axval(a, ax), _axval(b, ax)
    if qa is None or qb is None or va is None or vb is None:
        return False
    ge = va >= vb if hib else va <= vb
    gt = va > vb if hib else va < vb
    return all(x <= y for x, y in zip(qa, qb)) and ge and (gt or any(x < y for x, y in zip(qa, qb)))


def pareto(rows: list[dict], ax: str, hib: bool, q1) -> list[dict]:
    """Non-dominated rows on (one quality number q1, axis)."""
    pts = [r for r in rows if q1(r) is not None and _axval(r, ax) is not None]
    front = []
    for r in pts:
        dom = False
        for o in pts:
            if o is r:
                continue
            vo, vr = _axval(o, ax), _axval(r, ax)
            ge = vo >= vr if hib else vo <= vr
            gt = vo > vr if hib else vo < vr
            if q1(o) <= q1(r) and ge and (gt or q1(o) < q1(r)):
                dom = True
                break
        if not dom:
            front.append(r)
    return sorted(front, key=q1)


def _arg(r: dict, flag: str):
    a = r.get("args") or []
    return a[a.index(flag) + 1] if flag in a and a.index(flag) + 1 < len(a) else None


def observations(m: dict, rows: list[dict], runs: int) -> list[str]:
    obs: list[str] = []
    qf = _qual(m)
    lm = m["kind"] == "lm"
    lrc = [r for r in rows if r["kind"] == "lrc" and qf(r) is not None]
    ort = [r for r in rows if r["kind"] == "ort" and qf(r) is not None]
    axes = _axes(m)

    def qtxt(r):
        if lm:
            return f"{_x(r['ratio']['news'])} / {_x(r['ratio']['docs'])}"
        return f"Lee r {r['q']['lee_pearson']:.3f}, cos {r['q']['embedding_cosine_docs']:.3f}"

    def vtxt(r, ax):
        v = _axval(r, ax)
        return "-" if v is None else (f"{v:.0f} MB" if ax == "size" else f"{v:.2f}x")

    qname = "perplexity news / docs as multiples of dense" if lm else "Lee r and docs embedding cosine"
    if not lrc:
        obs.append("No lrc variant was measured (see the notes below), so nothing is compared with the baselines.")
    for b in ort:
        parts = []
        for ax, desc, hib in axes:
            if _axval(b, ax) is None:
                continue
            dom = [r for r in lrc if dominates(r, b, ax, hib, qf)]
            if dom:
                parts.append(f"{desc}: dominated by " + ", ".join(f"{r['short']} ({qtxt(r)}, {vtxt(r, ax)})" for r in dom))
                continue
            if not lrc:
                continue
            good = [r for r in lrc if all(x <= y for x, y in zip(qf(r), qf(b)))]
            if good:
                best = (max if hib else min)(good, key=lambda r: _axval(r, ax) or (0 if hib else 1e30))
                parts.append(f"{desc}: not dominated -- the {len(good)} lrc point(s) at least as good on "
                             f"every quality number are {'slower' if hib else 'larger'} (best {best['short']}: "
                             f"{vtxt(best, ax)} vs {vtxt(b, ax)})")
            else:
                fast = [r for r in lrc if _axval(r, ax) is not None and
                        (_axval(r, ax) >= _axval(b, ax) if hib else _axval(r, ax) <= _axval(b, ax))]
                closest = min(lrc, key=lambda r: max(x - y for x, y in zip(qf(r), qf(b))))
                parts.append(f"{desc}: not dominated -- no lrc point is at least as good on every quality "
                             f"number (closest: {closest['short']}, {qtxt(closest)})"
                             + (f"; {len(fast)} lrc point(s) at least as {'fast' if hib else 'small'}" if fast else ""))
        if parts:
            obs.append(f"vs **{b['short']}** ({qtxt(b)}, " + ", ".join(
                vtxt(b, ax) + ("" if ax == "size" else f" {d}") for ax, d, _ in axes if _axval(b, ax) is not None)
                + "): " + "; ".join(parts) + ".")
    # the correction-rank sweep of each lrc quantiser
    if lm:
        for qv in sorted({_arg(r, "--quantize") for r in lrc if _arg(r, "--quantize")}):
            sw = [r for r in lrc if _arg(r, "--quantize") == qv
                  and (_arg(r, "--correct-rank") or "").isdigit() and len(r["args"]) == len(_I4) + 2]
            if len(sw) > 1:
                sw.sort(key=lambda r: (int(_arg(r, "--correct-rank")), _arg(r, "--correct-form") or ""))
                obs.append(f"lrc {qv} by correction rank ({qname}; KL news; decode / prefill speedup; MB): " + "; ".join(
                    f"r{_arg(r, '--correct-rank')}{' ' + _arg(r, '--correct-form') if _arg(r, '--correct-form') else ''}: "
                    f"{qtxt(r)}, KL {r['q']['news']['kl']:.3f}, {vtxt(r, 'decode')} / {vtxt(r, 'prefill')}, {r['size_mb']:.0f} MB"
                    for r in sw) + ".")
        by = {r["key"]: r for r in rows}
        r0, o4 = by.get("lrc-int4-r0"), by.get("ort-int4")
        if r0 and o4 and qf(r0) and qf(o4):
            obs.append(f"lrc int4 without correction (ORT's 4-bit codes, plus the tied head in 4-bit and the "
                       f"embedding table in int8, which ORT's quantiser leaves float) vs ORT 4-bit: {qtxt(r0)} vs {qtxt(o4)}, "
                       f"decode {vtxt(r0, 'decode')} vs {vtxt(o4, 'decode')}, {r0['size_mb']:.0f} vs {o4['size_mb']:.0f} MB.")
        a, b = by.get("ort-int8-dyn"), by.get("ort-int8-dyn-rr")
        if a and b and qf(a) and qf(b):
            obs.append(f"ORT INT8 dynamic without / with reduce_range: perplexity news {R.fmt_quality(a['q']['news']['perplexity'])}"
                       f" / {R.fmt_quality(b['q']['news']['perplexity'])}, docs {R.fmt_quality(a['q']['docs']['perplexity'])}"
                       f" / {R.fmt_quality(b['q']['docs']['perplexity'])}; prefill {vtxt(a, 'prefill')} / {vtxt(b, 'prefill')}"
                       + (" (this CPU has no VNNI: u8*s8 pair sums saturate with 8-bit weights, not with 7-bit)."
                          if m.get("isa", {}).get("VNNI") is False else "."))
        # measured decode speedup against the bytes bound
        dec = [(r, r["speed"]["decode"] / r["bytes_bound"]) for r in rows
               if r["kind"] != "dense" and r["speed"].get("decode") and r.get("bytes_bound")]
        if dec:
            lo, hi = min(dec, key=lambda x: x[1]), max(dec, key=lambda x: x[1])
            obs.append(f"Decode speedup / bytes bound: {lo[1]:.2f} ({lo[0]['short']}: {lo[0]['speed']['decode']:.2f}x of "
                       f"{lo[0]['bytes_bound']:.2f}) to {hi[1]:.2f} ({hi[0]['short']}: {hi[0]['speed']['decode']:.2f}x of "
                       f"{hi[0]['bytes_bound']:.2f}); the bound assumes a decode step costs only the weight bytes it reads.")
    # the best of each axis at near-dense quality
    if lm:
        near = [r for r in rows if r["kind"] != "dense" and qf(r) and max(qf(r)) <= NEAR]
        for ax, desc, hib in axes:
            c = [r for r in near if _axval(r, ax) is not None]
            if c:
                best = (max if hib else min)(c, key=lambda r: _axval(r, ax))
                obs.append(f"Best {'file size' if ax == 'size' else desc + ' speedup'} with perplexity within "
                           f"x{NEAR:.2f} of dense on both texts: {best['short']} ({vtxt(best, ax)}, {qtxt(best)})"
                           + (f"; {len(c)} variants qualify." if len(c) > 1 else "."))
            elif ax == axes[0][0]:
                obs.append(f"No variant keeps perplexity within x{NEAR:.2f} of dense on both texts.")
    # Pareto fronts
    q1s = [("news", lambda r: r["ratio"]["news"] if r.get("ratio") and "news" in r["ratio"] else None)] if lm else \
        [("Lee r", lambda r: -r["q"]["lee_pearson"] if r.get("q") and "lee_pearson" in r["q"] else None)]
    for qn, q1 in q1s:
        for ax, desc, hib in axes:
            fr = pareto(rows, ax, hib, q1)
            if fr:
                obs.append(f"Pareto front ({qn}{' perplexity' if lm else ''} vs "
                           f"{'file size' if ax == 'size' else desc + ' speedup'}): "
                           + ", ".join(f"{r['short']} ({qtxt(r)}, {vtxt(r, ax)})" for r in fr)
                           + ("" if any(r["kind"] == "lrc" for r in fr) else "; no lrc variant is on it") + ".")
    obs.append(f"Speed differences under ~10 % are within the noise of shared cores (medians of {runs} interleaved runs).")
    return obs


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------

COLORS = {"dense": "black", "ort": "tab:orange", "lrc": "tab:blue"}
NEAR = 1.10    # "near-dense quality": perplexity ratio on both texts at most this
BROKEN = 10.0  # perplexity ratios above this are drawn at the right edge


def plot(m: dict, rows: list[dict], ax_key: str, ylabel: str, hib: bool, path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = m["kind"] == "lm"
    fig, ax = plt.subplots(figsize=(8.5, 5.6), dpi=120)
    if lm:
        series = [("news", "o", "full", "news (in domain)"), ("docs", "s", "none", "Python docs (out of domain)")]
        qv = lambda r, t: r["ratio"].get(t) if r.get("ratio") else None  # noqa: E731
    else:
        series = [("lee", "o", "full", "Lee r")]
        qv = lambda r, t: r["q"]["lee_pearson"] if r.get("q") and "lee_pearson" in r["q"] else None  # noqa: E731
    pts = [(r, t, qv(r, t), _axval(r, ax_key)) for r in rows for t, *_ in series]
    pts = [p for p in pts if p[2] is not None and p[3] is not None]
    if not pts:
        plt.close(fig)
        return
    finite = [x for _, _, x, _ in pts if not lm or x <= BROKEN]
    xmax = max(finite) if finite else 2.0
    edge = xmax + 0.12 * (xmax - min(finite) + 1e-9) if lm else None
    broken = [p for p in pts if lm and p[2] > BROKEN]
    for t, mk, fill, lab in series:
        for kind, col in COLORS.items():
            xs = [x for r, tt, x, y in pts if tt == t and r["kind"] == kind and not (lm and x > BROKEN)]
            ys = [y for r, tt, x, y in pts if tt == t and r["kind"] == kind and not (lm and x > BROKEN)]
            if xs:
                ax.scatter(xs, ys, marker=mk, s=46, c=col if fill == "full" else "none", edgecolors=col,
                           linewidths=1.3, zorder=3)
    if lm:  # join the two texts of one variant
        for r in rows:
            a, b = qv(r, "news"), qv(r, "docs")
            y = _axval(r, ax_key)
            if a is not None and b is not None and y is not None and a <= BROKEN and b <= BROKEN:
                ax.plot([a, b], [y, y], color=COLORS[r["kind"]], lw=0.6, alpha=0.5, zorder=2)
    for r, t, x, y in pts:
        if t == series[0][0] and not (lm and x > BROKEN):
            ax.annotate(r["key"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7.5,
                        color=COLORS[r["kind"]])
    seen = set()
    for r, t, x, y in broken:
        ax.scatter([edge], [y], marker=">", s=50, c=COLORS[r["kind"]] if t == "news" else "none",
                   edgecolors=COLORS[r["kind"]], zorder=3)
        if r["key"] not in seen:
            seen.add(r["key"])
            ax.annotate(f"{r['key']} (x{x:.1g}, off scale)", (edge, y), textcoords="offset points",
                        xytext=(-6, -11), fontsize=7, ha="right", color=COLORS[r["kind"]])
    # Pareto fronts, one per quality series
    for (t, _, _, lab), ls in zip(series, ("--", ":")):
        if lm:
            q1 = lambda r, t=t: (r["ratio"].get(t) if r.get("ratio") and r["ratio"].get(t, 1e30) <= BROKEN else None)  # noqa: E731
        else:
            q1 = lambda r: (-r["q"]["lee_pearson"] if r.get("q") and "lee_pearson" in r["q"] else None)  # noqa: E731
        fr = pareto(rows, ax_key, hib, q1)
        if len(fr) >= 1:
            xs = [abs(q1(r)) for r in fr]
            ys = [_axval(r, ax_key) for r in fr]
            ax.plot(xs, ys, ls, color="grey", lw=1.1, zorder=1, drawstyle="steps-post",
                    label=f"Pareto front ({lab})")
    ax.axvline(1.0 if lm else rows[0]["q"]["lee_pearson"], color="lightgrey", lw=0.8, zorder=0)
    if ax_key != "size":
        ax.axhline(1.0, color="lightgrey", lw=0.8, zorder=0)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label={"dense": "dense", "ort": "ONNX Runtime",
                                                                   "lrc": "lrc"}[k]) for k, c in COLORS.items()]
    if lm:
        handles += [Line2D([], [], marker="o", ls="", color="grey", label="news (in domain)"),
                    Line2D([], [], marker="s", ls="", color="grey", markerfacecolor="none",
                           label="Python docs (out of domain)")]
    h2, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + h2, fontsize=7.5, loc="best")
    ax.set_xlabel("perplexity / dense perplexity (lower is better)" if lm else "Lee r (higher is better)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{m['title'].split(' (')[0]}: {ylabel} vs quality", fontsize=10.5)
    ax.grid(alpha=0.25)
    fig.text(0.01, 0.005, subtitle, fontsize=6.8, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_paths(m: dict, plot_dir: Path) -> dict:
    if m["name"] == "smollm2":
        return {"decode": plot_dir / "quant-decode.png", "prefill": plot_dir / "quant-prefill.png",
                "size": plot_dir / "quant-size.png"}
    return {c: plot_dir / f"quant-{m['name']}-{c}.png" for c in [c for _, _, c in speed_cols(m)] + ["size"]}


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def machine_line(mach: dict, isa: dict) -> str:
    """benchmarks/run.py's machine description, plus the instruction sets that decide int8 speed."""
    s = (f"{mach.get('cpu')} — {mach.get('physical_cores')} physical / {mach.get('logical_cores')} "
         f"logical cores (affinity {mach.get('affinity_cores')}), {mach.get('platform')}")
    if isa:
        s += "; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa.items())
    return s


def section_md(results: dict, all_rows: dict, md_path: Path, plots: dict) -> str:
    mach, s = results["machine"], results["settings"]
    L = [MARK_BEGIN, "", "## Quantisation frontier: lrc vs ONNX Runtime's quantisers", "",
         "Generated by `benchmarks/quant.py` — do not edit by hand. Rerun with `make bench-quant` (runs "
         "`python benchmarks/quant.py`; `--quick` checks the script in a few minutes, `--reuse` keeps the built "
         "models, `--runs`, `--threads`, `--max-tokens`, `--models smollm2,minilm`). Raw numbers: "
         "`bench-out/quant/results.json`; `make bench` keeps this section.", "",
         f"- Date: {results['date']}",
         f"- Machine: {machine_line(mach, results.get('isa') or {})}",
         f"- ONNX Runtime {mach.get('onnxruntime')} (CPU EP), onnx {mach.get('onnx')}, numpy {mach.get('numpy')}, "
         f"Python {mach.get('python')}",
         f"- Threads: {s.get('threads')} intra-op; {s.get('warmup')} warm-ups then {s.get('runs')} timed runs per "
         "shape, every model of a table interleaved round-robin in one process (thread spinning off); "
         "speedup = p50(dense) / p50(variant).",
         f"- Weight-only 4/8-bit: block {BLOCK}, accuracy_level {ACCURACY_LEVEL} (int8 compute on the CPU EP) for "
         "ORT's MatMulNBits baselines and lrc's `--accuracy-level` where its variants pass it.",
         "- Load average when the run started: "
         + (", ".join(f"{k} {v:.2f}" for k, v in results["loadavg_before"].items() if v is not None) or "n/a")
         + ("" if results.get("cpu_busy_start") is None else
            f"; CPU in use by other work then: {results['cpu_busy_start']:.0%}"),
         f"- Whole run: {results['total_s'] / 60:.1f} min" + (" (`--quick`: not for quoting)" if results["args"].get("quick") else ""),
         ""]
    if results.get("busy_note"):
        L += [f"> **Note:** {results['busy_note']}", ""]
    L += ["Columns: *x dense* = perplexity / dense perplexity; KL = mean KL(dense || variant) per token and "
          "top-1 = argmax agreement with dense, both on news; *bytes bound* = bytes of the constants a decode step "
          "reads in the dense model / in the variant (every initializer but tables only Gathers read: an embedding "
          "lookup reads one row, a tied head reading the table through a Transpose all of it): the decode "
          "speedup if a decode step cost only the weight bytes it reads; *file MB* = .onnx + external data. "
          "lrc rows are `lrc compress DENSE --quantize ...` with the arguments in the notes; ORT rows are ONNX "
          "Runtime's own quantisers applied to the same dense export.", ""]
    for m in results["models"]:
        rows = all_rows[m["name"]]
        L += [f"### {m['title']}", ""]
        if m["kind"] == "lm":
            d = m["dense"]["quality"]
            L += [f"Quality on the first {m['eval']['max_tokens']} tokens of in-domain *news* (Lee background corpus) "
                  f"and out-of-domain *docs* (Python documentation), windows of {m['eval']['context']} tokens"
                  f"{'; ' + d['news']['bos'] if d['news'].get('bos') else ''}. Speed: prefill of 128 tokens, and the "
                  f"mean per-token decode step over {m['bench']['settings']['decode_tokens']} steps after it (KV cache).", ""]
        else:
            L += ["Quality: Pearson r with the Lee 2005 human similarity ratings; embedding cosine to dense on Lee "
                  "and on Python-docs passages. Speed: one forward pass at batch 1.", ""]
        L += [table_md(m, rows), ""]
        for k, p in plots.get(m["name"], {}).items():
            if p.is_file():
                L += [f"![{m['name']} {k}]({os.path.relpath(p, md_path.parent)})"]
        L += ["", "Observations (computed from the numbers above):", ""]
        L += [f"- {o}" for o in observations(m, rows, s.get("runs"))]
        amd = m["bench"].get("amdahl")
        if amd:
            L += ["- Dense time fraction in weight MatMuls (ORT profile): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in amd["matmul_fraction"].items()) + "."]
        for e in m["entries"]:
            if e["kind"] == "lrc" and "error" not in e:
                L += [f"- {e['label']}: `lrc compress DENSE -o OUT {' '.join(e['args'])}`"
                      + (f" ({e['build']['wall_s']:.0f} s)" if e.get("build", {}).get("wall_s") else "")]
        for e in m["entries"]:
            if "error" in e:
                L += [f"- {e['label']}: " + (e["error"] if e["error"].startswith("not run") else
                                             f"did not run: {e['error'][:400]}")]
            elif e.get("quality_error"):
                L += [f"- {e['label']}: quality evaluation failed: {e['quality_error'][:300]}"]
        if any(e["key"] == "ort-int8-dyn-rr" and "error" not in e for e in m["entries"]):
            L += ["- ORT INT8 dynamic reduce_range is `onnxruntime.quantization.quantize_dynamic(..., per_channel=True, "
                  "reduce_range=True, weight_type=QInt8)` called directly (lrc.runtime.quantizers.int8_dynamic has no "
                  "reduce_range)."]
        notes = m["bench"].get("notes") or []
        if notes:
            L += ["- Bench notes: " + "; ".join(notes)]
        t = m["timings"]
        exp = "reused" if t.get("export_s") is None else f"{t['export_s']:.0f} s"
        L += [f"- Time: export {exp}, ORT baselines {t['baselines_s']:.0f} s, lrc compress {t['compress_s']:.0f} s, "
              f"bench {t['bench_s']:.0f} s, quality {t['quality_s']:.0f} s.", ""]
    L += [MARK_END]
    return "\n".join(L)


def write_section(md_path: Path, section: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Replace the text between the markers (inclusive), or append the section at the end."""
    old = md_path.read_text() if md_path.is_file() else ""
    b, e = old.find(begin), old.find(end)
    if 0 <= b < e:
        new = old[:b] + section + old[e + len(end):]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(new)


def render(results: dict, md_path: Path, out_dir: Path, plot_dir: Path) -> None:
    all_rows = {}
    plots = {}
    mach, s = results["machine"], results["settings"]
    for m in results["models"]:
        m["isa"] = results.get("isa") or {}
        rows = rows_for(m)
        all_rows[m["name"]] = rows
        sub = (f"{mach.get('cpu')}, {s.get('threads')} threads, ONNX Runtime {mach.get('onnxruntime')} CPU EP, "
               f"medians of {s.get('runs')} interleaved runs; {results['date'][:10]}"
               + (f"; {m['eval']['max_tokens']} tokens per text" if m["kind"] == "lm" else "")
               + (" (--quick)" if results["args"].get("quick") else ""))
        pp = plot_paths(m, plot_dir)
        for ax, desc, hib in _axes(m):
            ylabel = ("file MB" if ax == "size" else
                      {"prefill": "prefill speedup (seq 128)", "decode": "decode speedup (per token)"}.get(ax, f"speedup b1 x {ax}"))
            try:
                plot(m, rows, ax, ylabel, hib, pp[ax], sub)
            except Exception as exc:  # noqa: BLE001 - a plot must not lose the numbers
                log(f"plot {pp[ax]} failed: {type(exc).__name__}: {exc}")
        plots[m["name"]] = pp
    results["rows"] = all_rows
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = out_dir / "results.json"
    out_json.write_text(json.dumps(results, indent=1, default=str))
    write_section(md_path, section_md(results, all_rows, md_path, plots))
    log(f"wrote {md_path} (section {MARK_BEGIN}), {out_json}, plots in {plot_dir}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="dense + ORT 4-bit + one lrc variant, 3 runs, 512 tokens: checks the script; writes "
                         "under OUT/quick, not BENCHMARKS.md")
    ap.add_argument("--models", default="smollm2", help="comma-separated: smollm2,minilm (default smollm2)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/quant"),
                    help="models and results.json (default bench-out/quant; --quick: results in OUT/quick)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="file whose quant section is written (default BENCHMARKS.md; --quick: OUT/quick/BENCHMARKS.md)")
    ap.add_argument("--plots", type=Path, default=None,
                    help="folder of the PNG plots (default benchmarks/; --quick: OUT/quick)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per shape (default 30; --quick 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="LM eval tokens per text (default 4096; --quick 512)")
    ap.add_argument("--context", type=int, default=256, help="LM eval window (default 256)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the export, ORT baselines and lrc folders under OUT/models made with the same settings")
    ap.add_argument("--only", default=None, metavar="KEYS",
                    help="comma-separated keys of the ORT baselines / lrc variants to build and measure "
                         "(dense always; overrides --quick's choice), e.g. ort-int4,lrc-int4-r32")
    ap.add_argument("--saved", default="", metavar="NAMES",
                    help="comma-separated models measured by an earlier run whose OUT/models/NAME/result.json "
                         "joins this run's section as it was (e.g. --models smollm2 --saved minilm)")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only rewrite the section, results.json and plots from a saved results.json")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        quick = saved.get("args", {}).get("quick")
        out = args.render.parent
        md = args.markdown or (out / "BENCHMARKS.md" if quick else ROOT / "BENCHMARKS.md")
        render(saved, md, out, args.plots or (out if quick else ROOT / "benchmarks"))
        return 0
    args.runs = args.runs or (3 if args.quick else 30)
    args.max_tokens = args.max_tokens or (512 if args.quick else 4096)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in R.MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(R.MODELS)}")
    known = [k for k, _, _ in BASELINES] + [k for k, _, _ in LRC_VARIANTS]
    bad = [k.strip() for k in (args.only or "").split(",") if k.strip() and k.strip() not in known]
    if bad:
        ap.error(f"unknown --only key(s) {bad}; choose from {known}")
    res_dir = args.out / "quick" if args.quick else args.out
    md_path = args.markdown or (res_dir / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md")
    plot_dir = args.plots or (res_dir if args.quick else ROOT / "benchmarks")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # calibration statistics shared with benchmarks/run.py (keyed by the model's hash)
    os.environ.setdefault("LRC_CACHE_DIR", str((args.out.parent / "cache").resolve()))

    log(f"models {names}; runs {args.runs}, threads {args.threads}, {args.max_tokens} tokens per text"
        + (" (--quick)" if args.quick else ""))
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
        models.append(run_model(n, args))
        (args.out / "models" / n / "result.json").write_text(json.dumps(models[-1], indent=1, default=str))
    busy = [f"{m['name']}: {nt}" for m in models for nt in m["bench"].get("notes", []) if "busy" in nt]
    busy_note = None
    if busy or (busy_start or 0) > 0.25:
        busy_note = ("the machine was busy while these numbers were taken ("
                     + ("; ".join(busy) if busy else f"{busy_start:.0%} of the CPU in use by other work when "
                        "the run started")
                     + "): absolute times are inflated and speedups are noisier than usual. "
                     "Regenerate on a quiet machine before quoting them.")
    saved = [n.strip() for n in args.saved.split(",") if n.strip() and n.strip() not in names]
    for n in saved:
        f = args.out / "models" / n / "result.json"
        if not f.is_file():
            ap.error(f"--saved {n}: no {f} from an earlier run")
        models.append(json.loads(f.read_text()))
        log(f"{n}: results of an earlier run kept ({f})")
    b0 = models[0]["bench"]
    results = {
        "schema": "lrc.benchmarks.quant/1",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": b0["machine"], "settings": b0["settings"], "isa": isa_flags(),
        "block": BLOCK, "accuracy_level": ACCURACY_LEVEL,
        "lrc_variants": [{"key": k, "label": lab, "args": a} for k, lab, a in LRC_VARIANTS],
        "loadavg_before": load_before, "cpu_busy_start": busy_start, "busy_note": busy_note,
        "models": models,
        "total_s": time.perf_counter() - R.T0,
    }
    render(results, md_path, res_dir, plot_dir)
    log(f"total {(time.perf_counter() - R.T0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
