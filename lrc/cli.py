"""The ``lrc`` command line: export, analyse, compress, verify, eval, bench, generate, report, tune.

Every user error ends as one line on stderr and a non-zero exit (2 for bad input); never a
traceback (set ``LRC_DEBUG=1`` to see one for an internal error).
"""

from __future__ import annotations

from lrc.sysmem import quiet_blas

quiet_blas()  # before anything imports numpy (lrc.sysmem)

import json  # noqa: E402
import time
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lrc.errors import LrcError
from lrc.graph.passes.int8 import forms_help
from lrc.methods import method_help
from lrc.sysmem import prefer_mmap

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Low-rank compression of transformer models at the ONNX graph level.")
console = Console()
err = Console(stderr=True)

RankOpt = typer.Option(None, "--rank", help="Rank of every factorised matrix, or 'full'.")
EnergyOpt = typer.Option(None, "--energy", help="Keep this fraction of spectral energy (0-1].")
RatioOpt = typer.Option(None, "--ratio", help="Fraction of each matrix's parameters kept (0-1].")
IncludeOpt = typer.Option(None, "--include", help="Roles/groups/name globs to factorise "
                          "(comma-separated or repeated), e.g. ffn or '*q_proj*'.")
ExcludeOpt = typer.Option(None, "--exclude", help="Roles/groups/name globs to leave dense.")
PolicyOpt = typer.Option(None, "--policy", help="YAML/JSON policy file (per-role/block overrides).")
AlignOpt = typer.Option(1, "--align", help="Round ratio/energy ranks down to a multiple of this.")


def _split(values: Optional[List[str]]) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


def _tok(path: Optional[Path]) -> Optional[Path]:
    """``--tokenizer``: a tokenizer.json, or a folder holding one (LrcError otherwise)."""
    if path is None:
        return None
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.is_file():
        raise LrcError(f"--tokenizer {str(path)!r}: no tokenizer.json there")
    return f


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- analyse
@app.command()
def analyse(model: Path = typer.Argument(..., help="ONNX file or exported folder"),
            rank: Optional[str] = RankOpt, energy: Optional[float] = EnergyOpt,
            ratio: Optional[float] = RatioOpt, include: Optional[List[str]] = IncludeOpt,
            exclude: Optional[List[str]] = ExcludeOpt, policy: Optional[Path] = PolicyOpt,
            align: int = AlignOpt,
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
            spectrum: bool = typer.Option(False, "--spectrum", help="Include singular values in JSON.")):
    """List every projection with a constant weight: role, shape, energy ranks, savings."""
    from lrc.api import analyse as run

    res = run(model, rank=rank, energy=energy, ratio=ratio, include=_split(include),
              exclude=_split(exclude), policy=policy, align=align, spectrum=spectrum)
    if as_json:
        print(json.dumps(res, indent=1))
        return
    t = Table(title=f"{model}: {res['totals']['count']} projections ({res['setting']})",
              show_lines=False, header_style="bold")
    for col in ("node", "role", "blk", "shape", "params", "r90", "r95", "r99", "break-even",
                "rank", "params after"):
        t.add_column(col, justify="left" if col in ("node", "role", "shape") else "right")
    for r in res["nodes"]:
        shape = "x".join(map(str, r["shape"]))
        if not r.get("eligible"):
            t.add_row(r["name"], r["role"], str(r["block"] if r["block"] is not None else "-"),
                      shape, _fmt_int(r["params"]), "", "", "", "", "skip",
                      f"[dim]{r['reason']}[/dim]")
            continue
        rk = str(r["rank"]) if r["rank"] else "dense"
        t.add_row(r["name"], r["role"] + ("*" if r["role_source"] == "structure" else ""),
                  str(r["block"] if r["block"] is not None else "-"), shape,
                  _fmt_int(r["params"]), str(r["rank90"]), str(r["rank95"]), str(r["rank99"]),
                  str(r["break_even"]), rk, _fmt_int(r["params_after"]))
    console.print(t)
    s = Table(title="totals", header_style="bold")
    for col in ("role", "count", "params", "params after", "kept"):
        s.add_column(col, justify="left" if col == "role" else "right")
    for role, v in res["roles"].items():
        s.add_row(role, str(v["count"]), _fmt_int(v["params"]), _fmt_int(v["params_after"]),
                  f"{v['params_after'] / max(v['params'], 1):.1%}")
    tot = res["totals"]
    s.add_row("[bold]all projections[/bold]", str(tot["count"]), _fmt_int(tot["params"]),
              _fmt_int(tot["params_after"]), f"{tot['params_after'] / max(tot['params'], 1):.1%}")
    console.print(s)
    console.print(f"model parameters (all initializers): {res['model_params']:,}; "
                  f"projections: {tot['params']:,} ({tot['params'] / max(res['model_params'], 1):.1%})"
                  + (f"; {res['ineligible']} not eligible" if res["ineligible"] else "")
                  + ("; * = role read from graph structure" if any(
                      r.get("role_source") == "structure" for r in res["nodes"]) else ""))


# ----------------------------------------------------------------------------- compress
def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("factorising"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.description}"), console=err,
                    transient=True, disable=not err.is_terminal)


