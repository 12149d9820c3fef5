"""The compress pipeline (``lrc.compress`` is its :func:`compress`): a model reference and a
:class:`~lrc.config.CompressConfig` in, a smaller model and a report out.

:func:`compress_model` runs its phases in order, each handing the next a value:

1. **plan** (:func:`plan`) — the model reference (:mod:`lrc.modelref`, resolved once), the
   method (``auto`` resolved), the recipe filling what the config left unset, the policy, a
   global budget solved into a ratio, and the :class:`~lrc.graph.plan.Plan` (which projection
   gets which rank, what stays dense and why): a :class:`~lrc.modifiers.Run`;
2. **modifiers** — each technique the config asks for (:mod:`lrc.modifiers`: low rank, int8
   factors, smoothing, quantise-and-correct, embeddings) gathers what it needs from the run's
   one calibration and makes its passes;
3. **passes** — every modifier's passes, then onnx-ir's ``RemoveUnusedNodesPass``, run by one
   onnx-ir pass manager (:func:`run_passes`);
4. **report** — each modifier's part, the method, budget, calibration, policy and recipe.

``dry_run`` stops after 1 and reports the plan. :func:`compress_file` is the file-level job
(load, run, stage beside the output, checks: the onnx checker, an ONNX Runtime load and the
target runtime, commit, sizes); :func:`compress_path` adds folders (via
:mod:`lrc.graph.folder`), the summary file and the modifiers that work on written files
(ONNX Runtime's quantisers). ``lrc.compress`` and ``lrc compress`` are thin layers over these.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrc import methods
from lrc.config import DEFAULT_SIZE, RECIPES, CompressConfig, copy_config, relative_size
from lrc.errors import LrcError, opt, render
from lrc.graph import folder
from lrc.graph import model as M
from lrc.graph.passes.lowrank import Progress
from lrc.graph.passes.run import run_passes
from lrc.graph.plan import make_plan, solve_budget
from lrc.graph.policy import make_setting
from lrc.modelref import ModelRef, pick_file
from lrc.modelref import resolve as resolve_model
from lrc.modifiers import Run, modifiers_for

EDGE_MIN_BLOCKS = 6  # fewer blocks: keeping two dense would leave too little to compress


# --------------------------------------------------------------------------------- the recipe


def _apply_recipe(config: CompressConfig, model: ir.Model, method,
                  ref: ModelRef | None = None) -> tuple[CompressConfig, dict]:
    """``config`` with the options left unset (None) filled from its recipe, and what was
    filled. The "best" recipe applies to data-aware low rank (the method resolved for this
    model, before the update); a tied head is left dense under it for every method, unless
    include names the head (or a policy file) asks for it. ``rank`` full (a check of the
    rewrite itself) and a ready factoriser take nothing from the recipe. A bare ``quantize
    int4`` (nothing else of the quantisation recipe given) on a language model with
    calibration text gets ``target_size`` :data:`~lrc.config.DEFAULT_SIZE` ``x`` (resolved
    to MB in :func:`plan`)."""
    from lrc.graph.locate import locate

    c = copy_config(config)
    lr, alg = c.lowrank, c.algorithm
    best = (lr.recipe == "best" and c.lowrank_asked and lr.rank != "full"
            and c.factorizer is None)
    data_aware = best and method.data_aware
    done: dict = {}
    targets = locate(model) if best else []
    explicit = lr.policy is not None
    if lr.group_inputs is None:
        lr.group_inputs = data_aware
        if data_aware:
            done["group_inputs"] = True
    if lr.dense_edges is None:
        blocks = max((t.n_blocks or 0 for t in targets), default=0)
        lr.dense_edges = data_aware and not explicit and blocks >= EDGE_MIN_BLOCKS
        if lr.dense_edges:
            done["dense_edges"] = f"blocks 0 and {blocks - 1} of {blocks} left dense"
    updatable = method.name in (m.update_of for m in methods.METHODS.values())
    if (alg.update is None and lr.recipe == "best" and c.size_allocated and method.data_aware
            and updatable):
        # a size asked of quantize (not the bare int4 recipe's, below): its choices solved stage
        # by stage, measured better on both texts at 88 and 105 MB (BENCHMARKS.md, --tag seq);
        # the bare recipe's 1.2x stays one-shot (on Gemma-3-270M x1.054 -> x1.074 on docs,
        # 1.2x the time: BENCHMARKS.md, --model gemma3 --tag seq)
        alg.update = True
        done["update"] = render(f"{opt('target_size')}'s choices quantised and corrected stage "
                                f"by stage (the sequential correction; turning {opt('update')} "
                                f"off gives the one-shot correction, about 1.7x faster)")
    if alg.update is None:
        alg.update = data_aware and updatable
        if alg.update:
            done["update"] = True
    if lr.tied_head is None:
        asked = explicit or any("head" in str(i) for i in (lr.include or []))
        tied = [t for t in targets if t.role == "head" and t.tied]
        lr.tied_head = "dense" if best and tied and not asked else "factor"
        if lr.tied_head == "dense":
            done["tied_head"] = render(f"{tied[0].name} left dense: its weight is the "
                                       f"embedding's, factors would add bytes ("
                                       f"{opt('include', 'head')} to factorise it)")
    if (lr.recipe == "best" and c.bare_int4 and ref is not None and ref.is_lm
            and method.data_aware):
        c.budget.target_size = f"{DEFAULT_SIZE:g}x"
        done["target_size"] = render(
            f"{DEFAULT_SIZE:g}x the model's int4 form: bits, blocks, correction ranks and the "
            f"head's form chosen by measured effect ({opt('recipe', 'plain')} or "
            f"{opt('correct_rank', '0')} for round-to-nearest codes alone)")
    return c, done


def _resolve_size(run: Run, config: CompressConfig, recipe: dict) -> None:
    """``target-size Nx`` in MB: N times the model in the builder's int4 form
    (:func:`lrc.graph.passes.quant.int4_form_bytes`), set in ``config`` before any check."""
    from lrc.graph.passes.quant import int4_form_bytes

    n = relative_size(config.budget.target_size)
    if n is None:
        return
    base = int4_form_bytes(run.model, config.quant.spec(sized=True), run.select)
    config.budget.target_size = round(n * base / 1e6, 3)
    if "target_size" in recipe:  # the recipe's (a size given as Nx shows in the pass's line)
        recipe["target_size"] += (f": {n:g}x {base / 1e6:.1f} MB (every projection 4-bit in "
                                  f"blocks of 32, an int4 table) = "
                                  f"{config.budget.target_size:.1f} MB")


# --------------------------------------------------------------------------------- plan


def _resolve_method(ref: ModelRef, config: CompressConfig):
    """(Method, note): ``auto`` resolved for this input (the update is applied after the
    recipe, in :func:`plan`)."""
    name = config.algorithm.method
    if name != methods.AUTO:
        methods.get(name)
    if name == methods.AUTO and config.calibration.calib_inputs and config.lowrank.rank != "full":
        name, note = methods.AUTO_BEST, render(f"{methods.AUTO_BEST}: best measured; calibrated "
                                               f"on {opt('calib_inputs')}")
    else:
        name, note = methods.resolve(name, ref, rank=config.lowrank.rank)
    return methods.get(name), note


def plan(model_or_path, config: CompressConfig, *, progress: Progress | None = None,
         calib_progress=None) -> tuple[Run, dict]:
    """The :class:`~lrc.modifiers.Run` of a compression: the model resolved and loaded (weights
    left on disk), the method, the recipe applied, the policy, the budget solved, the plan;
    every check that can fail before the work runs here. Returns ``(run, what the recipe
    filled)``; the run's ``shared["budget"]`` holds the solved budget."""
    config.validate()  # bad options fail before any work
    ref = resolve_model(model_or_path, tokenizer=config.calibration.tokenizer)
    base, method_note = _resolve_method(ref, config)
    model = ref.load()
    config, recipe = _apply_recipe(config, model, base, ref)
    config.check_decode_budget()
    pol = config.lowrank.build()
    method = (methods.get(methods.with_update(base.name)) if config.algorithm.update else base)
    run = Run(ref, model, config, method, method_note, pol, progress=progress,
              calib_progress=calib_progress)
    if config.quant.quantize is not None:
        _check_quantisable(model, ref)
    if config.size_allocated:
        _resolve_size(run, config, recipe)
        _check_size(run, config)
    if not config.lowrank_asked:
        spec = config.quant_spec()
        if spec.any_rank and not method.data_aware and config.algorithm.method == methods.AUTO:
            raise LrcError(f"{opt('correct_rank')} needs calibration text to whiten the "
                           f"correction, and {method_note.split(': ', 1)[-1]}; pass "
                           f"{opt('method', 'svd')} for an unwhitened correction")
        return run, recipe
    if (config.algorithm.method == methods.AUTO and not method.data_aware
            and config.lowrank.rank != "full" and config.factorizer is None and ref.is_lm):
        raise LrcError(render(
            f"{opt('method', 'auto')} found no calibration for this language model "
            f"({method_note.split(': ', 1)[-1]}), and plain SVD destroys language models "
            f"(BENCHMARKS.md: SmolLM2 MLP 0.8, perplexity 5.8e5 against 156 whitened): pass "
            f"{opt('tokenizer')} (the calibration text comes with pip install 'lrc[data]'), "
            f"{opt('calib_inputs')} FILES, or {opt('method', 'svd')} to accept it"))
    run.shared["budget"] = _budget(model, ref, pol, config)
    run.plan = make_plan(model, pol)
    return run, recipe


