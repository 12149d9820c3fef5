"""The compress pipeline (``lrc.compress`` is its :func:`compress`): a model and a :class:`CompressConfig` in, a smaller model and a report out.

:func:`compress_model` runs its phases in order, each handing the next a value:

1. **plan** — the policy (``--rank/--energy/--ratio``, filters, policy file), the method
   (``auto`` resolved), a global budget solved into a ratio, and the :class:`~lrc.graph.plan.Plan`
   (which projection gets which rank, what stays dense and why);
2. **statistics** — what the method needs from calibration text (:mod:`lrc.methods`), gathered
   by running the model's file, or an in-memory model as it is, on calibration text (never a
   silent fallback to plain SVD: an in-memory model without a tokenizer is an error);
3. **factors** — the method's factoriser;
4. **passes** — :class:`~lrc.graph.passes.lowrank.LowRankPass`, then
   :class:`~lrc.graph.passes.int8.Int8FactorsPass` when asked, then with ``--quantize``
   :class:`~lrc.graph.passes.smooth.SmoothPass` (``--smooth``) and
   :class:`~lrc.graph.passes.quant.QuantizePass` (``--quantize`` without a rank, ratio, energy,
   policy or budget runs only these: :func:`_quantize_only`), then onnx-ir's
   ``RemoveUnusedNodesPass``, composed by onnx-ir's pass manager;
5. **report**.

:func:`compress_file` is the file-level job (load, run, stage beside the output, checks: the
onnx checker and an ONNX Runtime load, commit, sizes); :func:`compress_path` adds folders (via
:mod:`lrc.graph.folder`), the summary file and ``--quantize-rest``. ``lrc.compress`` and
``lrc compress`` are thin layers over these.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrc import methods
from lrc.errors import LrcError
from lrc.graph import folder
from lrc.graph import model as M
from lrc.graph.passes.int8 import Int8FactorsPass, get_form
from lrc.graph.passes.lowrank import LowRankPass, Progress
from lrc.graph.passes.quant import QuantizePass, QuantSpec, parse_spec
from lrc.graph.plan import build_policy, make_plan, solve_budget
from lrc.graph.policy import Policy, make_setting


@dataclass
class CompressConfig:
    """Everything ``lrc compress`` / ``lrc.compress`` is told (defaults are the CLI's)."""

    # policy: which projections, at which rank
    rank: int | str | None = None
    energy: float | None = None
    ratio: float | None = None
    include: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    policy: str | os.PathLike | Policy | None = None
    align: int = 1
    allow_larger: bool = False
    # None: what the recipe says (see RECIPES / _apply_recipe); True / False: as given
    group_inputs: bool | None = None
    dense_edges: bool | None = None
    tied_head: str | None = None  # "dense" | "factor"
    recipe: str = "best"
    # a global budget instead of rank / energy / ratio
    target_params: float | None = None
    target_size_mb: float | None = None
    target_speedup: float | None = None
    ep: str = "cpu"  # the EP --target-speedup profiles on
    # method and its calibration
    method: str = "auto"
    update: bool | None = None
    update_damp: float = 0.1
    calib: list | str | os.PathLike | None = None
    calib_tokens: int = 16384
    calib_seq: int = 256
    calib_default: bool = True
    tokenizer: str | os.PathLike | None = None
    # .npz files (or folders of them) of named input tensors to calibrate on instead of text:
    # any model, text or not (lrc.runtime.feeds.load_inputs)
    calib_inputs: list | str | os.PathLike | None = None
    alpha: float = 0.5
    factorizer: object = None  # a ready factoriser (tune's truncations): no statistics phase
    # storage of the factors: False, True / "dynamic", or another form of lrc.graph.passes.int8
    int8: bool | str = False
    # quantisation of the weight MatMuls (lrc.graph.passes.quant): int4 | int8-weight | int8,
    # with a whitened low-rank correction of the error when correct_rank > 0
    quantize: str | None = None
    block_size: int = 32
    accuracy_level: int = 4
    correct_rank: int | str = 0  # "32,head=128": a default and per-selector overrides
    correct_form: str = "concat"
    correct_budget: float | None = None  # MB for --correct-rank auto
    embedding: str = "int8"  # with quantize: embedding tables int8 | int4 | float
    smooth: float = 0.0  # with quantize: SmoothQuant's alpha (0: off), lrc.graph.passes.smooth
    # the runtime the output is for (lrc.graph.passes.quant.TARGETS): the quantised forms it
    # runs; the written file is loaded on it when it is installed
    target_runtime: str = "ort"

    def quant_spec(self) -> QuantSpec | None:
        """The :class:`QuantSpec` of the quantisation options (LrcError on a bad one)."""
        from lrc.graph.passes.quant import TARGETS

        if self.target_runtime not in TARGETS:
            raise LrcError(f"--target-runtime must be one of {', '.join(TARGETS)}, got "
                           f"{self.target_runtime!r}")
        if self.quantize is None:
            if str(self.correct_rank or 0) not in ("0", ""):
                raise LrcError("--correct-rank corrects quantisation error: give --quantize too")
            return None
        return parse_spec(self.quantize, self.correct_rank, block_size=self.block_size,
                          accuracy_level=self.accuracy_level, correct_form=self.correct_form,
                          embedding=self.embedding, budget_mb=self.correct_budget,
                          target=self.target_runtime)

    @property
    def lowrank(self) -> bool:
        """Whether low rank is asked for: always without --quantize; with it, only when a rank,
        energy, ratio, policy file or budget is given."""
        if self.quantize is None:
            return True
        return any(v is not None for v in (self.rank, self.energy, self.ratio, self.policy,
                                           self.target_params, self.target_size_mb,
                                           self.target_speedup))

    def build_policy(self) -> Policy:
        """The Policy these options describe (LrcError on a bad option or policy file)."""
        if self.recipe not in RECIPES:
            raise LrcError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        exclude = list(self.exclude or [])
        if self.tied_head == "dense" and "head" not in exclude:
            exclude.append("head")
        return build_policy(self.rank, self.energy, self.ratio, self.include, exclude,
                            self.policy, self.align, self.allow_larger, bool(self.group_inputs),
                            bool(self.dense_edges))

    @property
    def int8_form(self) -> str | None:
        if not self.int8:
            return None
        return "dynamic" if self.int8 is True else self.int8


# --------------------------------------------------------------------------------- the recipe

RECIPES = {
    "best": "the data-aware recipe measured best on both bundled models (BENCHMARKS.md, "
            "benchmarks/allocation.md): projections reading one tensor factored jointly "
            "(--group-inputs), the first and last blocks dense (--dense-edges, models of 6+ "
            "blocks), the joint update (--update, svd-llm); a tied head left dense",
    "plain": "each option as given (no grouping, no dense blocks, no update); a tied head is "
             "factorised like any projection",
}
EDGE_MIN_BLOCKS = 6  # fewer blocks: keeping two dense would leave too little to compress


def _apply_recipe(config: CompressConfig, model: ir.Model, method) -> tuple[CompressConfig, dict]:
    """``config`` with the options left unset (None) filled from ``config.recipe``, and what was
    filled. The "best" recipe applies to data-aware low rank (the method resolved for this
    model, before ``--update``); a tied head is left dense under it for every method, unless
    ``--include head`` (or a policy file) asks for it. ``--rank full`` (a check of the rewrite
    itself) and a ready factoriser take nothing from the recipe."""
    import dataclasses

    from lrc.graph.locate import locate

    c = dataclasses.replace(config)
    best = (c.recipe == "best" and c.lowrank and c.rank != "full" and c.factorizer is None)
    data_aware = best and method.data_aware
    done: dict = {}
    targets = locate(model) if best else []
    explicit = c.policy is not None
    if c.group_inputs is None:
        c.group_inputs = data_aware
        if data_aware:
            done["group_inputs"] = True
    if c.dense_edges is None:
        blocks = max((t.n_blocks or 0 for t in targets), default=0)
        c.dense_edges = data_aware and not explicit and blocks >= EDGE_MIN_BLOCKS
        if c.dense_edges:
            done["dense_edges"] = f"blocks 0 and {blocks - 1} of {blocks} left dense"
    if c.update is None:
        c.update = data_aware and method.name in (m.update_of for m in methods.METHODS.values())
        if c.update:
            done["update"] = True
    if c.tied_head is None:
        asked = explicit or any("head" in str(i) for i in (c.include or []))
        tied = [t for t in targets if t.role == "head" and t.tied]
        c.tied_head = "dense" if best and tied and not asked else "factor"
        if c.tied_head == "dense":
            done["tied_head"] = (f"{tied[0].name} left dense: its weight is the embedding's, "
                                 "factors would add bytes (--include head to factorise it)")
    return c, done


# --------------------------------------------------------------------------------- the pipeline


def compress_model(model_or_path, config: CompressConfig, *, progress: Progress | None = None,
                   calib_progress=None) -> tuple[ir.Model, dict]:
    """Rewrite the model's projections into low-rank pairs. Returns ``(ir.Model, report)``.

    ``model_or_path``: a .onnx file or model folder (loaded here; calibration runs that file),
    or an ``ir.Model`` / ``onnx.ModelProto`` (modified in place; a data-aware method calibrates
    on it as it is, with ``config.tokenizer`` or the tokenizer.json beside the file
    ``lrc.model.load`` read it from). ``report``: ``rewritten`` and ``skipped`` records (every
    node with a reason), ``notes``, ``totals``, ``summary``, ``method``, ``policy``..."""
    # 1. plan: recipe, policy, method, budget, plan
    config.build_policy()  # bad options fail before any work
    spec = config.quant_spec()
    path = _file_of(model_or_path)
    base, method_note = _resolve_method(model_or_path, path, config)
    model = M.as_model(model_or_path)
    config, recipe = _apply_recipe(config, model, base)
    pol = config.build_policy()
    method = methods.get(methods.with_update(base.name)) if config.update else base
    form = get_form(config.int8_form) if config.int8_form else None
    if not config.lowrank:
        return _quantize_only(model_or_path, model, path, pol, spec, method, method_note,
                              config, progress, calib_progress)
    if (config.method == methods.AUTO and not method.data_aware and config.rank != "full"
            and config.factorizer is None and _is_lm(model)):
        raise LrcError(f"--method auto found no calibration for this language model "
                       f"({method_note.split(': ', 1)[-1]}), and plain SVD destroys language "
                       f"models (BENCHMARKS.md: SmolLM2 MLP 0.8, perplexity 5.8e5 against 156 "
                       f"whitened): pass --tokenizer PATH (the calibration text comes with "
                       f"pip install 'lrc[data]'), --calib-inputs FILES, or --method svd to "
                       f"accept it")
    budget = _budget(model, path, pol, config)
    plan = make_plan(model, pol)
    # 2-3. statistics and factors
    factoriser, calib_info = config.factorizer, None
    qpasses, quant = [], None
    if spec is not None:
        qpasses, quant, _, smooth = _quant_passes(model_or_path, model, path, spec, method,
                                                  config, calib_progress, select=None)
    if factoriser is None and method.data_aware:
        c = _calibration(model_or_path, model, path, method.name, config, calib_progress)
        factoriser, calib_info = method.make_factoriser(model, plan, c)
    # 4. passes
    lowrank = LowRankPass(pol, factorizer=factoriser, progress=progress, plan=plan)
    passes: list = [lowrank]
    int8 = Int8FactorsPass(form.name) if form and plan.items else None
    if int8:
        passes.append(int8)
    passes.extend(qpasses)
    passes.append(RemoveUnusedNodesPass())
    run_passes(passes, model)
    # 5. report
    record = lowrank.record
    report = record.to_dict()
    if int8:
        report["int8"] = int8.record
    if quant:
        report["quantize"] = quant.record.to_dict()
        report["notes"] = report.get("notes", []) + quant.record.notes
        if smooth:
            report["smooth"] = smooth.record
    report["summary"] = record.summary_line() + (
        f"; {quant.record.summary_line()}" if quant else "")
    report["method"] = method.name
    report["method_note"] = method_note
    if budget:
        report["budget"] = budget
    if calib_info:
        report["calibration"] = calib_info
        if calib_info.get("fallback"):  # --update could not run in segments: say why
            report["notes"] = report.get("notes", []) + [calib_info["fallback"]]
    report["policy"] = {"default": pol.default.describe(), "include": pol.include,
                        "exclude": pol.exclude, "align": pol.align,
                        "group_inputs": pol.group_inputs,
                        "dense_blocks": sorted({i for b, s in pol.blocks if s.skip for i in b})}
    report["recipe"] = {"name": config.recipe, "applied": recipe}
    return model, report


def _quant_passes(model_or_path, model: ir.Model, path: Path | None, spec: QuantSpec, method,
                  config: CompressConfig, calib_progress, select, sequential: bool = False,
                  ) -> tuple[list, object, dict | None, object]:
    """``([SmoothPass?, QuantizePass], the QuantizePass, calibration info, the SmoothPass or
    None)``. Calibration (on the model as it is now, before any pass) gives the whitened
    correction its Gram matrices and smoothing its per-channel activation scales; with
    ``--method svd`` the correction is the plain SVD of the error. Without a rank the whitened
    error is still measured when the statistics are gathered anyway. ``sequential``
    (``--update``): smoothing is applied to ``model`` here and the correction computed stage by
    stage on the quantised model's own inputs (:func:`lrc.methods.sequential_correction`);
    the list then holds the QuantizePass only."""
    from lrc.graph.passes.quant import quant_targets
    from lrc.graph.passes.smooth import SmoothPass

    if config.smooth and not 0 < config.smooth < 1:
        raise LrcError(f"--smooth must be between 0 and 1 (SmoothQuant's alpha), got "
                       f"{config.smooth}")
    corrector, info, smooth = None, None, None
    if not method.data_aware:
        if config.smooth:
            raise LrcError("--smooth needs calibration statistics: not with --method svd")
        if spec.any_rank:
            def corrector(targets, w_cat, e_cat, rank):
                from lrc.factorize import factorize

                f = factorize(e_cat, rank)
                f.method = "svd-correction"
                return f, {}

            info = {"method": "plain SVD of the quantisation error (--method svd)"}
    elif spec.any_rank or config.smooth or sequential:
        targets, _ = quant_targets(model, select)
        names = list(dict.fromkeys(t.node.inputs[0].name for t in targets))  # graph order
        widths = {t.node.inputs[0].name: t.shape[0] for t in targets}
        c = _calibration(model_or_path, model, path, "correction", config, calib_progress)
        stats = (methods.statistics(c, names, widths=widths)
                 if config.smooth or not sequential else None)
        if config.smooth:
            import numpy as np

            smooth = SmoothPass({n: np.sqrt(st.sq_mean) for n, st in stats.items()},
                                config.smooth, select)
        if sequential:
            if smooth:
                run_passes([smooth], model)
            c.progress = None  # the statistics are gathered; the stages report below
            quant, info = methods.sequential_correction(model, spec, c, select,
                                                        progress=calib_progress)
            return [quant], quant, info, smooth
        corrector, info = methods.make_corrector(
            names, c, stats=stats, rescaled=smooth.applied if smooth else None)
    quant = QuantizePass(spec, corrector, select=select, progress=None)
    return [p for p in (smooth, quant) if p is not None], quant, info, smooth


def _quantize_only(model_or_path, model: ir.Model, path: Path | None, pol: Policy,
                   spec: QuantSpec, method, method_note: str, config: CompressConfig,
                   progress, calib_progress) -> tuple[ir.Model, dict]:
    """``--quantize`` without low rank: every weight MatMul the include / exclude filters
    select is quantised (and corrected); the rest of the pipeline's report shape is kept."""
    def select(t) -> bool:
        return pol.setting_for(t)[0] is not None

    if spec.any_rank and not method.data_aware and config.method == methods.AUTO:
        raise LrcError(f"--correct-rank needs calibration text to whiten the correction, and "
                       f"{method_note.split(': ', 1)[-1]}; pass --method svd for an unwhitened "
                       f"correction")

    qpasses, quant, calib_info, smooth = _quant_passes(
        model_or_path, model, path, spec, method, config, calib_progress, select,
        sequential=config.update)
    quant.progress = progress
    run_passes([*qpasses, RemoveUnusedNodesPass()], model)
    report = {"rewritten": [], "skipped": [], "notes": list(quant.record.notes),
              "totals": {}, "quantize": quant.record.to_dict(),
              "summary": quant.record.summary_line(),
              "method": method.name if spec.any_rank else None,
              "method_note": method_note if spec.any_rank else None,
              "policy": {"include": pol.include, "exclude": pol.exclude}}
    if calib_info:
        report["calibration"] = calib_info
        if calib_info.get("fallback"):  # --update could not run in segments: say why
            report["notes"].append(calib_info["fallback"])
    if smooth:
        report["smooth"] = smooth.record
    return model, report


def _check_target(path: Path, target: str) -> dict:
    """The written file loaded on the target runtime(s) (``any``: every one lrc knows) that are
    installed: ``{"<runtime>_load": "ok" | "not installed"}``; LrcError (one line) when one
    cannot load it."""
    from lrc.runtime.runtimes import RUNTIMES, load, runtime_error

    out = {}
    for rt in RUNTIMES:
        if rt.name == "ort" or target not in ("any", rt.name):
            continue
        if not rt.installed():
            out[f"{rt.name}_load"] = "not installed"
            continue
        try:
            load(path, rt.name)
        except LrcError:
            raise
        except Exception as e:  # noqa: BLE001 - the runtime's own error, as one line
            raise LrcError(f"--target-runtime {target}: {rt.name} cannot load the output: "
                           f"{runtime_error(e)}") from None
        out[f"{rt.name}_load"] = "ok"
    return out


def run_passes(passes: list, model: ir.Model) -> ir.passes.PassResult:
    """Run ``passes`` in order with onnx-ir's pass manager (each pass's ``requires`` and
    ``ensures`` checked); a user error inside a pass comes out as that LrcError, not wrapped."""
    try:
        return ir.passes.PassManager(passes, steps=1)(model)
    except ir.passes.PassError as e:
        cause = e.__cause__
        while cause is not None:
            if isinstance(cause, (LrcError, KeyboardInterrupt, MemoryError)):
                raise cause from None
            cause = cause.__cause__
        raise


def _is_lm(model: ir.Model) -> bool:
    """A language model: it outputs ``logits`` or reads a KV cache (the cache names
    :func:`lrc.runtime.feeds.is_past` knows)."""
    from lrc.runtime.feeds import is_past

    return any(v.name == "logits" for v in model.graph.outputs) or any(
        is_past(v.name or "") for v in model.graph.inputs)


def _file_of(model_or_path) -> Path | None:
    """The .onnx file behind a path; None for a model in memory."""
    if isinstance(model_or_path, (ir.Model, onnx.ModelProto)):
        return None
    return M.resolve_model_path(model_or_path)


def _home_of(model_or_path, path: Path | None) -> Path | None:
    """Where the model's tokenizer and config live: its file, or the file ``lrc.model.load``
    read an in-memory model from."""
    if path is not None:
        return path
    if isinstance(model_or_path, ir.Model) and model_or_path.meta.get("lrc.source_path"):
        return Path(model_or_path.meta["lrc.source_path"])
    return None


def _resolve_method(model_or_path, path: Path | None, config: CompressConfig):
    """(Method, note): ``auto`` resolved for this input (``--update`` is applied after the
    recipe, in :func:`compress_model`)."""
    name = config.method
    if name != methods.AUTO:
        methods.get(name)
    if name == methods.AUTO and config.calib_inputs and config.rank != "full":
        name, note = methods.AUTO_BEST, f"{methods.AUTO_BEST}: best measured; calibrated on --calib-inputs"
    else:
        name, note = methods.resolve(name, home=_home_of(model_or_path, path),
                                     in_memory=path is None, rank=config.rank,
                                     tokenizer=config.tokenizer)
    return methods.get(name), note


@contextmanager
def _model_file(model: ir.Model, path: Path | None, home: Path | None) -> Iterator[Path]:
    """The model's file: ``path``, or the in-memory model written to a temporary folder (with
    the config.json beside ``home``, which feeds read for cache shapes): what a profile runs."""
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lrc-model-") as tmp:
        copy = Path(tmp) / "model.onnx"
        M.save(model, copy, external_data=True)
        if home is not None and (home.parent / "config.json").is_file():
            (Path(tmp) / "config.json").write_bytes((home.parent / "config.json").read_bytes())
        yield copy


def _calibration(model_or_path, model: ir.Model, path: Path | None, what: str,
                 config: CompressConfig, calib_progress) -> methods.Calibration:
    """The :class:`lrc.methods.Calibration` of this run: the model (its file, or itself in
    memory) on the calibration text, or on ``config.calib_inputs`` (.npz batches checked
    against the model's inputs) when given."""
    if config.calib_inputs:
        from lrc.runtime.feeds import graph_input_specs, input_files, load_inputs

        files = input_files(config.calib_inputs)
        inputs = load_inputs(files, graph_input_specs(model))
        source = path if path is not None else model
        return methods.make_calibration(source, damp=config.update_damp, alpha=config.alpha,
                                        progress=calib_progress,
                                        path=_home_of(model_or_path, path) if path is None else None,
                                        inputs=inputs, input_sources=[f.name for f in files])
    source, home, tokenizer = _calibration_source(model_or_path, model, path, what,
                                                  config.tokenizer)
    return methods.make_calibration(source, calib=config.calib, n_tokens=config.calib_tokens,
                                    seq_len=config.calib_seq, use_default=config.calib_default,
                                    tokenizer=tokenizer, alpha=config.alpha,
                                    damp=config.update_damp, progress=calib_progress, path=home)


def _calibration_source(model_or_path, model: ir.Model, path: Path | None, method: str,
                        tokenizer) -> tuple:
    """``(source, home, tokenizer)`` for the statistics phase: the model's file, or — for a
    model in memory — the model itself (calibration runs it as it is now, before the passes;
    ``home``: the file it was read from, where tokenizer.json and config.json are found). An
    in-memory model with no tokenizer to be found is an error, never plain SVD instead."""
    if path is not None:
        return path, None, tokenizer
    home = _home_of(model_or_path, None)
    if tokenizer is None and (home is None or not (home.parent / "tokenizer.json").is_file()):
        raise LrcError(f"--method {method} on an in-memory model needs tokenizer= (the path of "
                       "tokenizer.json): calibration runs the model on text; or pass the model's "
                       "path")
    return model, home, tokenizer


def _budget(model: ir.Model, path: Path | None, pol: Policy, config: CompressConfig) -> dict | None:
    """A global budget solved into a uniform ratio (``pol.default`` set to it); None without."""
    target_params, target_size_mb = config.target_params, config.target_size_mb
    if sum(v is not None for v in (target_params, target_size_mb, config.target_speedup)) > 1:
        raise LrcError("give one budget: --target-params, --target-size or --target-speedup")
    speed = None
    if config.target_speedup is not None:
        with _model_file(model, path, _home_of(model, path)) as f:
            speed = speedup_budget(f, config.target_speedup, config.ep)
        target_params = speed["params_fraction"]
    if target_params is None and target_size_mb is None:
        return None
    if any(v is not None for v in (config.rank, config.energy, config.ratio)):
        raise LrcError("give either a budget (--target-params/--target-size/--target-speedup)"
                       " or --rank/--energy/--ratio, not both")
    budget = solve_budget(model, pol, target_params, target_size_mb)
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
        raise LrcError(f"--target-speedup must be > 1, got {speedup}")
    provider = resolve_ep(ep)
    with tempfile.TemporaryDirectory() as work:
        prof = profile_matmul_fraction(path, provider, None, 1, 128, 0, 5, Path(work))
    f = float(prof["matmul_fraction"][prof["phase"]])  # prefill (decoders) or encoder
    limit = 1 / (1 - f) if f < 1 else float("inf")
    rho = (1 / speedup - (1 - f)) / f if f > 0 else -1
    if rho <= 0:
        raise LrcError(f"--target-speedup {speedup:g} is beyond what shrinking the projections can "
                       f"give: they take {f:.0%} of the time, so the limit is {limit:.2f}x")
    return {"target_speedup": speedup, "matmul_time_fraction": round(f, 4),
            "params_fraction": round(rho, 6), "ep": provider,
            "speedup_note": "Amdahl bound from an ORT profile at batch 1 x 128; measured speedups "
                            "reach 0.9-1.0 of it"}


def compress(model_or_path, *, progress: Progress | None = None, calib_progress=None,
             **options) -> tuple[ir.Model, dict]:
    """``lrc.compress(model_or_path, **options)``: :func:`compress_model` with a
    :class:`CompressConfig` of ``options`` (rank, energy, ratio, include, exclude, policy,
    method, int8, target_params, ...). The input model object is modified in place when one is
    given. ``int8``: False, True / "dynamic" (CPU EP), or "qdq" (GPU EPs)."""
    return compress_model(model_or_path, CompressConfig(**options), progress=progress,
                          calib_progress=calib_progress)


# --------------------------------------------------------------------------------- files, folders


def compress_file(src: Path, out: Path, config: CompressConfig, *, external_data: bool = False,
                  force: bool = False, check: bool = True, progress: Progress | None = None,
                  calib_progress=None) -> dict:
    """Compress the model file ``src`` to ``out`` (staged beside it, checked, then moved into
    place). ``check``: the onnx checker and an ONNX Runtime CPU load of the staged file."""
    from lrc.runtime.session import check_loads

    t0 = time.perf_counter()
    m, report = compress_model(src, config, progress=progress, calib_progress=calib_progress)
    t1 = time.perf_counter()
    staged = M.stage(m, out, external_data=True if external_data else None, force=force)
    del m  # release the graph and weights before the checker and ORT load the copy
    gc.collect()
    checks: dict = {}
    try:
        if check:
            checks.update(M.structural_check(staged.path))
            checks.update(check_loads(staged.path))
            checks.update(_check_target(staged.path, config.target_runtime))
    except BaseException:
        staged.discard()
        raise
    staged.commit(force)
    report["seconds"] = {"factorise": round(t1 - t0, 2), "total": round(time.perf_counter() - t0, 2)}
    report["checks"] = checks or "skipped (--no-check)"
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


def compress_path(model: Path, out: Path | None, config: CompressConfig, *,
                  external_data: bool = False, force: bool = False, check: bool = True,
                  quantize_rest: str | None = None, progress: Progress | None = None,
                  calib_progress=None) -> tuple[dict, Path]:
    """``lrc compress``: a file or folder to ``out`` (default ``MODEL-lrc.onnx`` / ``MODEL-lrc``),
    the summary JSON beside it, then ``--quantize-rest``. Returns ``(report, summary file)``."""
    model = Path(model)
    if not model.exists():
        raise LrcError(f"{model}: no such file or folder")
    kw = dict(external_data=external_data, force=force, check=check, progress=progress,
              calib_progress=calib_progress)
    if model.is_dir():
        out = Path(out) if out else model.with_name(model.name + "-lrc")
        report = compress_folder(model, out, config, **kw)
        summary_path = out / SUMMARY
    else:
        src = M.resolve_model_path(model)
        out = Path(out) if out else src.with_name(src.stem + "-lrc.onnx")
        if out.exists() and out.is_dir():
            out = out / src.name
        summary_path = out.with_name(out.name + ".lrc.json")
        if out.resolve() == src.resolve():
            raise LrcError("output must differ from the input")
        if not force:
            for p in (out, summary_path):
                if p.exists():
                    raise LrcError(f"{p} exists; pass --force to overwrite")
        M.check_output(out, force)
        report = compress_file(src, out, config, **kw)
        M.write_text_atomic(summary_path, json.dumps(report, indent=1))
    if quantize_rest:
        from lrc.quantize import quantize_rest_inplace

        qrep = quantize_rest_inplace(out, quantize_rest, check=check)
        report["quantize_rest"] = qrep
        report["size_after"] = qrep["size_after"]
        M.write_text_atomic(summary_path, json.dumps(report, indent=1))
    return report, summary_path


__all__ = ["CompressConfig", "SUMMARY", "compress", "compress_file", "compress_folder", "compress_model",
           "compress_path", "run_passes", "speedup_budget"]