@app.command()
def compress(model: Path = typer.Argument(..., help="ONNX file or exported folder"),
             out: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .onnx (or folder)."),
             rank: Optional[str] = RankOpt, energy: Optional[float] = EnergyOpt,
             ratio: Optional[float] = RatioOpt, include: Optional[List[str]] = IncludeOpt,
             exclude: Optional[List[str]] = ExcludeOpt, policy: Optional[Path] = PolicyOpt,
             align: int = AlignOpt,
             allow_larger: bool = typer.Option(False, "--allow-larger",
                                               help="Rewrite even when the factors do not shrink a matrix."),
             group_inputs: Optional[bool] = typer.Option(
                 None, "--group-inputs/--no-group-inputs", help="Factor projections that read "
                 "the same tensor (Q/K/V, gate/up) jointly: one shared A, one B each; higher rank "
                 "at the same parameters. Default: on for data-aware methods (--recipe best)."),
             dense_edges: Optional[bool] = typer.Option(
                 None, "--dense-edges/--no-dense-edges", help="Leave the first and last "
                 "transformer blocks dense (at the same total parameters this beat a uniform ratio "
                 "on both bundled models: benchmarks/allocation.md). With --target-params the cut "
                 "goes to the other blocks; with --ratio the others keep that ratio and the total "
                 "grows. Default: on for data-aware methods on models of 6+ blocks (--recipe best)."),
             recipe: str = typer.Option(
                 "best", "--recipe", help="Defaults for the options above, --update and the tied "
                 "head: best (data-aware methods: grouped, edge blocks dense, the joint update; a "
                 "head tied to the embedding left dense) or plain (none of it). Flags given "
                 "explicitly win."),
             int8: bool = typer.Option(False, "--int8", help="Store the factors as INT8 (per-channel)."),
             int8_form: str = typer.Option("dynamic", "--int8-form", help=forms_help()),
             target_params: Optional[float] = typer.Option(
                 None, "--target-params", help="Keep this fraction of all projection parameters, "
                 "ranks spread uniformly over the selected ones."),
             target_size: Optional[float] = typer.Option(None, "--target-size",
                                                         help="Target weight size in MB."),
             target_speedup: Optional[float] = typer.Option(
                 None, "--target-speedup", help="Keep the projection parameters an ORT-profiled "
                 "Amdahl model says give this speedup (an upper estimate)."),
             ep: str = typer.Option("cpu", "--ep", help="EP for --target-speedup's profile."),
             method: str = typer.Option("auto", "--method", help=method_help()),
             update: Optional[bool] = typer.Option(None, "--update/--no-update", help="svd-llm "
                                         "only (default on with --recipe best): fit each "
                                         "projection to the inputs the already-compressed model "
                                         "produces (two forward passes over the calibration "
                                         "text; see BENCHMARKS.md for what it buys). With "
                                         "--quantize (no --rank): the sequential correction, "
                                         "quantised and corrected stage by stage."),
             calib: Optional[List[Path]] = typer.Option(None, "--calib", help="Your own calibration "
                                                        "text file(s), added to the bundled mix."),
             calib_tokens: int = typer.Option(16384, "--calib-tokens", help="Calibration tokens."),
             tokenizer: Optional[Path] = typer.Option(
                 None, "--tokenizer", help="tokenizer.json (or its folder) for calibration when "
                 "none is beside MODEL."),
             calib_only: bool = typer.Option(False, "--calib-only", help="Calibrate on --calib "
                                             "files only (no bundled mix)."),
             calib_inputs: Optional[List[Path]] = typer.Option(
                 None, "--calib-inputs", help="Calibrate on these .npz files (or folders of "
                 "them) of named input tensors instead of text: any model, e.g. pixel_values "
                 "1x3x224x224 for a vision transformer. One batch per file (numpy.savez); "
                 "repeat the flag for several."),
             quantize_rest: Optional[str] = typer.Option(
                 None, "--quantize-rest", help="Then quantise the projections left dense with "
                 "ONNX Runtime: int8 (quantize_dynamic, per-channel; fastest on the CPU EP) or "
                 "int4 (MatMulNBits, block 32; CPU and CUDA). lrc's factors are left as they are "
                 "(add --int8 to store them as int8 too)."),
             quantize: Optional[str] = typer.Option(
                 None, "--quantize", help="Quantise the weight MatMuls (all, or those --include / "
                 "--exclude select) into ONNX Runtime's own forms: int4 (MatMulNBits 4-bit, "
                 "block-wise), int8-weight (MatMulNBits 8-bit) or int8 (DynamicQuantizeMatMul); "
                 "per-node overrides after a comma: int4,head=int8-weight. Without "
                 "--rank/--ratio/--energy no low rank is applied."),
             block_size: int = typer.Option(32, "--block-size", help="MatMulNBits block size "
                                            "(a power of two >= 16)."),
             accuracy_level: int = typer.Option(
                 4, "--accuracy-level", help="MatMulNBits accuracy_level: 4 = int8 compute "
                 "(fast CPU path), 0 = float compute."),
             correct_rank: str = typer.Option(
                 "0", "--correct-rank", help="Rank of the whitened low-rank correction of the "
                 "quantisation error (0: none); Q/K/V and gate/up share one. Per-node overrides "
                 "after a comma: 32,head=128,ffn.down=64 (roles, groups or name globs). 'auto': "
                 "ranks in whole blocks where the whitened error spectrum gains most per byte, "
                 "under --correct-budget (so far worse than uniform: BENCHMARKS.md)."),
             correct_budget: Optional[float] = typer.Option(
                 None, "--correct-budget", help="MB the correction may add with --correct-rank "
                 "auto (default: what a uniform rank 32 costs)."),
             correct_form: str = typer.Option(
                 "concat", "--correct-form", help="concat: the correction rides inside each "
                 "MatMulNBits (fast); add: a float branch added to its output (reference)."),
             smooth: float = typer.Option(
                 0.0, "--smooth", help="With --quantize: SmoothQuant's alpha (e.g. 0.5): move "
                 "activation outliers into the weights, folded into the norms / up projections "
                 "(no node added). Helps int8 (per-tensor activations); 0 = off."),
             embedding: str = typer.Option(
                 "int8", "--embedding", help="With --quantize: store large embedding tables as "
                 "int8 or int4 (GatherBlockQuantized, rows in blocks), or keep them float."),
             target_runtime: str = typer.Option(
                 "ort", "--target-runtime", help="The runtime OUT is for: ort (ONNX Runtime's "
                 "own quantised ops), openvino (standard DequantizeLinear, block-wise int4/int8 "
                 "at opset 21), tract or any (standard ONNX every runtime lrc knows runs: "
                 "per-column int8 weights, MatMulInteger; no 4-bit). What the target cannot run "
                 "is refused; OUT is loaded on it when it is installed."),
             external_data: bool = typer.Option(False, "--external-data",
                                                help="Write weights to OUT.data (automatic above 2 GB)."),
             force: bool = typer.Option(False, "--force", help="Overwrite OUT."),
             check: bool = typer.Option(True, "--check/--no-check",
                                        help="Run the onnx checker and an ORT session on the output."),
             as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Rewrite projections as thin low-rank MatMul pairs and/or quantise them (+ correction).

    Low rank: a truncated (whitened) SVD per projection. --quantize: ONNX Runtime's own
    quantised forms, with a whitened low-rank correction of the quantisation error."""
    from lrc import methods
    from lrc.pipeline import CompressConfig, compress_path
    from lrc.graph.passes.int8 import FORMS

    config = CompressConfig(rank=rank, energy=energy, ratio=ratio, include=_split(include),
                            exclude=_split(exclude), policy=policy, align=align,
                            allow_larger=allow_larger, group_inputs=group_inputs,
                            dense_edges=dense_edges, recipe=recipe)
    config.build_policy()  # validate options before any work
    methods.check(method)
    if calib_tokens <= 0:
        raise LrcError("--calib-tokens must be positive")
    if calib_only and not calib:
        raise LrcError("--calib-only needs at least one --calib FILE")
    for f in calib or []:
        if not f.is_file():
            raise LrcError(f"calibration file {str(f)!r} not found")
    config.target_params, config.target_size_mb = target_params, target_size
    config.target_speedup, config.ep = target_speedup, ep
    methods.check(method, update=bool(update))
    config.method, config.update = method, update
    config.calib, config.calib_tokens = list(calib or []), calib_tokens
    config.calib_default = not calib_only
    if calib_inputs and (calib or tokenizer):
        raise LrcError("--calib-inputs replaces the calibration text: not with --calib or "
                       "--tokenizer")
    config.tokenizer = _tok(tokenizer)
    config.calib_inputs = list(calib_inputs or []) or None
    if int8_form not in FORMS:
        raise LrcError(f"--int8-form must be {' or '.join(FORMS)}, got {int8_form!r}")
    if quantize_rest not in (None, "int8", "int4"):
        raise LrcError(f"--quantize-rest must be int8 or int4, got {quantize_rest!r}")
    config.int8 = int8_form if int8 else False
    config.quantize, config.block_size, config.accuracy_level = quantize, block_size, accuracy_level
    config.correct_rank, config.correct_form = correct_rank, correct_form
    config.correct_budget = correct_budget
    config.embedding, config.smooth = embedding, smooth
    config.target_runtime = target_runtime
    if quantize_rest and target_runtime != "ort":
        raise LrcError(f"--quantize-rest writes ONNX Runtime's own ops: not for "
                       f"--target-runtime {target_runtime} (use --quantize int8-weight or int8)")
    if quantize and (quantize_rest or int8):
        raise LrcError("--quantize quantises every weight MatMul, lrc's factors included: "
                       f"drop {'--quantize-rest' if quantize_rest else '--int8'}")
    config.quant_spec()  # validate before any work
    with _progress_bar() as bar:
        report, summary_path = compress_path(model, out, config, external_data=external_data,
                                             force=force, check=check,
                                             quantize_rest=quantize_rest, **_progress(bar))
    if as_json:
        print(json.dumps(report, indent=1))
        return
    _print_compress(report, summary_path)
    if quantize_rest:
        console.print(f"quantize-rest: {report['quantize_rest']['summary']}")


def _progress(bar) -> dict:
    """``progress`` and ``calib_progress`` callbacks drawing on ``bar``."""
    task = bar.add_task("", total=None)

    def progress(done, total, name):
        bar.update(task, completed=done, total=total, description=name[-48:])

    calib_task = None

    def calib_progress(done, total=None):
        nonlocal calib_task
        if calib_task is None:
            calib_task = bar.add_task("calibrating", total=total)
        bar.update(calib_task, completed=done, total=total)

    return {"progress": progress, "calib_progress": calib_progress}


def _print_compress(report: dict, summary_path: Path) -> None:
    reports = report.get("models", {"": report})
    for name, r in reports.items():
        if r.get("rewritten"):
            t = Table(title=f"rewritten{(' in ' + name) if name else ''}", header_style="bold")
            for col in ("node", "role", "blk", "shape", "rank", "energy", "rel err", "params"):
                t.add_column(col, justify="left" if col in ("node", "role", "shape") else "right")
            for x in r["rewritten"]:
                t.add_row(x["name"], x["role"], str(x["block"] if x["block"] is not None else "-"),
                          "x".join(map(str, x["shape"])), str(x["rank"]), f"{x['energy']:.3f}",
                          f"{x['rel_error']:.3f}",
                          f"{x['params_before']:,} -> {x['params_after']:,}")
            console.print(t)
        if r.get("skipped"):
            t = Table(title="left dense", header_style="bold")
            for col in ("node", "role", "shape", "reason"):
                t.add_column(col)
            for x in r["skipped"]:
                t.add_row(x["name"], x["role"], "x".join(map(str, x["shape"])), x["reason"])
            console.print(t)
        for note in r.get("notes", []):
            console.print(f"[yellow]note:[/yellow] {note}")
        if r.get("int8"):
            console.print(f"int8: {r['int8'].get('summary', '')}")
        if r.get("quantize"):
            _print_quantized(r["quantize"])
        if r.get("rewritten") or r.get("skipped") or r.get("quantize"):
            if r.get("method_note"):
                console.print(f"method: {r['method_note']}")
            applied = (r.get("recipe") or {}).get("applied")
            if applied:
                console.print("recipe best: " + "; ".join(
                    ("grouped inputs" if k == "group_inputs" else "joint update" if k == "update"
                     else str(v)) for k, v in applied.items()) + " (--recipe plain for none)")
            console.print(f"[bold]{r['summary']}[/bold]")
        else:
            console.print("nothing eligible: no MatMul/Gemm with a constant 2-D weight; "
                          "the output is a copy of the input")
        if isinstance(r.get("checks"), dict):
            console.print("checks: " + ", ".join(f"{k} {v}" for k, v in r["checks"].items()))
        if "seconds" in r:
            console.print(f"time: {r['seconds']['total']} s; file {_mb(r['size_before'])} -> "
                          f"{_mb(r['size_after'])}; wrote {r['output']}")
    console.print(f"summary: {summary_path}")


def _print_quantized(q: dict) -> None:
    """Per role: how many nodes, rank, whitened error before -> after (RMS over the nodes)."""
    by_role: dict = {}
    for n in q["nodes"]:
        by_role.setdefault(n["role"], []).append(n)
    t = Table(title=f"quantised: {q['spec']['describe']}", header_style="bold")
    for col in ("role", "nodes", "rank", "form", "werr before", "werr after", "MB"):
        t.add_column(col, justify="left" if col in ("role", "form") else "right")

    def rms(ns, key):
        vals = [n[key] for n in ns if n.get(key) is not None]
        return f"{(sum(v * v for v in vals) / len(vals)) ** 0.5:.4f}" if vals else "-"

    for role, ns in by_role.items():
        t.add_row(role, str(len(ns)), ",".join(sorted({str(n["rank"]) for n in ns})),
                  ",".join(sorted({n["form"] or "-" for n in ns})), rms(ns, "werr_before"),
                  rms(ns, "werr_after"),
                  f"{sum(n['weight_bytes_before'] for n in ns) / 1e6:.1f} -> "
                  f"{sum(n['weight_bytes_after'] for n in ns) / 1e6:.1f}")
    console.print(t)
    for e in q.get("embeddings", []):
        console.print(f"embedding {e['table']} {e['shape'][0]}x{e['shape'][1]}: int{e['bits']} rows "
                      f"(GatherBlockQuantized), {e['bytes_before'] / 1e6:.1f} -> "
                      f"{e['bytes_after'] / 1e6:.1f} MB")
    if q.get("skipped"):
        console.print(f"left float: {len(q['skipped'])} ("
                      + "; ".join(sorted({s['reason'] for s in q['skipped']})) + ")")


# ----------------------------------------------------------------------------- verify
@app.command()
def verify(orig: Path = typer.Argument(..., help="Original ONNX file or folder"),
           new: Path = typer.Argument(..., help="Rewritten ONNX file or folder"),
           inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz of real inputs."),
           dim: Optional[List[str]] = typer.Option(None, "--dim", help="Symbolic dim, e.g. sequence_length=64."),
           seed: int = typer.Option(0, "--seed"),
           rtol: Optional[float] = typer.Option(None, "--rtol", help="Exit 1 if any output's "
                                                "relative error exceeds this."),
           runtime: str = typer.Option("ort", "--runtime", help="Run NEW on this runtime (ort, "
                                       "openvino, tract); ORIG always runs on ONNX Runtime."),
           precision: str = typer.Option("f32", "--precision", help="NEW's runtime pinned to "
                                         "this: f32 (default); openvino also bf16/f16."),
           as_json: bool = typer.Option(False, "--json")):
    """Check NEW (onnx checker, shape inference, ORT or --runtime) and compare its outputs with
    ORIG's on ONNX Runtime, on the same inputs."""
    from lrc.measure.verify import verify as run

    dims = {}
    for d in _split(dim):
        k, _, v = d.partition("=")
        try:
            dims[k] = int(v)
        except ValueError:
            raise LrcError(f"--dim {d!r}: expected NAME=INTEGER")
    res = run(orig, new, inputs=inputs, dims=dims or None, seed=seed, runtime=runtime,
              precision=precision)
    if as_json:
        print(json.dumps(res, indent=1))
    else:
        console.print("structure: " + ", ".join(f"{k} {v}" for k, v in res["structure"].items()))
        if res.get("runtimes"):
            console.print(f"runtimes: ORIG on {res['runtimes']['orig']}, NEW on {res['runtimes']['new']}")
        console.print(f"inputs: {res['inputs']}")
        t = Table(header_style="bold")
        for col in ("output", "max abs", "mean abs", "rel err", "cosine"):
            t.add_column(col, justify="left" if col == "output" else "right")
        for name, v in res["outputs"].items():
            if "rel" in v:
                t.add_row(name, f"{v['max_abs']:.3g}", f"{v['mean_abs']:.3g}", f"{v['rel']:.3g}",
                          f"{v['cosine']:.6f}")
            else:
                t.add_row(name, "[red]" + ("missing in NEW" if v.get("missing_in_new")
                                           else f"shape {v.get('shape_mismatch')}") + "[/red]",
                          "", "", "")
        console.print(t)
    bad = any("rel" not in v for v in res["outputs"].values())
    if bad or (rtol is not None and (res["worst_rel"] or 0) > rtol):
        err.print(f"lrc: outputs differ beyond --rtol {rtol}" if not bad else
                  "lrc: some outputs are missing or have a different shape")
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- export
@app.command()
def export(source: str = typer.Argument(..., help="HF model folder, .gguf file, or alias "
                                        "smollm2-135m / minilm-l6"),
           out: Path = typer.Option(..., "-o", "--output", help="Output folder."),
           task: Optional[str] = typer.Option(None, "--task", help="text-generation-with-past, "
                                              "text-generation, feature-extraction, ... (from config if not given)"),
           opset: Optional[int] = typer.Option(None, "--opset"),
           dtype: str = typer.Option("float32", "--dtype", help="float32, or float16 (ONNX "
                                     "Runtime's converter after the export; inputs and outputs "
                                     "stay float32)."),
           force: bool = typer.Option(False, "--force", help="Overwrite a non-empty OUT.")):
    """Export a PyTorch / Hugging Face / GGUF model to an ONNX folder (needs lrc[export])."""
    if dtype not in ("float32", "float16", "fp32", "fp16"):
        raise LrcError(f"--dtype must be float32 or float16, got {dtype!r}")
    try:
        from lrc.exporters import export as run
    except ImportError as e:
        raise LrcError(f"exporting needs the export extra ({e.name} missing): pip install 'lrc[export]'")
    res = run(source, out, task=task, opset=opset, force=force)
    from lrc.graph.model import file_size

    if dtype in ("float16", "fp16"):
        from lrc.quantize import to_float16

        t0 = time.perf_counter()
        to_float16([f for f in res.files if str(f).endswith(".onnx")])
        console.print(f"converted to float16 (ONNX Runtime's converter, float32 inputs and "
                      f"outputs kept) in {time.perf_counter() - t0:.1f} s")

    console.print(f"exported {source} ({res.task}) with {res.exporter} in {res.seconds:.1f} s -> "
                  f"{res.out_dir} ({_mb(sum(file_size(f) for f in res.files))})")
    if getattr(res, "fallback_reason", None):
        console.print(f"[yellow]note:[/yellow] {res.fallback_reason}")
    if getattr(res, "tokenizer", None):
        console.print(f"tokenizer: {res.tokenizer}")
    for name, rec in (getattr(res, "tied", None) or {}).items():
        console.print(f"tied embedding stored once in {name}: head copy dropped "
                      f"({_mb(rec['bytes_saved'])} saved)")


# ----------------------------------------------------------------------------- generate
@app.command()
def generate(model: Path = typer.Argument(..., help="Exported text-generation folder"),
             prompt: str = typer.Argument(...),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
             sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy."),
             temperature: float = typer.Option(1.0, "--temperature"),
             top_k: int = typer.Option(0, "--top-k"),
             seed: int = typer.Option(0, "--seed"),
             chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template."),
             compare: Optional[Path] = typer.Option(None, "--compare", help="Second folder to run side by side."),
             tokenizer: Optional[Path] = typer.Option(
                 None, "--tokenizer", help="tokenizer.json (or its folder) when none is beside MODEL."),
             threads: Optional[int] = typer.Option(None, "--threads")):
    """Generate text with ONNX Runtime and the KV cache (no torch), optionally side by side."""
    from lrc import generate as G

    kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
              top_k=top_k, seed=seed, chat=chat, threads=threads, tokenizer=_tok(tokenizer))
    if max_new_tokens <= 0:
        raise LrcError("--max-new-tokens must be positive")
    results = ([(str(model), G.generate(model, prompt, **kw))] if compare is None else
               list(zip((str(model), str(compare)), G.generate_compare(model, compare, prompt, **kw))))
    t = Table(header_style="bold", show_lines=True)
    t.add_column("model")
    t.add_column("continuation")
    t.add_column("tokens/s", justify="right")
    for name, r in results:
        t.add_row(name, prompt + "[bold]" + r.text.replace("[", "\\[") + "[/bold]",
                  f"{r.tokens_per_s:.1f}")
    console.print(t)
    if compare is not None:
        a, b = results[0][1], results[1][1]
        same = 0
        for x, y in zip(a.new_token_ids, b.new_token_ids):
            if x != y:
                break
            same += 1
        console.print(f"first {same} of {len(a.new_token_ids)} generated tokens identical")