def _check_quantisable(model: ir.Model, ref: ModelRef) -> None:
    """A model whose weight MatMuls are all quantised already (ONNX Runtime GenAI's int4 build,
    ORT's own quantisers' output) has no float weights to quantise or to correct: one line
    before any work, naming what to give instead."""
    from lrc.graph.passes.quant import quant_targets

    if quant_targets(model)[0]:
        return
    done = {}
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger",
                         "GatherBlockQuantized"):
            done[n.op_type] = done.get(n.op_type, 0) + 1
    if done:
        raise LrcError(f"{ref.label} is quantised already ("
                       + ", ".join(f"{k} x{v}" for k, v in sorted(done.items()))
                       + f"): no float weights to quantise or correct; give the float model "
                       f"{'(the builder' + chr(39) + 's fp32 folder)' if ref.format == 'genai-builder' else ''}"
                       .rstrip() + " instead")


def _check_size(run: Run, config: CompressConfig) -> None:
    """target-size with quantize: one line before any work when even the smallest choice of
    every projection (largest block, no correction) does not fit."""
    from lrc.graph.passes.quant import smallest_bytes

    spec = config.quant_spec()
    fixed, least = smallest_bytes(run.model, spec, run.select)
    want = config.budget.target_size
    if (fixed + least) / 1e6 > want:
        raise LrcError(f"{opt('target_size', f'{want:g}')}: the smallest this model can be with "
                       f"{opt('quantize', config.quant.quantize)} and "
                       f"{opt('embedding', spec.embedding)} is {(fixed + least) / 1e6:.1f}"
                       f" MB ({fixed / 1e6:.1f} MB of it not quantised: norms, "
                       f"embedding tables...); give a larger size"
                       + (f" or {opt('embedding', 'int4')}" if spec.embedding != "int4"
                          else ""))


