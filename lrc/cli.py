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

from lrc.errors import LrcError, render, set_option_style
from lrc.sysmem import prefer_mmap

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Low-rank compression of transformer models at the ONNX graph level.")


@app.callback()
def _options_as_flags(ctx: typer.Context) -> None:
    """While a command runs, messages name options as its flags (``--calib-tokens``); the
    Python style comes back when it ends."""
    set_option_style(_flag)
    ctx.call_on_close(lambda: set_option_style(None))
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
    from lrc.modelref import tokenizer_file

    return None if path is None else tokenizer_file(path)


def _flag(name: str, value: str | None) -> str:
    """A config field as the command line writes it (errors.set_option_style): its flag from
    :data:`lrc.config.FLAGS`, the one table."""
    from lrc.config import cli_style

    return cli_style(name, value)


def _runtimes() -> list[str]:
    """The runtimes lrc knows (lrc.runtime.runtimes.RUNTIMES), for help lines."""
    from lrc.runtime.runtimes import runtime_names

    return runtime_names()


def _precisions() -> str:
    from lrc.runtime.runtimes import RUNTIMES

    extra = [f"{r.name} also {'/'.join(p for p in r.precisions if p != 'f32')}"
             for r in RUNTIMES if len(r.precisions) > 1]
    return "f32 (default)" + ("; " + "; ".join(extra) if extra else "")


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


def _options(fn):
    """``fn`` (``(model, as_json, **options)``) with one typer option per config field
    (:func:`lrc.config.leaves`): the command line is generated from the config, so a new
    option is a field there. Flags come from :data:`lrc.config.FLAGS`, the one table."""
    import inspect

    from lrc import config as C

    kinds = {"int": int, "float": float, "str": str, "path": Path}
    params = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=typer.Argument(..., help="ONNX file or exported folder"),
                                annotation=Path)]
    for name, _, f in C.leaves():
        md = f.metadata
        if not md or not md.get("cli", True):
            continue
        flag, default = C.FLAGS[name], C.default_of(f)
        decls = [flag] + ([md["short"]] if md.get("short") else [])
        helptext = md["help"]
        if md.get("choices") and md["kind"] != "bool" and "one of" not in helptext:
            helptext += f" One of: {', '.join(md['choices']())}."
        if md["kind"] == "bool":
            if md.get("negatable"):
                decls = [f"{flag}/--no-{flag[2:]}"]
                ann = bool if default is not None else Optional[bool]
            else:
                ann = bool
        else:
            typ = kinds[md["kind"]]
            if md.get("multiple"):
                ann, default = Optional[List[typ]], None
            else:
                ann = Optional[typ] if default is None else typ
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
            default=typer.Option(default, *decls, help=helptext, metavar=md.get("metavar"))))
    params.append(inspect.Parameter(
        "as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--json", help="Print the summary as JSON.")))
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


@app.command()
@_options
def compress(model: Path, as_json: bool = False, **options):
    """Rewrite projections as thin low-rank MatMul pairs and/or quantise them (+ correction).

    Low rank: a truncated (whitened) SVD per projection. --quantize: the target runtime's
    quantised forms, with a whitened low-rank correction of the quantisation error. Every option
    is also a keyword of lrc.compress (lrc.config.CompressConfig)."""
    from lrc.config import CompressConfig
    from lrc.pipeline import compress_path, dry_run

    config = CompressConfig.of(**options).validate()  # every check before any work
    if config.output.dry_run:
        res = dry_run(model, config)
        if as_json:
            print(json.dumps(res, indent=1))
            return
        _print_plan(res)
        return
    with _progress_bar() as bar:
        report, summary_path = compress_path(model, config.output.out, config, **_progress(bar))
    if as_json:
        print(json.dumps(report, indent=1))
        return
    _print_compress(report, summary_path)
    if report.get("quantize_rest"):
        console.print(f"quantize-rest: {report['quantize_rest']['summary']}")


