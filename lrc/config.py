"""What ``lrc compress`` / ``lrc.compress`` is told: one nested config that checks itself, and
the one source of the command line's options.

:class:`CompressConfig` holds one sub-config per concern:

* ``lowrank`` (:class:`LowRankConfig`): which projections are factorised and at which rank
  (rank / energy / ratio, include / exclude, a policy file, grouping, dense edge blocks, the
  tied head, the recipe that fills what is left unset);
* ``budget`` (:class:`BudgetConfig`): a global budget solved into a ratio instead;
* ``algorithm`` (:class:`MethodConfig`): the factorisation method (:mod:`lrc.methods`), the
  sequential update, and each method's own settings class (``settings``: ASVD's ``alpha``, the
  update's ``update_damp``), as ONNX Runtime's weight quantiser has one config class per
  algorithm;
* ``calibration`` (:class:`CalibrationConfig`): the texts (or input files) and the tokenizer;
* ``factors`` (:class:`FactorsConfig`): low-rank factors stored as int8;
* ``quant`` (:class:`QuantConfig`): quantisation with a low-rank correction of its error
  (:mod:`lrc.graph.passes.quant` turns it into the pass's :class:`QuantSpec`);
* ``output`` (:class:`OutputConfig`): where and how the result is written, ONNX Runtime's
  quantisers on what is left dense, or a dry run.

Every leaf is an option with one name, the same in Python (``lrc.compress(m, calib_tokens=0)``)
and on the command line (``--calib-tokens 0``; :data:`FLAGS` is the one table from names to
flags, built from each field's metadata). :meth:`CompressConfig.with_options` sets options by
name (an unknown name is an error naming the nearest one) and :meth:`CompressConfig.check`
runs every check before any work; messages name options with :func:`lrc.errors.opt`, so the
command line shows its flags and Python its keywords. ``lrc compress``'s options are generated
from these fields (:mod:`lrc.cli`): a new option is a field here (or in a method's settings
class) and its check.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from lrc import methods
from lrc.errors import ConfigError, LrcError, opt
from lrc.fields import option
from lrc.graph.policy import Policy
from lrc.quantmath import BASE_QUANTIZERS


def _check_files(name: str, files, *, folders: bool = False) -> None:
    """Each of ``files`` exists (a file; or a folder too, with ``folders``)."""
    for f in files:
        if not (Path(f).exists() if folders else Path(f).is_file()):
            raise ConfigError(f"{opt(name, repr(str(f)))}: "
                              f"{'no such file or folder' if folders else 'file not found'}",
                              name)


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{opt(name)} must be one of {', '.join(map(str, choices))}, got "
                          f"{value!r}", name)


def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{opt(name)} must be {'non-negative' if allow_zero else 'positive'}"
                          f"{' (an integer)' if integer else ''}, got {value!r}", name)


DEFAULT_SIZE = 1.2  # recipe best's size for a bare --quantize int4 on an LM: x the int4 form


def relative_size(v) -> float | None:
    """``N`` of a size written ``Nx`` (a positive multiple of the model's int4 form), else
    None."""
    if not isinstance(v, str) or not v.strip().lower().endswith("x"):
        return None
    try:
        n = float(v.strip()[:-1])
    except ValueError:
        return None
    return n if n > 0 else None


def _number_or_word(v):
    """A value that is a number or a word (target-size's ``Nx``, decode-budget's ``off``):
    text that reads as a number becomes one, a word is kept, lowercased."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v.strip().lower()
    return v


def _time_budget(help: str):
    """target-size's time budgets (decode, prefill): a multiple of plain int4's time, or off."""
    return option(kind="str", metavar="X|off", also=(int, float),
                  parse=lambda v: _number_or_word(v), help=help)


# ----------------------------------------------------------------------------------- recipes

RECIPES = {
    "best": "the data-aware recipe measured best on both bundled models (BENCHMARKS.md, "
            "benchmarks/allocation.md): projections reading one tensor factored jointly "
            "(group_inputs), the first and last blocks dense (dense_edges, models of 6+ "
            "blocks), the joint update (update, svd-llm); a tied head left dense; quantize "
            "with a target-size given: the sequential correction (update); a bare "
            "quantize int4 (no correction, block size, base quantiser, A bits, embedding or "
            f"smoothing given) on a language model with calibration text: target-size "
            f"{DEFAULT_SIZE:g}x",
    "plain": "each option as given (no grouping, no dense blocks, no update); a tied head is "
             "factorised like any projection",
}
TIED_HEAD = ("dense", "factor")


@dataclass
class LowRankConfig:
    """Which projections are factorised, and at which rank."""

    rank: int | str | None = option(
        help="Rank of every factorised matrix, or 'full'.", metavar="N|full", also=(int,),
        parse=lambda v: int(v) if isinstance(v, str) and v.strip().isdigit() else v)
    energy: float | None = option(help="Keep this fraction of spectral energy (0-1].",
                                  kind="float")
    ratio: float | None = option(help="Fraction of each matrix's parameters kept (0-1].",
                                 kind="float")
    include: list = option(factory=list, multiple=True, help="Roles/groups/name globs to "
                           "factorise (comma-separated or repeated), e.g. ffn or '*q_proj*'.")
    exclude: list = option(factory=list, multiple=True,
                           help="Roles/groups/name globs to leave dense.")
    policy: Any = option(kind="path", help="YAML/JSON policy file (per-role/block overrides).",
                         also=(Policy,))
    align: int = option(1, kind="int", help="Round ratio/energy ranks down to a multiple of this.")
    allow_larger: bool = option(False, kind="bool", help="Rewrite even when the factors do not "
                                "shrink a matrix.")
    group_inputs: bool | None = option(
        kind="bool", negatable=True, help="Factor projections that read the same tensor "
        "(Q/K/V, gate/up) jointly: one shared A, one B each; higher rank at the same "
        "parameters. Default: on for data-aware methods (recipe best).")
    dense_edges: bool | None = option(
        kind="bool", negatable=True, help="Leave the first and last transformer blocks dense "
        "(at the same total parameters this beat a uniform ratio on both bundled models: "
        "benchmarks/allocation.md). With target-params the cut goes to the other blocks; with "
        "ratio the others keep that ratio and the total grows. Default: on for data-aware "
        "methods on models of 6+ blocks (recipe best).")
    tied_head: str | None = option(
        choices=lambda: list(TIED_HEAD), help="A head tied to the embedding: dense (left as "
        "it is; its factors would add bytes) or factor. Default: dense under recipe best, "
        "unless include names the head or a policy file is given.")
    recipe: str = option("best", choices=lambda: list(RECIPES), help="Defaults for "
                         "group-inputs, dense-edges, update, tied-head and a bare quantize "
                         "int4's size: best (data-aware methods: grouped, edge blocks dense, "
                         "the joint update; a tied head left dense; quantize int4 alone on a "
                         f"language model: target-size {DEFAULT_SIZE:g}x) or plain (none of "
                         "it). Options given explicitly win.")

    def validate(self) -> None:
        _one_of("recipe", self.recipe, RECIPES)
        if self.tied_head is not None:
            _one_of("tied_head", self.tied_head, TIED_HEAD)
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ConfigError(f"{opt('align')} must be a positive integer, got {self.align!r}",
                              "align")
        if self.policy is not None and not hasattr(self.policy, "default"):
            _check_files("policy", [self.policy])
        self.build()  # rank / energy / ratio, selectors, the policy file

    def build(self):
        """The :class:`~lrc.graph.policy.Policy` these options describe."""
        from lrc.graph.plan import build_policy

        exclude = list(self.exclude or [])
        if self.tied_head == "dense" and "head" not in exclude:
            exclude.append("head")
        return build_policy(rank=self.rank, energy=self.energy, ratio=self.ratio,
                            include=self.include, exclude=exclude, policy=self.policy,
                            align=self.align, allow_larger=self.allow_larger,
                            group_inputs=bool(self.group_inputs),
                            dense_edges=bool(self.dense_edges))

    @property
    def given(self) -> bool:
        """A rank, energy, ratio or policy file was given."""
        return any(v is not None for v in (self.rank, self.energy, self.ratio, self.policy))


@dataclass
class BudgetConfig:
    """A global budget, solved into one ratio for the selected projections."""

    target_params: float | None = option(
        kind="float", help="Keep this fraction of all projection parameters, ranks spread "
        "uniformly over the selected ones.")
    target_size: float | str | None = option(
        kind="str", metavar="MB|Nx", also=(int, float), parse=lambda v: _number_or_word(v),
        help="Target weight size in MB; with quantize also Nx: N times the model in int4 "
             "blocks of 32 with an int4 table (the builder's int4 form), e.g. 1.2x. Default "
             f"with quantize int4 and nothing else of its recipe given, on a language model "
             f"with calibration text: {DEFAULT_SIZE:g}x (recipe best).")
    decode_budget: float | str | None = _time_budget(
        "With target-size and quantize for ONNX Runtime: the weight MatMuls of one "
        "decoded token may take at most X times what plain 4-bit codes in blocks of 32 "
        "(the builder's int4) take, predicted from per-node times measured once on this "
        "machine's CPU (a correction costs two nodes); off (the default): bytes alone.")
    prefill_budget: float | str | None = _time_budget(
        "As decode-budget, over a 128-token prompt, where ONNX Runtime's kernels are "
        "bound by arithmetic: a correction's two extra nodes cost 9-23 % of its "
        "group's time there and 8-bit codes ~1.4x 4-bit ones, blocks of 128 less than "
        "32; 1 asks for prefill no slower than the builder's int4, below 1 faster "
        "(blocks of 64 / 128 where the rows divide). Off by default.")
    target_speedup: float | None = option(
        kind="float", help="Keep the projection parameters an ORT-profiled Amdahl model says "
        "give this speedup (an upper estimate).")
    ep: str = option("cpu", help="Execution provider target-speedup's profile runs on.")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.target_params, self.target_size,
                                           self.target_speedup))

    def validate(self) -> None:
        given = [k for k in ("target_params", "target_size", "target_speedup")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"give one budget: {opt('target_params')}, {opt('target_size')} "
                              f"or {opt('target_speedup')}", given[1])
        if self.target_params is not None and not (
                isinstance(self.target_params, (int, float)) and 0 < self.target_params <= 1):
            raise ConfigError(f"{opt('target_params')} must be in (0, 1], got "
                              f"{self.target_params!r}", "target_params")
        if isinstance(self.target_size, str):
            if relative_size(self.target_size) is None:
                raise ConfigError(f"{opt('target_size')} must be MB or a multiple of the int4 "
                                  f"form such as 1.2x, got {self.target_size!r}", "target_size")
        elif self.target_size is not None:
            _positive("target_size", self.target_size)
        for name in ("decode_budget", "prefill_budget"):
            v = getattr(self, name)
            if v is not None and v != "off" and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"{opt(name)} must be a positive multiple of plain int4's "
                                  f"time, or off, got {v!r}", name)
        if self.target_speedup is not None and not (
                isinstance(self.target_speedup, (int, float)) and self.target_speedup > 1):
            raise ConfigError(f"{opt('target_speedup')} must be > 1, got "
                              f"{self.target_speedup!r}", "target_speedup")
        from lrc.runtime.providers import lookup

        lookup(self.ep)


