"""Techniques as modifiers: each one says when it applies, which statistics it needs, and
which passes it adds; one pipeline (:mod:`lrc.pipeline`) runs them all.

A :class:`Modifier` is one technique of ``lrc compress``:

==================  ===========================================  ==============================
modifier            applies when                                 passes
==================  ===========================================  ==============================
``lowrank``         low rank is asked (always without quantize)  LowRankPass (the method's
                                                                 factoriser: svd, asvd,
                                                                 svd-llm, the update)
``int8-factors``    int8, with low rank                          Int8FactorsPass
``smooth``          quantize with smooth > 0                     SmoothPass (scales from the
                                                                 calibration statistics)
``quantize``        quantize                                     QuantizePass (codes + the
                                                                 whitened correction; with
                                                                 update and no low rank: the
                                                                 sequential correction)
``embedding``       quantize, embedding not float                EmbeddingPass
``quantize-rest``   quantize_rest                                ONNX Runtime's quantisers on
                                                                 the written file (they read
                                                                 files): ``after_write``
==================  ===========================================  ==============================

They share one :class:`Run`: the model reference, the model, the config, the resolved method
and policy, the plan, and one calibration (texts or input files, drawn once) with one memo of
statistics, so two modifiers asking for the statistics of the same tensors get one object.
Statistics are gathered on the model as it is before any pass (the passes run after every
modifier made its passes). A new technique is one Modifier here (its passes in
``lrc/graph/passes/``) and its test; ``lrc tune`` composes candidates from config options, which
select modifiers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from lrc import methods
from lrc.config import CompressConfig
from lrc.errors import LrcError, opt, render
from lrc.graph.plan import Plan
from lrc.graph.policy import Policy
from lrc.modelref import ModelRef
from lrc.quantmath import BASE_QUANTIZERS


@dataclass
class Run:
    """What the modifiers of one compression share (see the module docstring)."""

    ref: ModelRef
    model: ir.Model
    config: CompressConfig
    method: methods.Method  # resolved: auto chosen, the update applied
    method_note: str
    policy: Policy
    plan: Plan | None = None  # None without low rank
    progress: Callable | None = None  # (done, total, node name) while passes run
    calib_progress: Callable | None = None  # (done, total) while calibrating
    shared: dict = field(default_factory=dict)  # what one modifier leaves for a later one
    _calibration: methods.Calibration | None = None
    _stats: dict = field(default_factory=dict)

    @property
    def lowrank(self) -> bool:
        return self.plan is not None

    def select(self, t) -> bool:
        """Quantisation without low rank: the projections include / exclude select."""
        return self.policy.setting_for(t)[0] is not None

    def calibration(self, what: str) -> methods.Calibration:
        """The one :class:`~lrc.methods.Calibration` of this run (made on first use): the
        model on the calibration text, or on the calib_inputs files. A model in memory with
        no tokenizer to be found is an error, never plain SVD instead."""
        if self._calibration is None:
            self._calibration = _calibration(self.ref, self.model, what, self.config,
                                             self.calib_progress)
        return self._calibration

    def statistics(self, names: list[str], widths: dict[str, int] | None = None):
        """:func:`lrc.methods.statistics` of ``names`` on the run's calibration, one object per
        list of names."""
        key = tuple(names)
        if key not in self._stats:
            self._stats[key] = methods.statistics(self.calibration("correction"), names,
                                                  widths=widths)
        return self._stats[key]


def _calibration(ref: ModelRef, model: ir.Model, what: str, config: CompressConfig,
                 calib_progress) -> methods.Calibration:
    c, m = config.calibration, config.algorithm
    if c.calib_inputs:
        from lrc.runtime.feeds import graph_input_specs, input_files, load_inputs

        files = input_files(c.calib_inputs)
        inputs = load_inputs(files, graph_input_specs(model))
        return methods.make_calibration(ref, damp=m.setting("update_damp"),
                                        alpha=m.setting("alpha"), progress=calib_progress,
                                        inputs=inputs, input_sources=[f.name for f in files])
    if ref.in_memory and ref.tokenizer is None:
        raise LrcError(f"{opt('method', what)} on an in-memory model needs {opt('tokenizer')} "
                       "(the path of tokenizer.json): calibration runs the model on text; or "
                       "pass the model's path")
    return methods.make_calibration(ref, calib=c.calib, n_tokens=c.calib_tokens,
                                    seq_len=c.calib_seq, use_default=not c.calib_only,
                                    alpha=m.setting("alpha"), damp=m.setting("update_damp"),
                                    progress=calib_progress)


class Modifier:
    """One technique. ``applies(config)``: whether the config asks for it. ``statistics(run)``:
    what it needs from calibration (one of :data:`lrc.methods.STATISTICS`, or ``sq_mean`` for
    smoothing's scales). ``passes(run)``: the onnx-ir passes it adds (made before any pass
    runs; statistics are gathered here or lazily by the passes). ``report(run, out)``: what it
    puts in the summary. ``after_write(config, path)``: work on the written file or folder,
    for tools that read files (None: nothing)."""

    name = ""

    def applies(self, config: CompressConfig) -> bool:
        raise NotImplementedError

    def statistics(self, run: Run) -> str:
        return "none"

    def passes(self, run: Run) -> list:
        return []

    def report(self, run: Run, out: dict) -> None:
        pass

    def after_write(self, config: CompressConfig, path: Path) -> dict | None:
        return None


class LowRank(Modifier):
    """Projections rewritten as thin MatMul pairs by the run's method."""

    name = "lowrank"

    def applies(self, config):
        return config.lowrank_asked

    def statistics(self, run):
        return "none" if run.config.factorizer is not None else run.method.statistics

    def passes(self, run):
        from lrc.graph.passes.lowrank import LowRankPass

        factoriser, info = run.config.factorizer, None
        if factoriser is None and run.method.data_aware:
            factoriser, info = run.method.make_factoriser(
                run.model, run.plan, run.calibration(run.method.name))
        run.shared["lowrank_calibration"] = info
        self.pass_ = LowRankPass(run.policy, factorizer=factoriser, progress=run.progress,
                                 plan=run.plan)
        return [self.pass_]

    def report(self, run, out):
        record = self.pass_.record
        out.update(record.to_dict())
        out["summary"] = record.summary_line()