# ----------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(orig: Path = typer.Argument(..., help="Original model (.onnx or folder)"),
          new: List[Path] = typer.Argument(..., help="Compressed model(s): one or several"),
          text: Optional[str] = typer.Option(None, "--text", help="A text file of your own, or a "
                                             "bundled text name (news, wiki, forum, docs, code, lee)."),
          ood: str = typer.Option("docs", "--ood", help="Out-of-domain text (bundled name or file)."),
          context: int = typer.Option(256, "--context", help="Window length (tokens)."),
          max_tokens: int = typer.Option(4096, "--max-tokens"),
          layers: bool = typer.Option(False, "--layers", help="Per-layer drift of every rewritten node."),
          tokenizer: Optional[Path] = typer.Option(
              None, "--tokenizer", help="tokenizer.json (or its folder) when none is beside ORIG."),
          inputs: Optional[List[Path]] = typer.Option(
              None, "--inputs", help="Compare outputs on these .npz files (or folders) of named "
              "input tensors instead of text: cosine, relative error, top-1 of logits / classes. "
              "For any model, text or not. Repeat the flag for several."),
          threads: Optional[int] = typer.Option(None, "--threads"),
          out_json: Optional[Path] = typer.Option(None, "--save", help="Also write the result JSON here."),
          as_json: bool = typer.Option(False, "--json")):
    """Quality of NEW against ORIG: perplexity, KL, top-1, cosine; Pearson for encoders;
    output agreement on your own input files (--inputs) for any model.

    Several NEW models are compared in one call: the original's side (its logits on every
    window, or its embeddings) is computed once, and the table has one column per model.

    JSON (--save / --json): with one NEW, what ``lrc.measure.quality.evaluate`` returns
    (unchanged: ``{"kind", "in_domain", "out_of_domain"}``). With several, what
    ``evaluate_many`` returns: ``{"schema": "lrc.eval/1", "kind", "orig": path, "new": list of
    paths, "results": list of single-model results (the shape above), in NEW's order}``; with
    --layers each result gets its own ``layers``. ``lrc report`` reads both shapes.
    """
    from lrc.measure import quality as E
    from lrc.measure.drift import layer_drift
    from lrc.present.quality import format_table, short_names

    def _text(t):
        if t is None:
            return None
        p = Path(t)
        if p.is_file():
            return p.read_text(encoding="utf-8", errors="replace")
        from lrc.data import list_texts

        if t not in list_texts():
            raise LrcError(f"--text {t!r}: no such file and not a bundled text "
                           f"({', '.join(list_texts())})")
        return t

    if inputs:
        from lrc.runtime.feeds import graph_input_specs, load_inputs

        if text is not None or tokenizer is not None:
            raise LrcError("--inputs replaces the texts: not with --text or --tokenizer")
        batches = load_inputs(inputs, graph_input_specs(orig))
        res = E.agreement(orig, new, batches, threads=threads)
        if not _emit_json(res, out_json, as_json):
            console.print(format_table(res))
        return
    if len(new) == 1:
        res = E.evaluate(orig, new[0], text=_text(text), ood=_text(ood), context=context,
                         max_tokens=max_tokens, threads=threads, tokenizer=_tok(tokenizer))
        results = [res]
    else:
        res = E.evaluate_many(orig, new, text=_text(text), ood=_text(ood), context=context,
                              max_tokens=max_tokens, threads=threads, tokenizer=_tok(tokenizer))
        results = res["results"]
    if layers:
        for r, n in zip(results, new):
            r["layers"] = E.jsonable(layer_drift(orig, n, threads=threads))
    if _emit_json(res, out_json, as_json):
        return
    if len(new) == 1:
        console.print(format_table({k: v for k, v in res.items() if k != "layers"}))
    else:
        console.print(format_table(res))
    if layers:
        names = short_names(res["new"]) if len(new) > 1 else [None]
        for r, name in zip(results, names):
            console.print(format_table(r["layers"], title="per-layer drift (worst first)"
                                       + (f": {name}" if name else "")))