@dataclass
class MethodConfig:
    """The factorisation method and its settings (one settings class per method that has
    any: :func:`lrc.methods.settings_classes`)."""

    method: str = option("auto", choices=methods.choices, help=methods.method_help())
    update: bool | None = option(
        kind="bool", negatable=True, help="svd-llm only (default on with recipe best, and "
        "for quantize with a target-size given): fit "
        "each projection to the inputs the already-compressed model produces (two forward "
        "passes over the calibration text; see BENCHMARKS.md for what it buys). With quantize "
        "(no rank): the sequential correction, quantised and corrected stage by stage (with "
        "target-size: the choices it makes on the original model).")
    settings: dict = field(default_factory=lambda: {
        name: cls() for name, cls in methods.settings_classes().items()})

    def validate(self) -> None:
        methods.check(self.method, update=bool(self.update))
        for name, s in self.settings.items():
            owner = methods.get(name)
            for f in fields(s):
                value = getattr(s, f.name)
                _positive(f.name, value)
                # a setting given for a method that will not run is a mistake, not a no-op
                applies = (name == self.method
                           or (owner.update_of is not None and self.update is not False))
                if value != f.default and not applies:
                    raise ConfigError(
                        f"{opt(f.name)} is a setting of method {name}: not with "
                        + (f"{opt('update')} off" if owner.update_of is not None else
                           f"{opt('method', self.method)}"), f.name)

    def setting(self, key: str):
        for s in self.settings.values():
            if hasattr(s, key):
                return getattr(s, key)
        raise KeyError(key)