def _budget(model: ir.Model, ref: ModelRef, pol, config: CompressConfig) -> dict | None:
    """A global budget solved into a uniform ratio (``pol.default`` set to it); None without."""
    b = config.budget
    target_params, speed = b.target_params, None
    if b.target_speedup is not None:
        with ref.as_file() as f:
            speed = speedup_budget(f, b.target_speedup, b.ep)
        target_params = speed["params_fraction"]
    if target_params is None and b.target_size is None:
        return None
    budget = solve_budget(model, pol, target_params, b.target_size)
    if speed:
        budget.update(speed)
    pol.default = make_setting(ratio=budget["ratio"])
    return budget


def speedup_budget(path: Path, speedup: float, ep: str = "cpu") -> dict:
    """Fraction of projection parameters to keep for a target speedup, from a cost model
    measured once with ONNX Runtime: the dense model is profiled at batch 1 x 128 tokens and
    ``f`` is the fraction of kernel time in weight MatMuls; Amdahl's law
    ``S = 1 / ((1 - f) + f·ρ)`` gives ``ρ = (1/S - (1 - f)) / f``. Measured low-rank speedups
    reach 0.9-1.0 of this bound (BENCHMARKS.md), so treat the target as an upper estimate."""
    from lrc.runtime.profile import profile_matmul_fraction
    from lrc.runtime.providers import resolve_ep

    if not speedup > 1:
        raise LrcError(f"{opt('target_speedup')} must be > 1, got {speedup}")
    provider = resolve_ep(ep)
    with tempfile.TemporaryDirectory() as work:
        prof = profile_matmul_fraction(path, provider, None, 1, 128, 0, 5, Path(work))
    f = float(prof["matmul_fraction"][prof["phase"]])  # prefill (decoders) or encoder
    limit = 1 / (1 - f) if f < 1 else float("inf")
    rho = (1 / speedup - (1 - f)) / f if f > 0 else -1
    if rho <= 0:
        raise LrcError(f"{opt('target_speedup', f'{speedup:g}')} is beyond what shrinking the "
                       f"projections can give: they take {f:.0%} of the time, so the limit is "
                       f"{limit:.2f}x")
    return {"target_speedup": speedup, "matmul_time_fraction": round(f, 4),
            "params_fraction": round(rho, 6), "ep": provider,
            "speedup_note": "Amdahl bound from an ORT profile at batch 1 x 128; measured speedups "
                            "reach 0.9-1.0 of it"}