class Int8Factors(Modifier):
    """The low-rank factors stored as int8 (a form the target provider runs)."""

    name = "int8-factors"

    def applies(self, config):
        return config.lowrank_asked and bool(config.factors.int8)

    def passes(self, run):
        from lrc.graph.passes.int8 import Int8FactorsPass

        self.pass_ = Int8FactorsPass(run.config.factors.int8_form) if run.plan.items else None
        return [self.pass_] if self.pass_ else []

    def report(self, run, out):
        if self.pass_:
            out["int8"] = self.pass_.record


def _quant_inputs(run: Run) -> tuple[list[str], dict[str, int]]:
    """The inputs of the weight MatMuls quantisation will rewrite (graph order), and widths."""
    from lrc.graph.passes.quant import quant_targets

    targets, _ = quant_targets(run.model, None if run.lowrank else run.select)
    names = list(dict.fromkeys(t.node.inputs[0].name for t in targets))
    return names, {t.node.inputs[0].name: t.shape[0] for t in targets}


def _sequential_quant(run: Run) -> bool:
    """update with quantisation and no low rank: the sequential correction."""
    return not run.lowrank and bool(run.config.algorithm.update)


class _Grams:
    """``XᵀX`` by input name, read from the statistics when asked (they may be computed a
    slice of the inputs at a time)."""

    def __init__(self, stats):
        self.stats = stats

    def get(self, name):
        return self.stats[name].xtx if name in self.stats else None


class Smooth(Modifier):
    """SmoothQuant: activation outliers moved into the weights, folded into the norms."""

    name = "smooth"

    def applies(self, config):
        return config.quant.quantize is not None and bool(config.quant.smooth)

    def statistics(self, run):
        return "gram" if run.config.quant.smooth == "auto" else "sq_mean"

    def passes(self, run):
        import numpy as np

        from lrc.graph.passes.smooth import SmoothPass

        if not run.method.data_aware:
            raise LrcError(f"{opt('smooth')} needs calibration statistics: not with "
                           f"{opt('method', 'svd')}")
        names, widths = _quant_inputs(run)
        stats = run.statistics(names, widths)
        alpha, spec = run.config.quant.smooth, run.config.quant_spec()
        grams = _Grams(stats) if alpha == "auto" else None
        self.pass_ = SmoothPass({n: np.sqrt(st.sq_mean) for n, st in stats.items()},
                                alpha, None if run.lowrank else run.select, grams=grams,
                                bits=8 if spec.scheme == "int8-weight" else 4,
                                block_size=spec.block_size)
        run.shared["smooth"] = self.pass_
        if _sequential_quant(run):
            # the sequential correction runs on the smoothed model: smooth it now
            from lrc.graph.passes.run import run_passes

            run_passes([self.pass_], run.model)
            return []
        return [self.pass_]

    def report(self, run, out):
        out["smooth"] = self.pass_.record