@dataclass
class CalibrationConfig:
    """What data-aware methods calibrate on."""

    calib: list = option(factory=list, kind="path", multiple=True,
                         help="Your own calibration text file(s), added to the bundled mix.")
    calib_tokens: int = option(16384, kind="int", help="Calibration tokens.")
    calib_seq: int = option(256, kind="int", help="Tokens per calibration window.")
    calib_only: bool = option(False, kind="bool", help="Calibrate on calib files only (no "
                              "bundled mix).")
    tokenizer: Any = option(kind="path", help="tokenizer.json (or its folder) for calibration "
                            "when none is beside MODEL.")
    calib_inputs: list = option(
        factory=list, kind="path", multiple=True, help="Calibrate on these .npz files (or "
        "folders of them) of named input tensors instead of text: any model, e.g. "
        "pixel_values 1x3x224x224 for a vision transformer. One batch per file "
        "(numpy.savez); repeat the option for several.")

    def validate(self) -> None:
        _positive("calib_tokens", self.calib_tokens, integer=True)
        _positive("calib_seq", self.calib_seq, integer=True)
        if self.calib_seq < 2:
            raise ConfigError(f"{opt('calib_seq')} must be at least 2, got {self.calib_seq}",
                              "calib_seq")
        if self.calib_only and not self.calib:
            raise ConfigError(f"{opt('calib_only')} needs at least one {opt('calib')} file",
                              "calib_only")
        _check_files("calib", self.calib)
        if self.calib_inputs and (self.calib or self.tokenizer is not None):
            raise ConfigError(f"{opt('calib_inputs')} replaces the calibration text: not with "
                              f"{opt('calib')} or {opt('tokenizer')}", "calib_inputs")
        _check_files("calib_inputs", self.calib_inputs, folders=True)
        if self.tokenizer is not None:
            from lrc.modelref import tokenizer_file

            tokenizer_file(self.tokenizer)