# --------------------------------------------------------------------------------- the pipeline


def compress_model(model_or_path, config: CompressConfig, *, progress: Progress | None = None,
                   calib_progress=None) -> tuple[ir.Model, dict]:
    """Compress a model with the techniques ``config`` asks for. Returns ``(ir.Model, report)``.

    ``model_or_path``: a model reference, a .onnx file or model folder (loaded here;
    calibration runs that file), or an ``ir.Model`` / ``onnx.ModelProto`` (modified in place; a
    data-aware method calibrates on it as it is, with the config's tokenizer or the
    tokenizer.json beside the file ``lrc.model.load`` read it from). ``report``: ``rewritten``
    and ``skipped`` records (every node with a reason), ``notes``, ``totals``, ``summary``,
    ``method``, ``policy``, ``config``..."""
    run, recipe = plan(model_or_path, config, progress=progress, calib_progress=calib_progress)
    config = run.config
    mods = modifiers_for(config)
    run.shared["modifiers"] = mods
    passes = [p for m in mods for p in m.passes(run)]
    run_passes([*passes, RemoveUnusedNodesPass()], run.model)
    report: dict = {}
    if not run.lowrank:
        report.update({"rewritten": [], "skipped": [], "notes": [], "totals": {}})
    for m in mods:
        m.report(run, report)
    if run.lowrank:
        calib_info = run.shared.get("lowrank_calibration")
        report["method"] = run.method.name
        report["method_note"] = run.method_note
        if run.shared.get("budget"):
            report["budget"] = run.shared["budget"]
    else:
        any_rank = config.quant_spec().any_rank
        calib_info = run.shared.get("quant_calibration")
        report["method"] = run.method.name if any_rank else None
        report["method_note"] = run.method_note if any_rank else None
    if calib_info:
        report["calibration"] = calib_info
        if calib_info.get("fallback"):  # the update could not run in segments: say why
            report["notes"] = report.get("notes", []) + [calib_info["fallback"]]
    pol = run.policy
    if run.lowrank:
        report["policy"] = {"default": pol.default.describe(), "include": pol.include,
                            "exclude": pol.exclude, "align": pol.align,
                            "group_inputs": pol.group_inputs,
                            "dense_blocks": sorted({i for b, s in pol.blocks if s.skip for i in b})}
        report["recipe"] = {"name": config.lowrank.recipe, "applied": recipe}
    else:
        report["policy"] = {"include": pol.include, "exclude": pol.exclude}
        if recipe:
            report["recipe"] = {"name": config.lowrank.recipe, "applied": recipe}
    report["modifiers"] = [m.name for m in mods]
    report["config"] = config.to_dict()
    return run.model, report