def _emit_json(res: dict, out_json: Optional[Path], as_json: bool) -> bool:
    """``--save FILE`` writes the result (atomically); ``--json`` prints it. True: printed."""
    if out_json:
        from lrc.graph.model import write_text_atomic

        write_text_atomic(out_json, json.dumps(res, indent=1))
    if as_json:
        print(json.dumps(res, indent=1))
    return as_json


# ----------------------------------------------------------------------------- bench
@app.command()
def bench(models: List[Path] = typer.Argument(..., help="First = reference; .onnx files or folders"),
          ep: str = typer.Option("cpu", "--ep", help="Comma-separated: cpu, cuda, tensorrt, ..."),
          runtime: str = typer.Option("ort", "--runtime", help="Comma-separated runtimes: ort "
                                      "(on each --ep), openvino, tract."),
          precision: str = typer.Option("f32", "--precision", help="What every runtime is pinned "
                                        "to: f32 (default); openvino also bf16/f16 where the "
                                        "CPU has them."),
          threads: Optional[int] = typer.Option(None, "--threads"),
          batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes."),
          seq: str = typer.Option("128", "--seq", help="Comma-separated sequence lengths."),
          decode_tokens: int = typer.Option(32, "--decode-tokens"),
          runs: int = typer.Option(30, "--runs"), warmup: int = typer.Option(3, "--warmup"),
          baselines: bool = typer.Option(False, "--baselines", help="Add ORT INT8 dynamic, 4-bit "
                                         "MatMulNBits and the ORT-optimized dense graph of the first model."),
          keep_baselines: Optional[Path] = typer.Option(
              None, "--keep-baselines", help="Implies --baselines: build them in this folder "
              "and keep them (int8-dynamic.onnx, int4-matmulnbits.onnx, ort-optimized.onnx, with "
              "the first model's tokenizer and config beside them), so `lrc eval` can measure "
              "the files that were timed; `lrc report` matches them by path."),
          out_json: Optional[Path] = typer.Option(None, "--save", help="Also write the result JSON here."),
          as_json: bool = typer.Option(False, "--json")):
    """Latency/throughput on ONNX Runtime EPs and other runtimes, models interleaved, with
    speedups (to the first model on the same runtime) and bounds."""
    from lrc.measure import bench as B
    from lrc.present.bench import format_tables

    def ints(s, what):
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise LrcError(f"--{what} takes comma-separated integers, got {s!r}")
        if not v or min(v) <= 0:
            raise LrcError(f"--{what} values must be positive")
        return v

    if keep_baselines is not None and keep_baselines.exists() and not keep_baselines.is_dir():
        raise LrcError(f"--keep-baselines {keep_baselines}: not a folder")
    res = B.bench(models, eps=_split([ep]), threads=threads, batch_sizes=ints(batch, "batch"),
                  seq_lens=ints(seq, "seq"), decode_tokens=decode_tokens, warmup=warmup,
                  runs=runs, baselines=baselines or keep_baselines is not None,
                  baselines_dir=keep_baselines, runtimes=_split([runtime]), precision=precision,
                  progress=(lambda msg: err.print(f"[dim]{msg}[/dim]")) if not as_json else None)
    if _emit_json(res, out_json, as_json):
        return
    for t in format_tables(res):
        console.print(t)


