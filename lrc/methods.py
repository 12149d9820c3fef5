"""Factorisation methods: the one registry ``name -> Method``.

A method says which statistics of the calibration text it needs and makes the factoriser the
low-rank pass calls for every unit (``factoriser(target, W, rank) -> Factors``):

* ``svd``: plain truncated SVD, no statistics;
* ``asvd``: activation-scaled SVD, needs each projection input's mean ``|x|``;
* ``svd-llm``: SVD whitened by each projection input's Gram matrix ``XᵀX``;
* ``svd-llm+update`` (``--update``): SVD-LLM fitted to the inputs the already compressed model
  produces: the sequential two-pass pipeline of :mod:`lrc.calibration.sequential`.

``auto`` is not a method but a choice made per model (:func:`resolve`). A new method is one
:func:`register` call in this module (and its test): the CLI's ``--method`` help and validation,
``lrc.compress`` and ``lrc tune`` read the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from lrc.errors import LrcError, opt, render
from lrc.factorize import asvd_factor, whiten_factor
from lrc.fields import option
from lrc.graph.passes.lowrank import plain_svd
from lrc.graph.plan import Plan, make_plan
from lrc.graph.policy import Policy
from lrc.modelref import ModelRef, fit_window
from lrc.modelref import resolve as resolve_model

Factoriser = Callable  # (Target, W [in, out], rank) -> Factors
STATISTICS = ("none", "gram", "abs_mean", "sequential")
AUTO = "auto"


@dataclass
class Calibration:
    """What a data-aware method calibrates on: ``ref`` is the model ONNX Runtime runs — its
    file, or the in-memory model itself (before compression), whose tokenizer and configs the
    reference knows — and ``texts`` the text."""

    ref: ModelRef
    texts: list[str]
    sources: list[str]  # where the texts came from, for the report
    n_tokens: int = 16384
    seq_len: int = 256
    alpha: float = 0.5  # asvd's exponent
    damp: float = 0.1  # the update's damping
    progress: Callable | None = None
    # batches read from --calib-inputs files (feeds dicts, or token-id arrays): used instead
    # of the texts, for any model, text or not
    inputs: list | None = None

    @property
    def source(self):
        """What ONNX Runtime runs: the model in memory, else its file."""
        return self.ref.source

    @property
    def file(self) -> str | None:
        """The model's file (the source's, or the one an in-memory source came from)."""
        return None if self.ref.file is None else str(self.ref.file)

    @property
    def tokenizer(self) -> Path | None:
        return self.ref.tokenizer

    def batches(self) -> list:
        """What the model runs on: the ``inputs`` batches, else the texts tokenised into
        windows of ``seq_len`` (BOS-framed, ``n_tokens`` in all)."""
        if self.inputs is not None:
            return self.inputs
        from lrc.calibration.tokens import token_batches, tokenizer_path

        tok = tokenizer_path(self.ref)
        return token_batches(tok, list(self.texts), n_tokens=self.n_tokens,
                             seq_len=self.seq_len, bos=True)

    def describe(self) -> dict:
        """What the calibration ran on, for the report."""
        if self.inputs is not None:
            return {"inputs_files": len(self.inputs), "sources": self.sources}
        return {"tokens": int(self.n_tokens), "seq_len": self.seq_len, "sources": self.sources}


MakeFactoriser = Callable[[ir.Model, Plan, Calibration], "tuple[Factoriser | None, dict | None]"]


@dataclass(frozen=True)
class Method:
    """``statistics``: one of ``STATISTICS``. ``make_factoriser(model, plan, calibration)``
    returns ``(factoriser, calibration info)``; ``(None, None)`` when nothing needs one (plain
    SVD is used). ``update_of``: this method is the update applied to that one (not listed
    under the method option). ``settings``: the method's own settings class (a dataclass of
    :func:`lrc.fields.option` fields; each becomes an option of ``lrc compress``)."""

    name: str
    help: str
    statistics: str
    make_factoriser: MakeFactoriser
    update_of: str | None = None
    settings: type | None = None

    @property
    def data_aware(self) -> bool:
        return self.statistics != "none"


@dataclass
class AsvdSettings:
    """ASVD's knob: rows of W scaled by ``mean|x|^alpha`` before the SVD."""

    alpha: float = option(0.5, kind="float", help="asvd: the exponent of the activation "
                          "scale mean|x|^alpha.")