def _int8_forms() -> list[str]:
    from lrc.graph.passes.int8 import FORMS

    return list(FORMS)


def _forms_help() -> str:
    from lrc.graph.passes.int8 import forms_help

    return forms_help()


@dataclass
class FactorsConfig:
    """How low-rank factors are stored."""

    int8: bool = option(False, kind="bool", help="Store the factors as INT8 (per-channel).")
    int8_form: str = option("dynamic", choices=_int8_forms, help=_forms_help())

    def validate(self) -> None:
        _one_of("int8_form", self.int8_form, _int8_forms())


def _schemes() -> list[str]:
    from lrc.graph.passes.quant import SCHEMES

    return list(SCHEMES)


def _alpha(v):
    """smooth's value: a number, or the word auto."""
    if isinstance(v, str) and v.strip() != "auto":
        try:
            return float(v)
        except ValueError:
            return v
    return v.strip() if isinstance(v, str) else v


def _base_quantizers() -> dict:
    return BASE_QUANTIZERS


def _targets() -> list[str]:
    from lrc.runtime.runtimes import target_names

    return target_names()


@dataclass
class QuantConfig:
    """Quantisation of the weight MatMuls into a runtime's own forms, with a whitened low-rank
    correction of the error (:mod:`lrc.graph.passes.quant`)."""

    quantize: str | None = option(
        metavar="SCHEME[,SEL=SCHEME]", help="Quantise the weight MatMuls (all, or those "
        "include / exclude select) into the target runtime's forms: int4 (4-bit, "
        "block-wise), int8-weight (8-bit weight-only) or int8 (INT8 dynamic); per-node "
        "overrides after a comma: int4,head=int8-weight. Without rank/ratio/energy no low "
        "rank is applied.")
    block_size: int | str | None = option(
        metavar="B[,SEL=B]", kind="str", also=(int,),
        parse=lambda v: int(v) if str(v).isdigit() else v,
        help="Block size of block-wise codes (a power of two >= 16; default 32); per-node "
             "overrides after a comma: 32,ffn.up=128 (roles, groups or name globs; a corrected "
             "group keeps one).")
    accuracy_level: int = option(4, kind="int", help="MatMulNBits accuracy_level: 4 = int8 "
                                 "compute (fast CPU path), 0 = float compute.")
    correct_rank: int | str | None = option(
        metavar="R[,SEL=R]", kind="str", also=(int,), help="Rank of the whitened low-rank "
        "correction of the quantisation error (default 0: none; but a bare quantize int4 on a "
        "language model is target-size 1.2x under recipe best); Q/K/V and gate/up share one. "
        "Per-node overrides after a comma: 32,head=128,ffn.down=64 (roles, groups or name "
        "globs). 'auto': ranks in whole blocks where the whitened error spectrum gains most per byte, under correct-budget "
        "(so far worse than uniform: BENCHMARKS.md).")
    base_quant: str | None = option(
        choices=lambda: list(_base_quantizers()),
        help="How the block-wise codes are chosen before the correction corrects them "
             "(default rtn; gptq with target-size): " + "; ".join(
                 f"{q.name} ({q.help})" for q in BASE_QUANTIZERS.values()) + ".")
    correct_a_bits: int | None = option(
        kind="int", choices=lambda: ["32", "8", "4"],
        help="The concat form's A factor (X·A, once per input): 32 (float), or 8 / 4 (a "
             "quantised MatMul in the target's form, B refitted to it by least squares on the "
             "whitened error): a rank-32 float A is ~10 MB of SmolLM2's 104 (default 32; 4 "
             "with target-size).")
    correct_form: str = option("concat", choices=lambda: ["concat", "add"], help="concat: the "
                               "correction rides inside each quantised MatMul (fast); add: a "
                               "float branch added to its output (reference).")
    correct_budget: float | None = option(
        kind="float", metavar="MB", help="MB the correction may add with correct-rank auto "
        "(default: what a uniform rank 32 costs).")
    embedding: str | None = option(
        choices=lambda: ["int8", "int4", "float"], help="With quantize: store large embedding "
        "tables as int8 or int4 (rows in blocks; a tied head's int4 table shares its codes), "
        "or keep them float (default int8; int4 with target-size).")
    smooth: float | str = option(
        0.0, metavar="ALPHA|auto", also=(int, float), parse=_alpha, help="With quantize: "
        "SmoothQuant's alpha (e.g. 0.5): move activation outliers into the weights, folded into "
        "the norms / up projections (no node added). Helps int8 (per-tensor activations); 0 = "
        "off. auto: AWQ, the exponent searched per input on the output error of the weight "
        "codes (int4 / int8-weight).")
    scales: str = option(
        "float16", choices=lambda: ["float16", "float32"], help="How a float32 model's "
        "MatMulNBits / GatherBlockQuantized block scales are stored: float16 (half their bytes "
        "on disk, 0.5 bit per 4-bit weight in blocks of 32; a Cast back to float32 that ONNX "
        "Runtime folds when it loads the model, so its kernels run as before) or float32 (as "
        "ONNX Runtime's quantisers and the GenAI builder write them).")
    target_runtime: str = option(
        "ort", choices=_targets, help="The runtime OUT is for, or any (what every runtime lrc "
        "knows runs): each runtime declares the quantised forms it runs "
        "(lrc.runtime.runtimes), those are written; what the target cannot run is refused, "
        "and OUT is loaded on it when it is installed.")

    def validate(self) -> None:
        _one_of("target_runtime", self.target_runtime, _targets())
        _one_of("correct_form", self.correct_form, ["concat", "add"])
        _one_of("scales", self.scales, ["float16", "float32"])
        for name, value, choices in (
                ("base_quant", self.base_quant, list(_base_quantizers())),
                ("embedding", self.embedding, ["int8", "int4", "float"]),
                ("correct_a_bits", self.correct_a_bits, [32, 8, 4])):
            if value is not None:
                _one_of(name, value, choices)
        try:  # the block sizes, given with or without quantize
            parse_spec("int4", "0", block_size=self.block_size)
        except LrcError as e:
            raise ConfigError(e.args[0], "block_size") from None
        if self.quantize is None:
            if str(self.correct_rank or 0) not in ("0", ""):
                raise ConfigError(f"{opt('correct_rank')} corrects quantisation error: give "
                                  f"{opt('quantize')} too", "correct_rank")
            if self.smooth:
                raise ConfigError(f"{opt('smooth')} goes with {opt('quantize')}", "smooth")
            if self.correct_budget is not None:
                raise ConfigError(f"{opt('correct_budget')} goes with {opt('quantize')} and "
                                  f"{opt('correct_rank', 'auto')}", "correct_budget")
        if self.smooth == "auto":
            if self.quantize is not None and "int8" in self.quantize.replace("=", ",").split(","):
                raise ConfigError(f"{opt('smooth', 'auto')} searches the weight codes' error: "
                                  f"not for int8 (dynamic: give {opt('smooth')} an alpha)",
                                  "smooth")
        elif self.smooth and not (isinstance(self.smooth, (int, float)) and 0 < self.smooth < 1):
            raise ConfigError(f"{opt('smooth')} must be between 0 and 1 (SmoothQuant's alpha), "
                              f"got {self.smooth}", "smooth")
        self.spec()

    def resolved(self, sized: bool = False) -> dict:
        """The options left unset, filled: the plain recipe's defaults, or with ``sized``
        (target-size's allocator) the ones that win at small sizes, measured on the builder's
        SmolLM2 (BENCHMARKS.md): GPTQ's codes, a 4-bit A, the int4 embedding sharing the tied
        head's codes (an int8 table alone is 28 of SmolLM2's 88 MB)."""
        return {"base_quant": self.base_quant or ("gptq" if sized else "rtn"),
                "correct_a_bits": self.correct_a_bits or (4 if sized else 32),
                "embedding": self.embedding or ("int4" if sized else "int8")}

    def spec(self, sized: bool = False):
        """The pass's :class:`~lrc.graph.passes.quant.QuantSpec` (None without quantize);
        ``sized``: for target-size's allocator (:meth:`resolved`)."""
        if self.quantize is None:
            return None
        from lrc.runtime.runtimes import target_forms

        r = self.resolved(sized)
        return parse_spec(self.quantize, self.correct_rank, block_size=self.block_size,
                          accuracy_level=self.accuracy_level, correct_form=self.correct_form,
                          embedding=r["embedding"], budget_mb=self.correct_budget,
                          target=self.target_runtime, forms=target_forms(self.target_runtime),
                          base=r["base_quant"], correct_a_bits=r["correct_a_bits"],
                          scales=self.scales)