# ----------------------------------------------------------------------------- report
@app.command()
def report(results: List[Path] = typer.Argument(..., help="JSON files from bench/eval/compress/analyse"),
           out: Path = typer.Option(Path("report.html"), "-o", "--output"),
           title: str = typer.Option("lrc report", "--title")):
    """One self-contained HTML file with plots and tables from result JSON files.

    Given a bench result (lrc bench --save) and eval results (lrc eval --save, one or several
    models), the models of both are joined by path or name -- the ORT baselines of
    `lrc bench --keep-baselines DIR` included -- and plotted as speed (decode, prefill) and
    file size against quality (perplexity on each text; Pearson for encoders), with the
    Pareto frontier. Compression summaries (lrc.json) add spectra and ranks."""
    from lrc.present.report import is_bench, is_eval, join_bench_eval, write_report

    res, summaries = [], []
    for p in results:
        if not p.is_file():
            raise LrcError(f"{p}: no such file")
        try:
            data = json.loads(p.read_text())
        except ValueError as e:
            raise LrcError(f"{p}: not JSON ({e})")
        if isinstance(data, dict) and ("rewritten" in data or "nodes" in data or "models" in data
                                       and "schema" not in data or "quantize" in data):
            summaries.append(data)
        else:
            res.append(data)
    write_report(res, out, summaries=summaries, title=title)
    benches, evals = [r for r in res if is_bench(r)], [r for r in res if is_eval(r)]
    for b in benches if evals else []:
        j = join_bench_eval(b, evals)
        names = [m["label"] if m["label"] == m["name"] else f"{m['label']} = {m['name']}"
                 for m in j["models"]]
        console.print(f"speed vs quality: {len(names)} models joined ({', '.join(names) or 'none'})")
        if j["unmatched_bench"]:
            console.print(f"[yellow]note:[/yellow] benchmarked without a quality: "
                          f"{', '.join(map(str, j['unmatched_bench']))}")
        if j["unmatched_eval"]:
            console.print(f"[yellow]note:[/yellow] evaluated but not benchmarked: "
                          f"{', '.join(map(str, j['unmatched_eval']))}")
    console.print(f"wrote {out}")