@dataclass
class UpdateSettings:
    """The sequential update's knob: its fitted targets damped towards the weights."""

    update_damp: float = option(0.1, kind="float", help="The update's damping of its fitted "
                                "targets towards the weights (lambda = damp * mean diag of "
                                "the compressed inputs' Gram).")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {method.statistics!r}")
    METHODS[method.name] = method
    return method


def _plain(model, plan, calibration):
    return None, None


def _activation_method(name: str, factor: Callable) -> MakeFactoriser:
    """A factoriser from each projection input's activation statistics (``cached_stats``: one
    ONNX Runtime pass over the calibration text, cached on disk); ``factor(W, stats, rank,
    calibration)``; projections without statistics get plain SVD."""

    def make(model: ir.Model, plan: Plan, c: Calibration):
        names = plan.calibration_inputs()
        if not names:
            return None, None
        # read in the order the pass factors them (graph order), so slices are computed once
        order = [u.first.node.inputs[0].name for u in plan.units]
        widths = {u.first.node.inputs[0].name: u.first.shape[0] for u in plan.units}
        stats = statistics(c, order, widths=widths)
        info = {"method": name, **c.describe(), "inputs": len(names)}

        def factoriser(t, w, rank):
            st = stats.get(t.node.inputs[0].name)
            if st is None:
                return plain_svd(t, w, rank)
            return factor(w, st, rank, c)

        return factoriser, info

    return make


def statistics(c: Calibration, names: list[str], *, widths: dict[str, int] | None = None):
    """Activation statistics of the tensors ``names`` (an ONNX Runtime pass over the
    calibration text, cached on disk): ``{name: ActStats}``. With ``widths`` (each input's
    width) and more float64 Grams than :func:`lrc.calibration.stats.gram_budget`, a
    :class:`~lrc.calibration.stats.SlicedStats` computing them a slice of ``names`` (in that
    order: the order they are read) at a time. The slices of a model file are gathered by
    running a fresh load of it segment by segment, resuming where the last slice stopped
    (:class:`~lrc.calibration.sequential.SegmentStats`: one segment's weights in memory, not
    the model's), or in one session when the graph cannot be cut. (A model in memory is the
    one being rewritten: its statistics are all gathered first, in one session.)"""
    import logging

    from lrc.calibration.sequential import SegmentError, SegmentStats
    from lrc.calibration.stats import SlicedStats, cached_stats, collect_stats, gram_budget, slices

    in_memory = c.ref.in_memory
    runner: list = []

    def collector(part, batches):
        try:
            return runner[0](part, batches)
        except SegmentError as e:
            logging.getLogger(__name__).info("statistics in one session: %s", e)
            runner.clear()
            return collect_stats(c.ref, part, batches, progress=c.progress)

    def compute(part: list[str]) -> dict:
        segmented = collector if runner else None
        if c.inputs is not None:  # files given by the user: not cached
            if segmented:
                return segmented(part, c.inputs)
            return collect_stats(c.ref, part, c.inputs, progress=c.progress)
        return cached_stats(c.ref, part, c.texts, n_tokens=c.n_tokens, seq_len=c.seq_len,
                            progress=c.progress, collector=segmented)

    names = list(dict.fromkeys(names))
    if widths:
        parts = slices(names, widths, gram_budget())
        if len(parts) > 1 and not in_memory:
            from lrc.graph.locate import locate

            original = c.ref.load()  # the graph only: weights stay on disk until a segment
            readers = {t.node.inputs[0].name: t for t in locate(original)}
            if set(names) <= set(readers):
                try:
                    runner.append(SegmentStats(original, {n: readers[n] for n in names},
                                               model_path=c.ref))
                except SegmentError as e:
                    logging.getLogger(__name__).info("statistics in one session: %s", e)
            return SlicedStats(compute, parts)
    return compute(names)


def _sequential(model: ir.Model, plan: Plan, c: Calibration):
    """The joint update (two forward passes over the text); see lrc.calibration.sequential."""
    from lrc.calibration.sequential import sequential_factorizer

    factoriser, info = sequential_factorizer(model, c.ref, plan.policy, c.texts,
                                             n_tokens=c.n_tokens, seq_len=c.seq_len,
                                             damp=c.damp,
                                             progress=c.progress, batches=c.inputs)
    if info is not None:
        info["sources"] = c.sources
    return factoriser, info


register(Method("svd", "plain", "none", _plain))
register(Method("asvd", "activation-scaled", "abs_mean", _activation_method(
    "asvd", lambda w, st, rank, c: asvd_factor(w, st.abs_mean, rank, alpha=c.alpha)),
    settings=AsvdSettings))