def parse_spec(quantize: str, correct_rank="0", **kw):
    """The pass's :class:`~lrc.graph.passes.quant.QuantSpec` from the options as written:
    ``quantize="int4,head=int8-weight"`` and ``correct_rank="32,head=128,ffn.down=64"``, a
    default and ``SELECTOR=VALUE`` overrides (a role, a group or a name glob); the pass gets
    them parsed (schemes, integer ranks, the overrides as tuples)."""
    def split(value, what):
        default, over = None, []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                sel, _, v = part.partition("=")
                over.append((sel.strip(), v.strip()))
            elif default is None:
                default = part
            else:
                raise LrcError(f"{what}: one default value and SELECTOR=VALUE overrides, "
                               f"got {value!r}")
        return default, over

    def rank_of(v, where):
        try:
            return int(v)
        except ValueError:
            raise LrcError(f"{opt('correct_rank', where)} must be an integer, got {v!r}") \
                from None

    def block_of(v, where):
        from lrc.quantmath import valid_block_size

        try:
            b = int(v)
        except ValueError:
            b = None
        if b is None or not valid_block_size(b):
            what = opt("block_size", where) if where else opt("block_size")
            raise LrcError(f"{what} must be a power of two >= 16, got {v!r}")
        return b

    if "block_size" in kw:
        block, b_over = split(32 if kw["block_size"] is None else kw["block_size"],
                              opt("block_size"))
        kw["block_size"] = block_of(block or "32", "")
        kw["blocks"] = tuple((sel, block_of(v, f"{sel}=")) for sel, v in b_over)
    scheme, s_over = split(quantize, opt("quantize"))
    rank, r_over = split(correct_rank if correct_rank is not None else "0", opt("correct_rank"))
    overrides = tuple([(sel, v, None) for sel, v in s_over]
                      + [(sel, None, rank_of(v, f"{sel}=")) for sel, v in r_over])
    auto = rank == "auto"
    if not auto and kw.get("budget_mb") is not None:
        raise LrcError(f"{opt('correct_budget')} goes with {opt('correct_rank', 'auto')}")
    from lrc.graph.passes.quant import AUTO_RANK, QuantSpec

    return QuantSpec(scheme or "int4", correct_rank=AUTO_RANK if auto else rank_of(rank or "0", ""),
                     overrides=overrides, auto=auto, **kw)