def dry_run(model_or_path, config: CompressConfig) -> dict:
    """What :func:`compress_model` would do, without doing it: the model reference, the
    method, the recipe, the modifiers and the statistics they need, the budget, and per
    projection the rank it would get (or why it stays dense)."""
    run, recipe = plan(model_or_path, config)
    config = run.config
    ref = run.ref
    mods = modifiers_for(config)
    out: dict = {
        "dry_run": True,
        "model": {"file": None if ref.file is None else str(ref.file), "format": ref.format,
                  "tokenizer": None if ref.tokenizer is None else str(ref.tokenizer),
                  "kv_layers": ref.kv.layers if ref.kv is not None else None},
        "method": run.method.name, "method_note": run.method_note,
        "recipe": {"name": config.lowrank.recipe, "applied": recipe},
        "modifiers": [{"name": m.name, "statistics": m.statistics(run)} for m in mods],
        "config": config.to_dict(),
    }
    if run.shared.get("budget"):
        out["budget"] = run.shared["budget"]
    if run.plan is not None:
        out["plan"] = [{"name": t.name, "role": t.role, "block": t.block,
                        "shape": list(t.shape), "rank": r} for t, r, *_ in run.plan.items]
        out["dense"] = [{"name": t.name, "role": t.role, "reason": why}
                        for t, why, _ in run.plan.skipped]
    if config.quant.quantize is not None:
        out["quantize"] = config.quant_spec().describe()
    out["summary"] = (f"dry run: {ref.format} model, method {run.method.name}, "
                      f"{', '.join(m.name for m in mods)}"
                      + (f"; {len(run.plan.items)} projections planned, "
                         f"{len(run.plan.skipped)} dense" if run.plan is not None else ""))
    return out


def _check_target(path: Path, target: str) -> dict:
    """The written file loaded on the target runtime(s) (``any``: every one lrc knows) that are
    installed: ``{"<runtime>_load": "ok" | "not installed"}``; LrcError (one line) when one
    cannot load it."""
    from lrc.runtime.runtimes import ANY, RUNTIMES, load, runtime_error

    out = {}
    for rt in RUNTIMES:
        if rt.name == "ort" or target not in (ANY, rt.name):
            continue
        if not rt.installed():
            out[f"{rt.name}_load"] = "not installed"
            continue
        try:
            load(path, rt.name)
        except LrcError:
            raise
        except Exception as e:  # noqa: BLE001 - the runtime's own error, as one line
            raise LrcError(f"{opt('target_runtime', target)}: {rt.name} cannot load the output: "
                           f"{runtime_error(e)}") from None
        out[f"{rt.name}_load"] = "ok"
    return out


def compress(model_or_path, config: CompressConfig | None = None, *,
             progress: Progress | None = None, calib_progress=None, **options):
    """``lrc.compress(model, config=None, **options)``: ``options`` by name on top of
    ``config`` (:meth:`CompressConfig.with_options`: rank, ratio, include, method, quantize,
    correct_rank, calib_tokens, ...; an unknown name is an error naming the nearest), checked
    before any work. Returns ``(model, report)``: the input model object is modified in place
    when one is given. With ``out``: the result is written there as ``lrc compress`` writes it
    (a folder for a folder, checked, atomically) and ``(out path, report)`` is returned. With
    ``dry_run``: ``(None, the plan)``."""
    config = (config or CompressConfig()).with_options(**options)
    config.validate()
    if config.output.dry_run:
        return None, dry_run(model_or_path, config)
    if config.output.out is not None:
        if isinstance(model_or_path, (str, Path)):
            report, _ = compress_path(Path(model_or_path), Path(config.output.out), config,
                                      progress=progress, calib_progress=calib_progress)
            return Path(report.get("output") or config.output.out), report
        m, report = compress_model(model_or_path, config, progress=progress,
                                   calib_progress=calib_progress)
        M.save(m, config.output.out, external_data=True if config.output.external_data
               else None, force=config.output.force)
        return Path(config.output.out), report
    return compress_model(model_or_path, config, progress=progress, calib_progress=calib_progress)


# --------------------------------------------------------------------------------- files, folders


def compress_file(src: Path, out: Path, config: CompressConfig, *, external_data: bool = False,
                  force: bool = False, check: bool = True, progress: Progress | None = None,
                  calib_progress=None) -> dict:
    """Compress the model file ``src`` to ``out`` (staged beside it, checked, then moved into
    place). ``check``: the onnx checker and an ONNX Runtime CPU load of the staged file."""
    from lrc.runtime.session import check_loads, onnx_domain_ops

    t0 = time.perf_counter()
    level, weaker = "full", ""
    if check:  # the output is held to what its input meets, known before the work
        level, weaker = M.check_level(src, onnx_domain_ops())
    m, report = compress_model(src, config, progress=progress, calib_progress=calib_progress)
    t1 = time.perf_counter()
    staged = M.stage(m, out, external_data=True if external_data else None, force=force)
    del m  # release the graph and weights before the checker and ORT load the copy
    gc.collect()
    checks: dict = {}
    try:
        if check:
            checks.update(M.structural_check(staged.path, onnx_domain_ops(), level))
            if weaker:
                checks["checker_level"] = (f"{level}: the input itself fails the stronger "
                                           f"check ({weaker})")
            checks.update(check_loads(staged.path))
            checks.update(_check_target(staged.path, config.quant.target_runtime))
    except BaseException:
        staged.discard()
        raise
    staged.commit(force)
    report["seconds"] = {"factorise": round(t1 - t0, 2), "total": round(time.perf_counter() - t0, 2)}
    report["checks"] = checks or "skipped (no check asked)"
    report["input"] = str(src)
    report["output"] = str(out)
    report["size_before"] = M.file_size(src)
    report["size_after"] = M.file_size(out)
    return report