register(Method("svd-llm", "whitened by calibration activations", "gram", _activation_method(
    "svd-llm", lambda w, st, rank, c: whiten_factor(w, st.xtx, rank))))
register(Method("svd-llm+update", "svd-llm fitted to the compressed model's own inputs",
                "sequential", _sequential, update_of="svd-llm", settings=UpdateSettings))

AUTO_HELP = "svd-llm when a tokenizer is at hand, else svd"
AUTO_BEST = "svd-llm"


def settings_classes() -> dict[str, type]:
    """``{method name: its settings class}`` for the methods that have one."""
    return {m.name: m.settings for m in METHODS.values() if m.settings is not None}


def choices() -> list[str]:
    """What ``--method`` accepts: ``auto`` and every method that is not an ``--update`` form."""
    return [AUTO, *(m.name for m in METHODS.values() if m.update_of is None)]


def method_help() -> str:
    """The ``--method`` help line, from the registry."""
    parts = [f"{AUTO} ({AUTO_HELP})"] + [f"{m.name} ({m.help})" for m in METHODS.values()
                                         if m.update_of is None]
    return ", ".join(parts[:-1]) + " or " + parts[-1] + "."


def get(name: str) -> Method:
    """The registered method ``name``; LrcError listing the choices otherwise."""
    m = METHODS.get(name)
    if m is None:
        raise LrcError(f"unknown method {name!r}: use one of {', '.join(choices())}")
    return m


def check(name: str, update: bool = False) -> None:
    """Validate the method and the update before any work (``auto`` is resolved later)."""
    if name != AUTO and name not in choices():
        raise LrcError(f"{opt('method')} must be one of {', '.join(choices())}, got {name!r}")
    if update and name != AUTO:
        with_update(name)


def with_update(name: str) -> str:
    """The update's form of method ``name``."""
    for m in METHODS.values():
        if m.update_of == name:
            return m.name
    bases = [m.update_of for m in METHODS.values() if m.update_of]
    raise LrcError(f"{opt('update')} needs {' or '.join(opt('method', b) for b in bases)}")


def resolve(name: str, ref: ModelRef | None = None, *, rank=None) -> tuple[str, str]:
    """``auto`` -> the best measured method the input allows: ``svd-llm`` (whitening by
    calibration activations; orders of magnitude better than plain SVD on every model we
    measured) when the model reference has a tokenizer (given, or tokenizer.json beside the
    model) and the packaged calibration text is at hand; plain ``svd`` otherwise, and for
    ``--rank full`` (a verification of the rewrite itself). Returns ``(method, why)``."""
    if name != AUTO:
        get(name)
        return name, f"{name} (requested)"
    if rank == "full":
        return "svd", render(f"svd: {opt('rank')} full verifies the rewrite itself")
    if ref is None or (ref.file is None and ref.tokenizer is None):
        return "svd", render("svd: no model file to calibrate on (in-memory model; pass "
                             f"{opt('tokenizer')} to calibrate on it)")
    if ref.tokenizer is None:
        return "svd", f"svd: no tokenizer.json beside {ref.file.name} for calibration text"
    try:
        from lrc.data import calibration_texts

        calibration_texts(n_tokens=1024)
    except LrcError as e:
        return "svd", f"svd: calibration text unavailable ({e})"
    return AUTO_BEST, (f"{AUTO_BEST}: best measured; calibrated on the packaged mixed-domain text"
                       + (" (on the in-memory model)" if ref.in_memory else ""))


def calibration_texts(calib=None, *, n_tokens: int = 16384,
                      use_default: bool = True) -> tuple[list[str], list[str]]:
    """``(texts, sources)``: the user's files in ``calib`` plus, unless ``use_default=False``
    (and some file is given), lrc's bundled mixed-domain set (news, wiki markup, forum dialogue,
    Python code; disjoint from the evaluation texts). Mixing domains matters: statistics from
    one domain make the factors drop directions other domains use."""
    texts: list[str] = []
    sources = []
    for f in ([calib] if isinstance(calib, (str, Path)) else list(calib or [])):
        p = Path(f)
        if not p.is_file():
            raise LrcError(f"calibration file {str(p)!r} not found")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
        sources.append(str(p))
    if use_default or not texts:
        from lrc.data import calibration_texts as bundled

        from lrc.data import release

        texts.extend(bundled(n_tokens=int(n_tokens * 1.2)))
        release()  # the corpora it drew from: ~100 MB a compression does not need again
        sources.append("bundled mix: news (Lee corpus, calibration half), wiki markup, forum posts, "
                       "Python code")
    return texts, sources