@dataclass
class OutputConfig:
    """Where and how the result is written."""

    out: Any = option(kind="path", flag="--output", short="-o", help="Output .onnx (or folder); "
                      "default MODEL-lrc.onnx / MODEL-lrc. In Python: write there instead of "
                      "returning the model.")
    external_data: bool = option(False, kind="bool", help="Write weights to OUT.data "
                                 "(automatic above 2 GB).")
    force: bool = option(False, kind="bool", help="Overwrite OUT.")
    check: bool = option(True, kind="bool", negatable=True, help="Run the onnx checker and an "
                         "ORT session on the output.")
    quantize_rest: str | None = option(
        choices=lambda: ["int8", "int4"], help="Then quantise the projections left dense with "
        "ONNX Runtime: int8 (quantize_dynamic, per-channel; fastest on the CPU EP) or int4 "
        "(MatMulNBits, block 32; CPU and CUDA). lrc's factors are left as they are (add int8 "
        "to store them as int8 too).")
    dry_run: bool = option(False, kind="bool", help="Check everything and show the plan "
                           "(model, method, recipe, what each projection gets), write nothing.")

    def validate(self) -> None:
        if self.quantize_rest is not None:
            _one_of("quantize_rest", self.quantize_rest, ["int8", "int4"])
        if self.out is not None and not Path(self.out).resolve().parent.is_dir():
            raise ConfigError(f"{opt('out', repr(str(self.out)))}: its folder "
                              f"{str(Path(self.out).resolve().parent)!r} does not exist", "out")