def _print_plan(res: dict) -> None:
    """``lrc compress --dry-run``: the model, method, modifiers and what each projection gets."""
    m = res["model"]
    console.print(f"model: {m['file'] or 'in memory'} ({m['format']}); tokenizer: "
                  f"{m['tokenizer'] or 'none'}")
    console.print(f"method: {res['method_note']}")
    applied = res["recipe"]["applied"]
    if applied:
        console.print(f"recipe {res['recipe']['name']}: " + "; ".join(
            str(v) if not isinstance(v, bool) else k for k, v in applied.items()))
    console.print("modifiers: " + ", ".join(f"{x['name']} (statistics: {x['statistics']})"
                                            for x in res["modifiers"]))
    if res.get("quantize"):
        console.print(f"quantize: {res['quantize']}")
    if res.get("plan"):
        t = Table(title="planned", header_style="bold")
        for col in ("node", "role", "blk", "shape", "rank"):
            t.add_column(col, justify="left" if col in ("node", "role", "shape") else "right")
        for x in res["plan"]:
            t.add_row(x["name"], x["role"], str(x["block"] if x["block"] is not None else "-"),
                      "x".join(map(str, x["shape"])), str(x["rank"]))
        console.print(t)
    console.print(f"[bold]{res['summary']}[/bold]")


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
           runtime: str = typer.Option("ort", "--runtime", help="Run NEW on this runtime ("
                                       f"{', '.join(_runtimes())}); ORIG always runs on ONNX "
                                       "Runtime."),
           precision: str = typer.Option("f32", "--precision", help="NEW's runtime pinned to "
                                         f"this: {_precisions()}."),
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
        from lrc.measure.metrics import TENSOR_METRICS

        t = Table(header_style="bold")
        t.add_column("output")
        for m in TENSOR_METRICS.values():
            t.add_column(m.label, justify="right")
        for name, v in res["outputs"].items():
            if "rel_error" in v:
                t.add_row(name, *(f"{v[k]:.6f}" if k == "cosine" else f"{v[k]:.3g}"
                                  for k in TENSOR_METRICS))
            else:
                t.add_row(name, "[red]" + ("missing in NEW" if v.get("missing_in_new")
                                           else f"shape {v.get('shape_mismatch')}") + "[/red]",
                          "", "", "")
        console.print(t)
    bad = any("rel_error" not in v for v in res["outputs"].values())
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
           dtype: str = typer.Option("float32", "--dtype", help="float32; float16 (the "
                                     "builder's fp16 for a decoder LM, else ONNX Runtime's "
                                     "converter after the export, inputs and outputs kept "
                                     "float32); or int4 for a decoder LM: the builder's own "
                                     "round-to-nearest int4, a baseline to compare lrc against."),
           exporter: str = typer.Option("auto", "--exporter", help="auto: ONNX Runtime GenAI's "
                                        "model builder for a decoder LM with its KV cache (the "
                                        "fused graph ORT GenAI deploys: GroupQueryAttention, "
                                        "skip-norms, packed QKV; checked against PyTorch), "
                                        "optimum for the rest (torch.onnx dynamo if optimum "
                                        "fails); or optimum, torch-dynamo, builder."),
           force: bool = typer.Option(False, "--force", help="Overwrite a non-empty OUT.")):
    """Export a PyTorch / Hugging Face / GGUF model to an ONNX folder (needs lrc[export])."""
    if dtype not in ("float32", "float16", "fp32", "fp16", "int4"):
        raise LrcError(f"--dtype must be float32, float16 or int4, got {dtype!r}")
    try:
        from lrc.exporters import export as run
        from lrc.measure.exported import agreement
    except ImportError as e:
        raise LrcError(f"exporting needs the export extra ({e.name} missing): pip install 'lrc[export]'")
    from lrc.quantize import to_float16

    res = run(source, out, task=task, opset=opset, force=force, exporter=exporter, dtype=dtype,
              check=agreement, convert=to_float16)
    from lrc.graph.model import file_size

    if res.converted:
        console.print(f"converted to float16 (ONNX Runtime's converter, float32 inputs and "
                      f"outputs kept) in {res.converted['seconds']:.1f} s")

    by = res.exporter
    if res.builder:
        by = f"ONNX Runtime GenAI's model builder {res.builder['builder']} ({res.builder['precision']})"
    console.print(f"exported {source} ({res.task}) with {by} in {res.seconds:.1f} s -> "
                  f"{res.out_dir} ({_mb(sum(file_size(f) for f in res.files))})")
    if (res.builder or {}).get("precision") == "fp16":
        console.print("note: the builder's float16 graph: lrc's commands run it on the CPU, ONNX "
                      "Runtime GenAI's CPU EP fails it at the second decode step (an ORT "
                      "buffer-reuse bug GenAI has no option against); float16 is for GPUs")
    agree = (res.builder or {}).get("agreement")
    if agree:
        console.print(f"checked against PyTorch on {agree['tokens']} tokens: logits relative "
                      f"error {agree['rel_error']:.2g}, top-1 agreement {agree['top1']:.0%}"
                      + ("" if agree["tolerance"] else " (int4: measured, not judged)"))
    if getattr(res, "fallback_reason", None):
        from rich.markup import escape

        console.print(f"[yellow]note:[/yellow] {escape(render(res.fallback_reason))}")
    elif res.exporter == "optimum" and res.task == "text-generation-with-past":
        console.print("note: optimum's unfused graph; the fused one ONNX Runtime GenAI deploys "
                      "(GroupQueryAttention, skip-norms, packed QKV) is --exporter builder")
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
             threads: Optional[int] = typer.Option(None, "--threads"),
             genai: bool = typer.Option(
                 False, "--genai", help="Also run each model greedily in ONNX Runtime GenAI from "
                 "the same prompt ids and say whether its tokens are ONNX Runtime's.")):
    """Generate text with ONNX Runtime and the KV cache (no torch), optionally side by side."""
    from lrc import generate as G

    kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
              top_k=top_k, seed=seed, chat=chat, threads=threads, tokenizer=_tok(tokenizer))
    if max_new_tokens <= 0:
        raise LrcError("--max-new-tokens must be positive")
    if genai and sample:
        raise LrcError("--genai compares greedy tokens: drop --sample")
    results = ([(str(model), G.generate(model, prompt, **kw))] if compare is None else
               list(zip((str(model), str(compare)), G.generate_compare(model, compare, prompt, **kw))))
    agree = []
    if genai:
        for name, r in list(results):
            g = G.genai_generate(name, r.prompt_ids, max_new_tokens=max_new_tokens,
                                 tokenizer=kw["tokenizer"])
            results.append((f"{name} (ORT GenAI)", g))
            ids_a, ids_b = G.without_eos(name, r.new_token_ids), G.without_eos(name, g.new_token_ids)
            same = G.GenerationComparison(r, g).matching_tokens
            agree.append(f"{name}: ORT GenAI's greedy tokens "
                         + ("identical to ONNX Runtime's" if ids_a == ids_b
                            else f"differ from ONNX Runtime's after {same}")
                         + f" ({len(ids_b)} tokens)")
    t = Table(header_style="bold", show_lines=True)
    t.add_column("model")
    t.add_column("continuation")
    t.add_column("tokens/s", justify="right")
    for name, r in results:
        t.add_row(name, prompt + "[bold]" + r.text.replace("[", "\\[") + "[/bold]",
                  f"{r.tokens_per_s:.1f}")
    console.print(t)
    for line in agree:
        console.print(line)
    if genai:
        results = results[:len(results) // 2]
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
          runtime: str = typer.Option("ort", "--runtime", help="Comma-separated runtimes: "
                                      f"{', '.join(_runtimes())} (ort on each --ep)."),
          precision: str = typer.Option("f32", "--precision", help="What every runtime is pinned "
                                        f"to: {_precisions()}, where the CPU has them."),
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
    Pareto frontier. Compression summaries (lrc.json) add spectra and ranks; peers' points
    (benchmarks/peers.py --json: NNCF, llama.cpp on the same weights and texts) are drawn
    beside an LM's models as perplexity / dense against bytes."""
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
    from lrc.modelref import pick_file
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
        src = pick_file(model)
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
        err.print(f"lrc: error: {e.render(_flag)}", highlight=False, markup=False,
                  soft_wrap=True)
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