def make_factoriser(name: str, model: ir.Model, policy: Policy | Plan, source, *, calib=None,
                    n_tokens: int = 16384, seq_len: int = 256, use_default: bool = True,
                    tokenizer=None, alpha: float = 0.5, damp: float = 0.1, progress=None,
                    path=None):
    """``(factoriser, info)`` of method ``name`` for ``model`` (planned with ``policy``, or a
    ready :class:`Plan`), calibrated by running ``source`` in ONNX Runtime on the calibration
    text (see :func:`calibration_texts`). ``source``: the model's reference or file (the same
    model, unchanged), or ``model`` itself when it is in memory (``path``: the file it came
    from, if any; without one ``tokenizer`` is needed)."""
    method = get(name)
    plan = policy if isinstance(policy, Plan) else make_plan(model, policy)
    if not method.data_aware:
        return method.make_factoriser(model, plan, None)
    c = make_calibration(resolve_model(source, tokenizer=tokenizer, origin=path), calib=calib,
                         n_tokens=n_tokens, seq_len=seq_len, use_default=use_default,
                         alpha=alpha, damp=damp, progress=progress)
    return method.make_factoriser(model, plan, c)


def make_calibration(ref: ModelRef, *, calib=None, n_tokens: int = 16384, seq_len: int = 256,
                     use_default: bool = True, alpha: float = 0.5, damp: float = 0.1,
                     progress=None, inputs=None, input_sources=None) -> Calibration:
    """The :class:`Calibration` a data-aware step runs on: texts from
    :func:`calibration_texts`, or ``inputs`` (batches read by
    :func:`lrc.runtime.feeds.load_inputs`; ``input_sources`` their files) instead."""
    if inputs is not None:
        texts, sources = [], [str(s) for s in (input_sources or [])]
    else:
        texts, sources = calibration_texts(calib, n_tokens=n_tokens, use_default=use_default)
    if ref.is_lm:
        seq_len = fit_window(ref.config, seq_len)
    return Calibration(ref, texts, sources, n_tokens=n_tokens, seq_len=seq_len, alpha=alpha,
                       damp=damp, progress=progress, inputs=inputs)