@dataclass
class CompressConfig:
    """Everything ``lrc compress`` / ``lrc.compress`` is told (defaults are the command line's);
    see the module docstring. Build one with :meth:`of` (options by name)."""

    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    algorithm: MethodConfig = field(default_factory=MethodConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    factors: FactorsConfig = field(default_factory=FactorsConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    factorizer: object = option(cli=False, why_not_cli="a ready factoriser object (lrc tune's "
                                "truncations of one calibration)", help="A ready factoriser: "
                                "no statistics phase.")

    # ---------------------------------------------------------------- by name
    @classmethod
    def of(cls, **options) -> "CompressConfig":
        """A config with ``options`` set by name (see :meth:`with_options`)."""
        return cls().with_options(**options)

    def with_options(self, **options) -> "CompressConfig":
        """A copy with ``options`` set by name (``rank=64``, ``calib_tokens=2048``, ...); an
        unknown name is a :class:`~lrc.errors.ConfigError` naming the nearest option. Values
        are taken as given; :meth:`check` judges them."""
        new = copy_config(self)
        index = {name: where for name, where, _ in leaves(new)}
        for key, value in options.items():
            if key not in index:
                near = difflib.get_close_matches(key, list(index), n=1, cutoff=0.5)
                raise ConfigError(f"unknown option {key!r}" + (
                    f"; did you mean {opt(near[0])}?" if near else
                    f"; options: {', '.join(sorted(index))}"), near[0] if near else None)
            owner, attr = index[key]
            setattr(owner, attr, _normalised(key, value))
        return new

    def get(self, key: str):
        for name, (owner, attr), _ in leaves(self):
            if name == key:
                return getattr(owner, attr)
        raise KeyError(key)

    # ---------------------------------------------------------------- checks
    def validate(self) -> "CompressConfig":
        """Every check of the options, before any work: each value's type, each sub-config's
        checks, then the ones across them. Returns self; ConfigError (one line) on the first
        problem."""
        _check_types(self)
        for part in (self.lowrank, self.budget, self.algorithm, self.calibration, self.factors,
                     self.quant, self.output):
            part.validate()
        if self.budget.given and any(v is not None for v in (
                self.lowrank.rank, self.lowrank.energy, self.lowrank.ratio)):
            raise ConfigError(f"give either a budget ({opt('target_params')}/"
                              f"{opt('target_size')}/{opt('target_speedup')}) or {opt('rank')}/"
                              f"{opt('energy')}/{opt('ratio')}, not both", "target_params")
        if relative_size(self.budget.target_size) is not None and not self.size_allocated:
            raise ConfigError(f"{opt('target_size', self.budget.target_size)} is relative to "
                              f"the model's int4 form: it goes with {opt('quantize')} and no "
                              f"rank / ratio / energy (give MB otherwise)", "target_size")
        q, rest = self.quant.quantize, self.output.quantize_rest
        if rest and self.quant.target_runtime != "ort":
            raise ConfigError(f"{opt('quantize_rest')} writes ONNX Runtime's own ops: not for "
                              f"{opt('target_runtime', self.quant.target_runtime)} (use "
                              f"{opt('quantize', 'int8-weight')} or int8)", "quantize_rest")
        if q and (rest or self.factors.int8):
            raise ConfigError(f"{opt('quantize')} quantises every weight MatMul, lrc's factors "
                              f"included: drop {opt('quantize_rest') if rest else opt('int8')}",
                              "quantize_rest" if rest else "int8")
        if self.size_allocated:
            given = [k for k, v in (("correct_rank", str(self.quant.correct_rank or 0) != "0"),
                                    ("correct_budget", self.quant.correct_budget is not None))
                     if v]
            if given:
                raise ConfigError(f"{opt('target_size')} with {opt('quantize')} chooses the "
                                  f"bits, block sizes and correction ranks itself: drop "
                                  f"{opt(given[0])}", given[0])
        if not self.bare_int4:  # a bare int4 may be sized by the recipe: checked once applied
            self.check_decode_budget()
        if self.factorizer is not None and self.calibration.calib_inputs:
            raise ConfigError(f"{opt('factorizer')} is ready: no {opt('calib_inputs')}",
                              "factorizer")
        return self

    @property
    def bare_int4(self) -> bool:
        """quantize int4 with nothing else of the quantisation recipe given (what recipe best
        sizes on a language model with calibration text: lrc.pipeline)."""
        q = self.quant
        return (q.quantize == "int4" and not self.lowrank.given and not self.budget.given
                and self.factorizer is None and not self.calibration.calib_inputs
                and not q.smooth and not self.algorithm.update
                and all(v is None for v in (q.correct_rank, q.block_size, q.base_quant,
                                            q.correct_a_bits, q.embedding, q.correct_budget)))

    def check_decode_budget(self) -> None:
        """decode-budget and prefill-budget are target-size's time budgets: one line without
        it."""
        for name in ("decode_budget", "prefill_budget"):
            v = getattr(self.budget, name)
            if v is not None and not self.size_allocated:
                raise ConfigError(f"{opt(name)} goes with {opt('quantize')} and "
                                  f"{opt('target_size')} (a budget of the allocator's; a bare "
                                  f"{opt('quantize', 'int4')} has one only on a language model "
                                  f"with calibration text)", name)
            if v not in (None, "off") and self.quant.target_runtime != "ort":
                raise ConfigError(f"{opt(name)} prices ONNX Runtime's CPU kernels: not "
                                  f"for {opt('target_runtime', self.quant.target_runtime)}",
                                  name)

    @property
    def lowrank_asked(self) -> bool:
        """Whether low rank is asked for: always without quantize; with it, only when a rank,
        energy, ratio, policy file or a budget other than the allocator's is given."""
        return (self.quant.quantize is None or self.lowrank.given
                or (self.budget.given and not self.size_allocated))

    @property
    def size_allocated(self) -> bool:
        """quantize with target-size and no low rank: bits, block size and correction rank
        are chosen per group to fit the size (:func:`lrc.allocate.allocate`)."""
        return (self.quant.quantize is not None and self.budget.target_size is not None
                and not self.lowrank.given)

    def quant_spec(self):
        """The quantisation pass's spec (None without quantize), with the allocator's budget
        when :attr:`size_allocated`."""
        spec = self.quant.spec(sized=self.size_allocated)
        if spec is None or not self.size_allocated:
            return spec
        from dataclasses import replace

        from lrc.graph.passes.quant import AUTO_RANK

        # the decode budget is off unless given: at 1.1 it cost SmolLM2's default (1.2x)
        # x1.068 -> x1.107 on news for 1-2 % of decode (BENCHMARKS.md, genai_builder --tag decode)
        decode, prefill = (None if v in (None, "off") else float(v)
                           for v in (self.budget.decode_budget, self.budget.prefill_budget))
        size = self.budget.target_size
        # ``Nx`` is MB once the model is known (lrc.pipeline._resolve_size, on the run's copy of
        # the config); the user's config keeps ``Nx`` (what the modifiers read after the write)
        return replace(spec, target_mb=None if relative_size(size) is not None else float(size),
                       correct_rank=AUTO_RANK, decode_budget=decode, prefill_budget=prefill)

    def to_dict(self) -> dict:
        """The options by name (JSON-ready; a ready object shown by its type)."""
        out = {}
        for name, (owner, attr), _ in leaves(self):
            v = getattr(owner, attr)
            if isinstance(v, (list, tuple)):
                v = [str(x) if isinstance(x, os.PathLike) else x for x in v]
            elif isinstance(v, os.PathLike):
                v = str(v)
            elif v is not None and not isinstance(v, (str, int, float, bool)):
                v = f"<{type(v).__name__}>"
            out[name] = v
        return out


_KINDS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,),
          "path": (str, os.PathLike)}