# ----------------------------------------------------------------------------- tune
def _budget(text: str) -> float:
    """'10%' -> 0.10, '0.1' -> 0.1."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise LrcError(f"budget {text!r}: expected a number or a percentage such as 10%")
    if v < 0:
        raise LrcError(f"budget {text!r} must not be negative")
    return v


@app.command()
def tune(model: Path = typer.Argument(..., help="Exported folder (model.onnx + tokenizer.json) "
                                      "or .onnx file with tokenizer.json beside it"),
         out: Optional[Path] = typer.Option(None, "-o", "--output",
                                            help="Where the chosen model goes (default: "
                                                 "MODEL-tuned, a folder for a folder)."),
         max_ppl_increase: Optional[str] = typer.Option(
             None, "--max-ppl-increase", help="Causal LMs: allowed perplexity increase on both "
             "the news and the docs text, e.g. 10% or 0.1 (default 10%)."),
         max_pearson_drop: Optional[float] = typer.Option(
             None, "--max-pearson-drop", help="Encoders: allowed absolute drop of the Lee 2005 "
             "Pearson r (default 0.01)."),
         objective: str = typer.Option("latency", "--objective",
                                       help="latency: fastest within budget; size: smallest."),
         ep: str = typer.Option("cpu", "--ep", help="Execution provider to time on."),
         threads: int = typer.Option(2, "--threads", help="Intra-op threads (eval and bench)."),
         runs: Optional[int] = typer.Option(None, "--runs", help="Timed rounds per model in the "
                                            "interleaved bench (default 20; 5 with --quick)."),
         calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens", help="SVD-LLM "
                                                    "calibration tokens (default 16384)."),
         quick: bool = typer.Option(False, "--quick", help="3 candidates, 512-token eval, 5 runs."),
         update: bool = typer.Option(True, "--update/--no-update",
                                     help="Low-rank candidates with --group-inputs --update (the "
                                          "measured best; one compression each). --no-update: "
                                          "truncations of one plain SVD-LLM (faster, worse)."),
         tokenizer: Optional[Path] = typer.Option(
             None, "--tokenizer", help="tokenizer.json (or its folder) when none is beside MODEL."),
         keep_workdir: bool = typer.Option(False, "--keep-workdir",
                                           help="Keep the work folder with every candidate."),
         force: bool = typer.Option(False, "--force", help="Overwrite OUT."),
         out_json: Optional[Path] = typer.Option(None, "--save",
                                                 help="Also write the result JSON here."),
         as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Try INT8, 4-bit and low rank (alone and stacked), measure all, keep the best in budget."""
    from lrc.graph.model import resolve_model_path
    from lrc.present.tune import format_tables
    from lrc.tune import OBJECTIVES
    from lrc.tune import tune as run

    if max_ppl_increase is not None and max_pearson_drop is not None:
        raise LrcError("give --max-ppl-increase (causal LMs) or --max-pearson-drop (encoders), "
                       "not both")
    if objective not in OBJECTIVES:
        raise LrcError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if runs is not None and runs < 1:
        raise LrcError("--runs must be positive")
    if calib_tokens is not None and calib_tokens <= 0:
        raise LrcError("--calib-tokens must be positive")
    budget, kind = None, None
    if max_ppl_increase is not None:
        budget, kind = _budget(max_ppl_increase), "causal-lm"
    elif max_pearson_drop is not None:
        if max_pearson_drop < 0:
            raise LrcError("--max-pearson-drop must not be negative")
        budget, kind = max_pearson_drop, "encoder"
    if out is None:
        if not model.exists():
            raise LrcError(f"{model}: no such file or folder")
        src = resolve_model_path(model)
        out = (model.with_name(model.name.rstrip("/") + "-tuned") if model.is_dir()
               else src.with_name(src.stem + "-tuned.onnx"))
    res = run(model, max_quality_loss=budget, budget_kind=kind, objective=objective, ep=ep,
                 threads=threads, out=out, quick=quick, runs=runs, calib_tokens=calib_tokens,
                 force=force, keep_workdir=keep_workdir, update=update,
                 tokenizer=_tok(tokenizer),
                 progress=None if as_json else (lambda msg: err.print(f"[dim]{msg}[/dim]")))
    if not _emit_json(res, out_json, as_json):
        for t in format_tables(res):
            console.print(t)
        console.print(f"[bold]{res['reason']}[/bold]")
        if res["output"]:
            console.print(f"wrote {res['output']} ({res['chosen']}); "
                          f"summary: {res['summary_file']}")
    if res["chosen"] is None:
        err.print(f"lrc: nothing written: {res['reason']}", highlight=False, markup=False)
        raise typer.Exit(1)


def main() -> None:
    """Entry point: user errors become one line on stderr."""
    debug = os.environ.get("LRC_DEBUG")
    prefer_mmap()  # large blocks are returned to the system when freed (lrc.sysmem)
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except LrcError as e:
        err.print(f"lrc: error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("lrc: aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("lrc: interrupted")
        sys.exit(130)
    except Exception as e:  # click usage errors and internal errors
        try:  # typer >= 0.29 vendors click
            from typer._click.exceptions import ClickException
        except ImportError:  # pragma: no cover
            from click.exceptions import ClickException

        if isinstance(e, ClickException):
            err.print(f"lrc: error: {e.format_message()}", highlight=False, markup=False,
                      soft_wrap=True)
            sys.exit(e.exit_code)
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err.print(f"lrc: internal error: {type(e).__name__}: {msg} (LRC_DEBUG=1 shows the "
                  "traceback)", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