SUMMARY = "lrc.json"  # the summary a compressed folder holds


def compress_folder(src: Path, out: Path, config: CompressConfig, *, external_data: bool = False,
                    force: bool = False, check: bool = True, progress: Progress | None = None,
                    calib_progress=None) -> dict:
    """Folder in, folder out: every .onnx compressed, other files (tokenizer, configs) copied,
    ``lrc.json`` written; the output appears only when complete."""
    def transform(f: Path, dst: Path) -> dict:
        return compress_file(f, dst, config, external_data=external_data or bool(
            M.external_files(f)), force=True, check=check, progress=progress,
            calib_progress=calib_progress)

    summary: dict = {}

    def finish(tmp: Path, reports: dict) -> None:
        summary.update(next(iter(reports.values())) if len(reports) == 1 else {
            "models": reports,
            "summary": "; ".join(f"{k}: {v['summary']}" for k, v in reports.items()),
            "size_before": sum(r["size_before"] for r in reports.values()),
            "size_after": sum(r["size_after"] for r in reports.values())})
        M.write_text_atomic(tmp / SUMMARY, json.dumps(summary, indent=1))

    folder.transform_folder(src, out, transform, force=force, skip=(SUMMARY,), finish=finish)
    return summary


def default_output(model: Path) -> Path:
    """Where ``lrc compress MODEL`` writes by default: ``MODEL-lrc`` (a folder for a folder) or
    ``MODEL-lrc.onnx``."""
    model = Path(model)
    if model.is_dir():
        return model.with_name(model.name + "-lrc")
    src = pick_file(model)
    return src.with_name(src.stem + "-lrc.onnx")


def compress_path(model: Path, out: Path | None, config: CompressConfig, *,
                  progress: Progress | None = None, calib_progress=None) -> tuple[dict, Path]:
    """``lrc compress``: a file or folder to ``out`` (default :func:`default_output`), the
    summary JSON beside it, then the modifiers that work on written files (quantize_rest).
    The output options (external data, force, check) are the config's. Returns
    ``(report, summary file)``."""
    model = Path(model)
    if not model.exists():
        raise LrcError(f"{model}: no such file or folder")
    o = config.output
    kw = dict(external_data=o.external_data, force=o.force, check=o.check, progress=progress,
              calib_progress=calib_progress)
    out = Path(out) if out else default_output(model)
    if model.is_dir():
        report = compress_folder(model, out, config, **kw)
        summary_path = out / SUMMARY
    else:
        src = pick_file(model)
        if out.exists() and out.is_dir():
            out = out / src.name
        summary_path = out.with_name(out.name + ".lrc.json")
        if out.resolve() == src.resolve():
            raise LrcError("output must differ from the input")
        if not o.force:
            for p in (out, summary_path):
                if p.exists():
                    raise LrcError(f"{p} exists; pass {opt('force')} to overwrite")
        M.check_output(out, o.force)
        report = compress_file(src, out, config, **kw)
        M.write_text_atomic(summary_path, json.dumps(report, indent=1))
    for m in modifiers_for(config):
        done = m.after_write(config, out)
        if done is not None:
            report[m.name.replace("-", "_")] = done
            report["size_after"] = done["size_after"]
            M.write_text_atomic(summary_path, json.dumps(report, indent=1))
    return report, summary_path


__all__ = ["CompressConfig", "RECIPES", "SUMMARY", "compress", "compress_file", "compress_folder",
           "compress_model", "compress_path", "default_output", "dry_run", "plan", "run_passes",
           "speedup_budget"]