def make_corrector(input_names: list[str], c: Calibration | None = None, *, stats=None,
                   rescaled: dict | None = None, widths: dict[str, int] | None = None):
    """``(corrector, info)`` for :class:`~lrc.graph.passes.quant.QuantizePass`: the whitened
    closed-form correction of quantisation error (QERA / EoRA / L2QER; :mod:`lrc.quantmath`),
    from the Gram matrices of the quantised projections' inputs ``input_names``.

    ``corrector(targets, W_cat, E_cat, rank)`` (``E_cat`` is scaled in place: pass a
    temporary): the members' errors ``E_i`` (side by side; one
    input, so one Gram ``G``) are each divided by ``‖X·W_i‖`` so that the joint truncation
    balances relative output errors, factored by :func:`~lrc.factorize.whiten_factor` (the SVD
    of ``SᵀE``, ``G = SSᵀ``), and the norms put back into ``B``. ``rank`` 0 only measures.
    Returns ``(Factors | None, {"werr_before": [...], "werr_after": [...]})`` — per member the
    relative whitened error ``‖X·E_i‖/‖X·W_i‖`` before and after the correction, and the Gram.
    ``stats``: ready statistics ``{input name: ActStats}`` instead of calibrating on ``c``
    (``input_names`` in the order the pass corrects them, ``widths`` their widths: statistics
    computed a slice at a time, see :func:`statistics`).
    ``rescaled``: ``{input name: s}`` for inputs a smoothing pass divided by ``s`` (read when the
    corrector runs): their Gram becomes ``diag(s)⁻¹ G diag(s)⁻¹``."""
    import numpy as np

    from lrc.quantmath import correction_factors, whitened_norm2, whitened_spectrum

    if stats is None:
        stats = statistics(c, list(input_names), widths=widths)

    def setup(targets, w_cat, norms=None):
        """``(stats, G, member slices, ‖X·W_i‖)`` of one group (G rescaled after smoothing;
        the identity where the calibration text never reached the input); ``norms``: the
        ``‖X·W_i‖`` an earlier call gave for the same weights (not computed again)."""
        name = targets[0].node.inputs[0].name
        st = stats.get(name)
        g = np.eye(w_cat.shape[0]) if st is None else st.xtx
        s = (rescaled or {}).get(name)
        if st is not None and s is not None:
            g = g / np.outer(s, s)
        cuts = np.cumsum([0, *[t.shape[1] for t in targets]])
        parts = [slice(cuts[i], cuts[i + 1]) for i in range(len(targets))]
        if norms is None:
            norms = [np.sqrt(max(whitened_norm2(w_cat[:, p], g), 1e-30)) for p in parts]
        return st, g, parts, norms

    def corrector(targets, w_cat, e_cat, rank, norms=None):
        st, g, parts, norms = setup(targets, w_cat, norms)
        before = [np.sqrt(whitened_norm2(e_cat[:, p], g)) / n for p, n in zip(parts, norms)]
        if not rank:
            return None, {"werr_before": before, "gram": None if st is None else g,
                          "norms": norms}
        scaled = e_cat  # scaled in place: the caller's error is not read again
        if scaled.dtype not in (np.float32, np.float64) or not scaled.flags.writeable:
            scaled = np.array(scaled, dtype=np.float32)
        for p, n in zip(parts, norms):
            scaled[:, p] /= n
        f = correction_factors(scaled, g, rank)
        # ‖X(E_i - A·B_i)‖ / ‖X·W_i‖, from the scaled error and B before its norms go back
        after = [np.sqrt(whitened_norm2(scaled[:, p], g, minus=(f.a, f.b[:, p])))
                 for p in parts]
        del scaled
        for p, n in zip(parts, norms):
            f.b[:, p] *= n
        f.method = "whitened-correction" if st is not None else "svd-correction"
        return f, {"werr_before": before, "werr_after": after,
                   "gram": None if st is None else g}

    def spectrum(targets, w_cat, e_cat, norms=None):
        """The ``σ²`` (descending) of ``Sᵀ[E_1/‖XW_1‖ ...]``: what each rank of the joint
        correction removes from the members' summed relative squared output error."""
        _, g, parts, norms = setup(targets, w_cat, norms)
        return whitened_spectrum(np.concatenate([e_cat[:, p] / n for p, n in zip(parts, norms)],
                                                axis=1), g)

    def gram(targets):
        """The Gram the group's correction is whitened by (None where calibration never reached
        its input): what a data-aware base quantiser chooses its codes with."""
        name = targets[0].node.inputs[0].name
        st = stats.get(name)
        if st is None:
            return None
        s = (rescaled or {}).get(name)
        return st.xtx if s is None else st.xtx / np.outer(s, s)

    corrector.spectrum = spectrum
    corrector.gram = gram
    info = {"method": "whitened correction of the quantisation error",
            "inputs": len(set(input_names))}
    if c is not None:
        info.update(c.describe())
    return corrector, info


def sequential_correction(model: ir.Model, spec, c: Calibration, select=None, *,
                          progress=None, chooser=None):
    """``(QuantizePass, info)`` with the sequential correction computed
    (:func:`lrc.calibration.sequential.sequential_quant`: each group quantised and corrected
    on the inputs the already quantised model produces, its target fitted to the original
    outputs); running the pass on ``model`` writes it. ``model``: as it will be quantised
    (smoothed first, if at all); ``c.damp`` damps the fitted targets towards the weights.
    ``chooser``: a QuantizePass whose :meth:`~lrc.graph.passes.quant.QuantizePass.plan`
    made target-size's choices (on the one-shot statistics and probe): those are solved."""
    from lrc.calibration.sequential import sequential_quant
    from lrc.graph.passes.quant import QuantizePass

    grams: dict = {}
    corrector, info = make_corrector([], stats=grams)
    qpass = QuantizePass(spec, corrector, select=select, weights={})
    if chooser is not None:
        qpass.planned, qpass.record = chooser.planned, chooser.record
    st = sequential_quant(model, qpass, grams, c.batches(), model_path=c.ref, damp=c.damp,
                          progress=progress)
    info = {"method": "sequential whitened correction (quantised and corrected stage by stage "
                      "on the quantised model's own inputs)",
            "inputs": len(grams), "tokens": st.tokens, "seq_len": c.seq_len, "damp": c.damp,
            "sources": c.sources,
            **{k: v for k, v in st.to_dict().items() if k not in ("per_target", "tokens")}}
    return qpass, info


__all__ = ["AUTO", "METHODS", "STATISTICS", "AsvdSettings", "Calibration", "Method",
           "UpdateSettings", "calibration_texts", "settings_classes",
           "check", "choices", "get", "make_calibration", "make_corrector", "make_factoriser",
           "method_help", "register", "resolve", "sequential_correction", "statistics",
           "with_update"]