class Quantize(Modifier):
    """Weight MatMuls in the target runtime's quantised forms, with a whitened low-rank
    correction of the error (one shot, or stage by stage with update)."""

    name = "quantize"

    def applies(self, config):
        return config.quant.quantize is not None

    def statistics(self, run):
        spec = run.config.quant_spec()
        if not run.method.data_aware:
            return "none"
        if _sequential_quant(run):
            return "sequential"
        return ("gram" if spec.any_rank or run.config.quant.smooth
                or BASE_QUANTIZERS[spec.base].needs_gram else "none")

    def passes(self, run):
        spec = run.config.quant_spec()
        self.spec, self.info = spec, None
        smooth = run.shared.get("smooth")
        corrector = None
        if not run.method.data_aware:
            if spec.any_rank:
                def corrector(targets, w_cat, e_cat, rank):
                    from lrc.factorize import factorize

                    f = factorize(e_cat, rank)
                    f.method = "svd-correction"
                    return f, {}

                self.info = {"method": render("plain SVD of the quantisation error "
                                              f"({opt('method', 'svd')})")}
        elif (spec.any_rank or smooth is not None or _sequential_quant(run)
              or BASE_QUANTIZERS[spec.base].needs_gram):
            names, widths = _quant_inputs(run)
            c = run.calibration("correction")

            def one_shot_corrector():  # each group's error whitened by the original's Gram
                return methods.make_corrector(
                    names, c, stats=run.statistics(names, widths),
                    rescaled=smooth.applied if smooth is not None else None)

            if _sequential_quant(run):
                chooser = None
                if spec.target_mb is not None:
                    # target-size chooses on the original model (its statistics and probe,
                    # the same choices as without update); the stages then solve them
                    chooser = self._one_shot(run, spec, one_shot_corrector()[0])
                    chooser.plan(run.model)
                    # its statistics and probe are done with: not held through the stages
                    chooser.corrector = chooser.probe = None
                    run._stats.pop(tuple(names), None)
                c.progress = None  # the statistics are gathered; the stages report below
                self.pass_, self.info = methods.sequential_correction(
                    run.model, spec, c, None if run.lowrank else run.select,
                    progress=run.calib_progress, chooser=chooser)
                self.pass_.progress = run.progress
                return [self.pass_]
            corrector, self.info = one_shot_corrector()
        self.pass_ = self._one_shot(run, spec, corrector)
        return [self.pass_]

    @staticmethod
    def _one_shot(run, spec, corrector):
        """The pass that corrects each group once (and makes target-size's choices)."""
        from lrc.graph.passes.quant import QuantizePass

        return QuantizePass(spec, corrector, select=None if run.lowrank else run.select,
                            progress=None if run.lowrank else run.progress,
                            probe=_probe(run) if spec.target_mb is not None else None,
                            decode_cost=_decode_cost if spec.decode_budget or spec.prefill_budget
                            else None)

    def report(self, run, out):
        record = self.pass_.record
        out["quantize"] = record.to_dict()
        out["notes"] = out.get("notes", []) + record.notes
        out["summary"] = (f"{out['summary']}; " if out.get("summary") else "") + \
            record.summary_line()
        if self.info:
            run.shared["quant_calibration"] = self.info


#: calibration windows the allocator's sensitivity probe runs (one run per group and window)
PROBE_WINDOWS = 2


def _probe(run: Run):
    """target-size's sensitivity probe, made when the pass first asks (on the model as the
    earlier passes left it): the model's output KL with some weights replaced, on the first
    :data:`PROBE_WINDOWS` calibration windows."""
    def make():
        from lrc.calibration.sensitivity import Probe
        from lrc.graph.passes.quant import quant_targets

        targets, _ = quant_targets(run.model, None if run.lowrank else run.select)
        names = list(dict.fromkeys(t.weight.name for t in targets))
        batches = run.calibration("correction").batches()[:PROBE_WINDOWS]
        return Probe(run.model, names, batches, path=run.ref.file, ref=run.ref)

    return make


def _decode_cost():
    """target-size's decode and prefill budgets: this machine's MatMul times (measured once,
    then cached)."""
    from lrc.runtime.decodecost import decode_cost

    return decode_cost()


class Embedding(Modifier):
    """Large embedding tables stored quantised (rows in blocks), in the target's form."""

    name = "embedding"

    def applies(self, config):
        return config.quant.quantize is not None and config.quant_spec().embedding != "float"

    def passes(self, run):
        from lrc.graph.passes.embedding import EmbeddingPass

        quant = next(m for m in run.shared["modifiers"] if isinstance(m, Quantize))
        return [EmbeddingPass(quant.pass_.spec, quant.pass_.record, quant.pass_.tied_codes)]


class QuantizeRest(Modifier):
    """ONNX Runtime's own quantisers on what low rank left dense, on the written file."""

    name = "quantize-rest"

    def applies(self, config):
        return config.output.quantize_rest is not None

    def after_write(self, config, path):
        from lrc.quantize import quantize_rest_inplace

        return quantize_rest_inplace(path, config.output.quantize_rest,
                                     check=config.output.check)


#: Every technique, in the order their passes run.
MODIFIERS: list[Modifier] = [LowRank(), Int8Factors(), Smooth(), Quantize(), Embedding(),
                             QuantizeRest()]


def modifiers_for(config: CompressConfig) -> list[Modifier]:
    """New instances of the modifiers ``config`` asks for, in order."""
    return [type(m)() for m in MODIFIERS if m.applies(config)]


__all__ = ["MODIFIERS", "Modifier", "Run", "modifiers_for"]