_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text",
          "path": "a path"}


def _check_types(config: CompressConfig) -> None:
    """Each option's value is of its kind (a bool where true / false is meant, not a string;
    an integer count...): what the command line's parser guarantees, checked for Python."""
    for name, (owner, attr), f in leaves(config):
        md = f.metadata
        if not md or not md.get("cli", True):
            continue
        v = getattr(owner, attr)
        if v is None and default_of(f) is None or (v is None and md.get("negatable")):
            continue
        kinds = _KINDS[md["kind"]] + tuple(md.get("also") or ())
        if md.get("multiple"):
            ok = isinstance(v, list) and all(isinstance(x, kinds) for x in v)
        else:
            ok = isinstance(v, kinds) and (md["kind"] == "bool" or not isinstance(v, bool))
        if not ok:
            what = (_WORDS[md["kind"]] + "".join(f" or {_WORDS[k]}" for k, t in _KINDS.items()
                                                 if t == tuple(md.get("also") or ()))
                    + (" (or a list of them)" if md.get("multiple") else ""))
            raise ConfigError(f"{opt(name)} must be {what}, got {v!r}", name)


def _normalised(key: str, value):
    """Lists for the repeatable options (one value, a tuple, or a comma-separated string);
    an option's canonical value where it has a parser."""
    meta = FIELDS[key].metadata if key in FIELDS else {}
    if meta.get("parse") is not None and value is not None:
        value = meta["parse"](value)
    if meta.get("multiple"):
        if value is None:
            return []
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        out = []
        for v in value:
            if meta.get("kind") == "str" and isinstance(v, str):
                out.extend(s.strip() for s in v.split(",") if s.strip())
            else:
                out.append(v)
        return out
    return value


def copy_config(c):
    """A deep copy of a config's dataclasses (values themselves shared)."""
    if is_dataclass(c):
        return replace(c, **{f.name: copy_config(getattr(c, f.name)) for f in fields(c)
                             if f.init})
    if isinstance(c, dict):
        return {k: copy_config(v) for k, v in c.items()}
    if isinstance(c, list):
        return list(c)
    return c


def leaves(c: CompressConfig | None = None) -> Iterator[tuple[str, tuple[Any, str], Any]]:
    """Every option of a config: ``(name, (owner object, attribute), dataclass field)``, in
    declaration order; method settings under their own names."""
    c = c if c is not None else CompressConfig()

    def walk(obj):
        for f in fields(obj):
            v = getattr(obj, f.name)
            if f.name == "settings" and isinstance(v, dict):
                for s in v.values():
                    for sf in fields(s):
                        yield sf.name, (s, sf.name), sf
            elif is_dataclass(v) and not f.metadata:
                yield from walk(v)
            else:
                yield f.name, (obj, f.name), f

    yield from walk(c)


FIELDS: dict[str, Any] = {name: f for name, _, f in leaves()}


def flag_of(name: str) -> str:
    """The command line's flag of option ``name`` (the one table: each field's metadata)."""
    f = FIELDS.get(name)
    flag = f.metadata.get("flag") if f is not None else None
    return flag or "--" + name.replace("_", "-")


FLAGS: dict[str, str] = {name: flag_of(name) for name in FIELDS}


def cli_style(name: str, value: str | None) -> str:
    """:func:`lrc.errors.set_option_style` for the command line: options as their flags."""
    flag = FLAGS.get(name) or "--" + name.replace("_", "-")
    return flag if value is None else f"{flag} {value}"


def default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


__all__ = ["BudgetConfig", "CalibrationConfig", "CompressConfig", "FLAGS", "FIELDS",
           "FactorsConfig", "LowRankConfig", "MethodConfig", "OutputConfig", "QuantConfig",
           "RECIPES", "cli_style", "copy_config", "default_of", "flag_of", "leaves", "option",
           "parse_spec"]
