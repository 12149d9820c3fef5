"""Quantise weight MatMuls into ONNX Runtime's own forms, with a low-rank correction of the error.

Schemes (``QuantSpec.scheme``):

* ``int4`` / ``int8-weight``: ``com.microsoft.MatMulNBits`` (weight-only, block-wise along K,
  symmetric, :func:`lrc.quantmath.quantize_blockwise` — the codes ONNX Runtime's own
  ``MatMulNBitsQuantizer`` writes). ``accuracy_level`` is written on every node (4: the CPU
  kernel quantises activations to int8 per block and runs integer dot products — the fast path;
  0/1: float compute).
* ``int8``: ``com.microsoft.DynamicQuantizeMatMul`` (activations quantised per tensor at run
  time, weights int8 per output column). Weights use 7 bits (|q| <= 63): u8·s8 integer GEMMs on
  x86 without VNNI saturate in int16 above that (see :mod:`lrc.graph.passes.int8`).

Correction (``correct_rank > 0``): ``E = W - deq(Q(W))`` is fitted by ``A·B`` from a
``corrector`` the caller supplies (the pipeline's is the whitened closed form of
:mod:`lrc.quantmath`, calibrated on the ONNX graph). Projections that read one tensor (Q/K/V,
gate/up) share one ``A``: their errors are corrected jointly, ``X·A`` runs once. Two graph forms:

* ``concat`` (fast; the default): ``T = X·A`` once per input, then ONE ``MatMulNBits`` per
  projection on ``Concat([X, T])`` whose weight is ``[W; B]`` quantised together (the rank is
  padded to a whole block, so blocks never mix ``W`` and ``B`` rows). Per projection no node is
  added; per input two (the ``A`` product and the Concat). ``B`` is stored in the scheme's bits:
  its rows are scaled to unit norm first (the singular values move into ``A``), so block scales
  see values of one magnitude. Needs ``K`` to be a multiple of the block size (otherwise that
  projection uses ``add``).
* ``add``: ``Y = Q(X) + (X·A)·B`` with float factors: the reference form (exactly the math, two
  extra MatMuls and an Add per projection; EoRA measured such an unfused branch eating the
  4-bit decode gain, and so do we: BENCHMARKS.md). ``int8`` always uses it: a per-tensor
  activation scale shared by ``X`` and ``T`` would crush ``T``.

Scales: ``MatMulNBits`` / ``GatherBlockQuantized`` block scales are stored in float16
(``QuantSpec.scales``, the default): a float32 node reads them through a ``Cast`` that ONNX
Runtime folds when it loads the model (:func:`lrc.graph.passes.qforms.scales_value`), so its
kernels run as before on half the scale bytes on disk (0.5 bit per 4-bit weight in blocks of
32). Codes are made with float32 scales, then the scales rounded to float16 (a relative 2^-11,
far below the 4-bit step) before any error, correction or stage uses them.

Float16 models: a node that multiplies in float16 gets ``MatMulNBits`` with float16 scales
(ORT's CPU and CUDA kernels take float16 ``A``) and float16 correction factors; codes and
corrections are computed in float32 as for float32 weights. ``int8``
(``DynamicQuantizeMatMul`` takes float32 activations only) and the standard forms of the other
target runtimes are refused on such nodes in one line. Embedding tables of float16 become ``GatherBlockQuantized`` with float16
scales (ORT); for other runtimes they stay float16.

The pass never touches files; ``self.record`` lists every node with what was done to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import onnx_ir as ir

from lrc.errors import LrcError, opt, render
from lrc.factorize import Factors
from lrc.graph.locate import FACTOR_META, Target, locate
from lrc.graph.passes.lowrank import add_initializer, unique_name
from lrc.graph.passes.qforms import (EMBEDDING_FORMS, MS, EmbeddingForm, QForm, default_forms,
                                     replace_node, scale_itemsize, table)
from lrc.graph.passes.qforms import FORMS as QFORMS
from lrc.graph.policy import check_selector, selector_matches
from lrc.graph.plan import effective_weight
from lrc.quantmath import (BASE_QUANTIZERS, COLUMNS, BlockQuant, columns, dequantize,
                           quantize_blockwise,
                           quantize_columns, valid_block_size, whitened_error)

SCHEMES = {"int4": 4, "int8-weight": 8, "int8": 8}
CORRECT_FORMS = ("concat", "add")
EMBEDDING = {"int8": 8, "int4": 4, "float": 0}
SCALE_DTYPES = ("float16", "float32")  # QuantSpec.scales
EMBED_MIN = 1 << 20  # tables with fewer elements stay float (positions, token types)
INT8_QMAX = 63  # u8·s8 safe on CPUs without VNNI (see lrc.graph.passes.int8._U8S8_SAFE)
AUTO_RANK = 32  # correct_rank auto spends by default what this uniform rank costs
AUTO_MAX_BLOCKS = 8  # at most 8 blocks of rank per group
SIZE_MARGIN = 0.0025  # target-size: the share of the size kept back for the estimate's error
ALLOC_BLOCKS = (32, 64, 128)  # target-size: the block sizes a group may take
ALLOC_RANKS = (32, 64, 128, 256)  # target-size: correction ranks (block 32); 256 heads only

# corrector(targets, W_cat [K, sum N], E_cat [K, sum N], rank) -> (Factors | None, info);
# info: {"werr_before": [...], "werr_after": [...]} per target (relative whitened errors).
Corrector = Callable[[list, np.ndarray, np.ndarray, int], "tuple[Factors | None, dict]"]


@dataclass(frozen=True)
class QuantSpec:
    scheme: str = "int4"
    block_size: int = 32
    accuracy_level: int = 4
    correct_rank: int = 0
    correct_form: str = "concat"
    embedding: str = "int8"  # embedding tables (Gather of a large constant): int8 | int4 | float
    # per-node overrides, later ones win: ((selector, scheme or None, rank or None), ...) with
    # selector a role, a group or a name glob (as include takes)
    overrides: tuple = ()
    # correct_rank auto: ranks (whole blocks) allocated where the whitened error spectrum
    # gains most per byte, under budget_mb extra MB (None: what a uniform AUTO_RANK costs)
    auto: bool = False
    budget_mb: float | None = None
    # per-node block sizes, later ones win: ((selector, block size), ...)
    blocks: tuple = ()
    # target-size: bits, block size and correction rank chosen per group so that all the
    # model's initializers fit in this many MB (lrc.allocate, from measured sensitivity)
    target_mb: float | None = None
    # target-size: the weight MatMuls of one decoded token predicted to take at most this many
    # times the time of plain 4-bit codes in blocks of 32 (None: bytes alone)
    decode_budget: float | None = None
    # target-size: the same over a prompt of 128 tokens (lrc.runtime.decodecost.PREFILL_TOKENS)
    prefill_budget: float | None = None
    target: str = "ort"  # the runtime the forms are for (its name, for messages)
    base: str = "rtn"  # how block-wise codes are chosen (lrc.quantmath.BASE_QUANTIZERS)
    correct_a_bits: int = 32  # the concat form's A: float (32), or block codes of 8 / 4 bits
    # block scales of a float32 model's MatMulNBits / GatherBlockQuantized on disk: float16
    # (cast back in the graph, folded by ONNX Runtime at load) or float32
    scales: str = "float16"
    # scheme (and "embedding") -> the form written for it (lrc.graph.passes.qforms), as the
    # target runtime declares them (lrc.runtime.runtimes); None: ONNX Runtime's own ops
    forms: dict | None = None

    def __post_init__(self):
        forms = self.all_forms
        for scheme in {self.scheme, *(sch for _, sch, _ in self.overrides if sch)}:
            if scheme in SCHEMES and forms.get(scheme) is None:
                raise LrcError(
                    f"{opt('quantize', scheme)} cannot be expressed for "
                    f"{opt('target_runtime', self.target)}: it runs no 4-bit weights (no int4 "
                    f"or block-wise DequantizeLinear); use {opt('quantize', 'int8-weight')} or "
                    f"int8 there, or a runtime that runs them")
        emb = EMBEDDING_FORMS.get(forms.get("embedding"))
        if EMBEDDING.get(self.embedding) and (emb is None or EMBEDDING[self.embedding]
                                              not in emb.bits):
            have = "no embedding form" if emb is None else (
                f"{emb.title} ({' or '.join(f'{b}-bit' for b in emb.bits)})")
            raise LrcError(f"{opt('embedding', self.embedding)}: "
                           f"{opt('target_runtime', self.target)} runs {have}; use "
                           f"{' or '.join(k for k, b in EMBEDDING.items() if not b or emb and b in emb.bits)}")
        for sel, b in self.blocks:
            check_selector(sel)
            if not valid_block_size(b):
                raise LrcError(f"{opt('block_size', sel + '=')} must be a power of two >= 16, "
                               f"got {b}")
        for sel, scheme, rank in self.overrides:
            check_selector(sel)
            if scheme is not None and scheme not in SCHEMES:
                raise LrcError(f"{opt('quantize', sel + '=')}: must be one of "
                               f"{', '.join(SCHEMES)}, got {scheme!r}")
            if rank is not None and rank < 0:
                raise LrcError(f"{opt('correct_rank', sel + '=')} must be >= 0, got {rank}")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise LrcError(f"{opt('correct_budget')} must be > 0 MB, got {self.budget_mb}")
        if self.scheme not in SCHEMES:
            raise LrcError(f"{opt('quantize')} must be one of {', '.join(SCHEMES)}, got "
                           f"{self.scheme!r}")
        if self.scheme != "int8" and not valid_block_size(self.block_size):
            raise LrcError(f"{opt('block_size')} must be a power of two >= 16, got "
                           f"{self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise LrcError(f"{opt('accuracy_level')} must be 0-4, got {self.accuracy_level}")
        if self.correct_rank < 0:
            raise LrcError(f"{opt('correct_rank')} must be >= 0, got {self.correct_rank}")
        if self.embedding not in EMBEDDING:
            raise LrcError(f"{opt('embedding')} must be {' or '.join(EMBEDDING)}, got "
                           f"{self.embedding!r}")
        if self.correct_a_bits not in (32, 8, 4):
            raise LrcError(f"{opt('correct_a_bits')} must be 32, 8 or 4, got "
                           f"{self.correct_a_bits!r}")
        if self.base not in BASE_QUANTIZERS:
            raise LrcError(f"{opt('base_quant')} must be one of {', '.join(BASE_QUANTIZERS)}, "
                           f"got {self.base!r}")
        if self.scales not in SCALE_DTYPES:
            raise LrcError(f"{opt('scales')} must be {' or '.join(SCALE_DTYPES)}, got "
                           f"{self.scales!r}")
        if self.correct_form not in CORRECT_FORMS:
            raise LrcError(f"{opt('correct_form')} must be {' or '.join(CORRECT_FORMS)}, "
                           f"got {self.correct_form!r}")

    @property
    def all_forms(self) -> dict:
        """scheme -> form name (None: the target runs none), embedding -> form name."""
        return self.forms if self.forms is not None else default_forms()

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    @property
    def form(self) -> str:
        """The node form this spec's scheme takes on its target."""
        return self.all_forms[self.scheme]

    @property
    def qform(self) -> QForm:
        return QFORMS[self.form]

    @property
    def column(self) -> bool:
        """Per-column int8 weights (no blocks): forms that are not block-wise."""
        return not self.qform.blockwise

    @property
    def embedding_form(self) -> EmbeddingForm | None:
        return EMBEDDING_FORMS.get(self.all_forms.get("embedding"))

    @property
    def any_rank(self) -> bool:
        return bool(self.correct_rank) or any(r for _, _, r in self.overrides)

    def for_target(self, t: Target) -> "QuantSpec":
        """The spec for one node: the overrides whose selector matches it applied in order."""
        scheme, rank, block = self.scheme, self.correct_rank, self.block_size
        for sel, sch, r in self.overrides:
            if selector_matches(sel, t):
                scheme = sch or scheme
                rank = rank if r is None else r
        for sel, b in self.blocks:
            if selector_matches(sel, t):
                block = b
        if (scheme, rank, block) == (self.scheme, self.correct_rank, self.block_size):
            return self
        return replace(self, scheme=scheme, correct_rank=rank, block_size=block, overrides=(),
                       blocks=())

    def describe(self) -> str:
        what = self.qform.title(self.bits, self)
        if self.forms is not None and self.target != "ort":
            what += f" for {self.target}"
        if self.embedding != "float":
            what += f"; embedding tables {self.embedding} ({self.embedding_form.title})"
        if self.target_mb is not None:
            return (f"{self.qform.help.split(',')[0]} in {self.target_mb:g} MB: bits (4/8), "
                    f"block (32/64/128) and whitened-correction rank chosen per group by "
                    f"measured sensitivity" + (
                        f", decode within {self.decode_budget:g}x plain int4/32's MatMul time"
                        if self.decode_budget else "") + (
                        f", prefill within {self.prefill_budget:g}x plain int4/32's MatMul time"
                        if self.prefill_budget else "") + (
                        f"; embedding tables {self.embedding} ({self.embedding_form.title})"
                        if self.embedding != "float" else ""))
        if self.auto:
            form = "add" if self.column else self.correct_form
            budget = (f"{self.budget_mb:g} MB" if self.budget_mb is not None else
                      f"the bytes of a uniform rank {AUTO_RANK}")
            what += f", whitened correction, ranks allocated under {budget} ({form} form)"
        elif self.correct_rank:
            form = "add" if self.column else self.correct_form
            what += f", rank-{self.correct_rank} whitened correction ({form} form)"
        for sel, scheme, rank in self.overrides:
            what += f"; {sel}: " + ", ".join(x for x in (
                scheme, None if rank is None else f"rank {rank}") if x)
        for sel, b in self.blocks:
            what += f"; {sel}: block {b}"
        return what


@dataclass
class QuantNode:
    name: str
    role: str
    block: int | None
    shape: list[int]
    scheme: str
    bits: int
    block_size: int | None
    rank: int
    form: str | None
    werr_before: float | None = None
    werr_after: float | None = None
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    joint_with: list[str] = field(default_factory=list)


@dataclass
class QuantRecord:
    spec: dict
    nodes: list[QuantNode] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    embeddings: list[dict] = field(default_factory=list)
    allocation: list[dict] = field(default_factory=list)  # target-size: the choice per group
    decode: dict | None = None  # target-size's decode budget: predicted and allowed time
    plan_seconds: dict | None = None  # target-size's choosing: wall, codes, probes (beside)

    def totals(self) -> dict:
        before = sum(n.weight_bytes_before for n in self.nodes)
        after = sum(n.weight_bytes_after for n in self.nodes)
        emb_before = sum(e["bytes_before"] for e in self.embeddings)
        emb_after = sum(e["bytes_after"] for e in self.embeddings)

        def mean(key):
            vals = [getattr(n, key) for n in self.nodes if getattr(n, key) is not None]
            return round(float(np.sqrt(np.mean(np.square(vals)))), 6) if vals else None

        return {"quantized": len(self.nodes), "skipped": len(self.skipped),
                "weight_bytes_before": before, "weight_bytes_after": after,
                "embeddings": len(self.embeddings), "embedding_bytes_before": emb_before,
                "embedding_bytes_after": emb_after,
                "werr_before_rms": mean("werr_before"), "werr_after_rms": mean("werr_after")}

    def to_dict(self) -> dict:
        return {"spec": self.spec, "nodes": [asdict(n) for n in self.nodes],
                "skipped": self.skipped, "notes": self.notes, "embeddings": self.embeddings,
                "allocation": self.allocation, "totals": self.totals(),
                **({"decode": self.decode} if self.decode else {}),
                **({"plan_seconds": self.plan_seconds} if self.plan_seconds else {})}

    def summary_line(self) -> str:
        t = self.totals()
        s = (f"quantised {t['quantized']} weight MatMuls ({self.spec['describe']}); weights "
             f"{t['weight_bytes_before'] / 1e6:.1f} -> {t['weight_bytes_after'] / 1e6:.1f} MB")
        if t["werr_before_rms"] is not None:
            s += f"; whitened error {t['werr_before_rms']:.4f}"
            if t["werr_after_rms"] is not None and self.spec["correct_rank"]:
                s += f" -> {t['werr_after_rms']:.4f} after correction"
        if self.embeddings:
            s += (f"; {len(self.embeddings)} embedding table(s) "
                  f"{t['embedding_bytes_before'] / 1e6:.1f} -> "
                  f"{t['embedding_bytes_after'] / 1e6:.1f} MB")
        return s


def quant_targets(model: ir.Model, select: Callable[[Target], bool] | None = None) -> tuple:
    """``(targets, skipped)``: the weight MatMuls the pass can quantise (2-D float constant
    weight, X·W; lrc's own float factors included) that ``select`` keeps."""
    out, skipped = [], []
    for t in locate(model):
        factor = bool(t.node.metadata_props.get(FACTOR_META))
        why = None if (t.eligible or (factor and t.skip.startswith("already"))) else t.skip
        if why is None and t.op != "MatMul":
            why = "Gemm: not quantised (MatMulNBits replaces MatMul only)"
        if why is None and (t.dtype not in ("float", "float16")
                            or t.compute_dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16)):
            why = f"weight dtype {t.dtype}: only float32 / float16 weights are quantised"
        if why is None and select is not None and not select(t):
            why = "excluded"
        if why is not None:
            skipped.append({"name": t.name, "role": t.role, "reason": why})
        else:
            out.append(t)
    return out, skipped


def one_blas_thread():
    """numpy's and scipy's BLAS on one thread (a context; a no-op without threadpoolctl) while
    target-size measures: its sensitivity probe runs ONNX Runtime between the BLAS calls of the
    codes and errors, and OpenBLAS's idle threads spin on the cores ORT needs (SmolLM2 in 88
    MB, 2 cores: probes 179 -> 155 s, the codes' 85 s unchanged). scipy's OpenBLAS is its own
    library, limited only if loaded when the limit is set: imported first (loaded later, its
    spinning worker took half a core from the codes in some runs: 195 s instead of 86)."""
    from contextlib import nullcontext

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    try:
        import scipy.linalg  # noqa: F401  (its BLAS loaded, so the limit reaches it)
    except ImportError:
        pass
    return threadpool_limits(1, user_api="blas")


class QuantizePass(ir.passes.InPlacePass):
    """Quantise the selected weight MatMuls (``spec``), correcting the error with
    ``corrector`` when ``spec.correct_rank > 0``."""

    def __init__(self, spec: QuantSpec, corrector: Corrector | None = None,
                 select: Callable[[Target], bool] | None = None, progress=None,
                 weights: dict[str, np.ndarray] | None = None, probe=None, decode_cost=None):
        super().__init__()
        self.spec = spec
        self.corrector = corrector
        # {target name: [in, out]} to quantise instead of the graph's weight (the sequential
        # correction's targets W*, lrc.calibration.sequential); errors are measured against them
        self.weights = weights or {}
        # {member names: Solved} computed before the pass runs (the sequential correction
        # solves every group once on its stage; the pass writes those numbers, not new ones)
        self.solved: dict[tuple, Solved] = {}
        self.select = select
        self.progress = progress
        self.record = QuantRecord({**asdict(spec), "describe": spec.describe()})
        # {id(float weight): (MatMulNBits node, K of the weight)} for tied heads: the embedding
        # pass reads its codes (lrc.graph.passes.embedding) instead of storing the table again
        self.tied_codes: dict = {}
        self._names: list[str] = []
        # target-size: probe() -> a callable values -> KL of the output with those weights
        # replaced (lrc.calibration.sensitivity.Probe, made when first asked; None: the
        # whitened error alone), and the codes computed
        # while choosing, kept for the choices taken: {(names, bits, block): quants}
        self.probe = probe
        # target-size with decode_budget: decode_cost() -> the machine's per-node MatMul times
        # (lrc.runtime.decodecost.DecodeCost, measured when first asked)
        self.decode_cost = decode_cost
        self._qcache: dict = {}
        # target-size's choices made before the pass runs (:meth:`plan`: the sequential
        # correction solves them stage by stage first); None: the pass chooses when it runs
        self.planned: list | None = None

    def requires(self, model: ir.Model) -> None:
        if self.spec.any_rank and self.corrector is None:
            raise ir.passes.PreconditionError("QuantizePass: correct_rank > 0 needs a corrector")
        check_fp16(self.spec, quant_targets(model, self.select)[0])

    def ensures(self, model: ir.Model) -> None:
        def dequantized(v):  # a standard form's weight: DequantizeLinear's output
            return v is not None and v.producer() is not None \
                and v.producer().op_type == "DequantizeLinear"

        left = {n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)
                if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
                and not dequantized(n.inputs[1])}
        bad = [n for n in self._names if n in left]
        if bad:
            raise ir.passes.PostconditionError(f"QuantizePass left float MatMuls: {bad[:5]}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets, self.record.skipped = quant_targets(model, self.select)
        if not targets:
            return ir.passes.PassResult(model, modified=False)
        self._names = [t.name for t in targets]
        groups = self.groups(targets)
        self._shared: dict = {}  # the dynamic form's quantised inputs, one per input
        forms = [QFORMS[spec.form] for spec, _ in groups]
        emb = self.spec.embedding_form if self.spec.embedding != "float" else None
        if any(f.ms for f in forms) or (emb is not None and emb.ms):
            model.opset_imports.setdefault(MS, 1)
        need = max((f for f in forms if f.opset), key=lambda f: f.opset, default=None)
        if need is not None and model.opset_imports.get("", 1) < need.opset:
            # Standard ops changed from opset 18 to 21 only by new types (int4, float8...) and
            # backward-compatible attributes; checker, shape inference and a session check the
            # written file (lrc.pipeline).
            self.record.notes.append(f"opset {model.opset_imports.get('', 1)} -> "
                                     f"{need.opset} for {need.help.split(' (')[0]}")
            model.opset_imports[""] = need.opset
        if self.planned is not None:
            groups = self.planned
        elif self.spec.target_mb is not None:
            with one_blas_thread():
                groups = self._allocate_bytes(model, targets, groups)
        elif self.spec.auto:
            groups = self._allocate(groups)
        done = 0
        for spec, group in groups:
            self._quantize_group(graph, group, spec)
            done += len(group)
            if self.progress:
                self.progress(done, len(targets), group[0].name)
        weights = {id(t.weight): t.weight for t in targets}
        for w in weights.values():
            if not w.uses() and not w.is_graph_output() and graph.initializers.get(w.name) is w:
                del graph.initializers[w.name]
        return ir.passes.PassResult(model, modified=True)

    def plan(self, model: ir.Model) -> list[tuple[QuantSpec, list[Target]]]:
        """target-size's choices for ``model`` (``(spec, members)`` per group, what the pass
        would write), made now without changing the graph; :attr:`planned` and the record's
        allocation and notes hold them. No codes are kept: a pass that quantises other
        weights (the sequential correction's fitted targets) makes its own."""
        targets, self.record.skipped = quant_targets(model, self.select)
        with one_blas_thread():
            self.planned = self._allocate_bytes(model, targets, self.groups(targets))
        self._qcache.clear()
        return self.planned

    def groups(self, targets: list[Target]) -> list[tuple[QuantSpec, list[Target]]]:
        """``(spec, members)``: targets that read one tensor with one scheme and rank are
        corrected jointly (one shared ``A``); lrc's factor MatMuls are never corrected and
        form groups of one."""
        by_key: dict = {}
        order = []
        for t in targets:
            spec = self.spec.for_target(t)
            if t.node.metadata_props.get(FACTOR_META):
                spec = replace(spec, correct_rank=0)
            if not spec.correct_rank:
                order.append((spec, [t]))
                continue
            key = (id(t.node.inputs[0]), id(t.node.graph), spec.scheme, spec.correct_rank,
                   spec.block_size)
            if key not in by_key:
                by_key[key] = (spec, [])
                order.append(by_key[key])
            by_key[key][1].append(t)
        return order

    # -------------------------------------------------------------------------- one group
    def _quantized(self, group: list[Target], spec: QuantSpec) -> tuple[list, list, list]:
        """``(weights, dequantised weights, quantised forms)`` of a group's members."""
        ws = [np.asarray(self.weights[t.name] if t.name in self.weights else effective_weight(t),
                         dtype=np.float32) for t in group]
        base, gram = BASE_QUANTIZERS[spec.base], None
        if base.needs_gram and any(t.tied for t in group) and self._shares_codes(spec):
            # the embedding table will read these codes row by row: each weight's own error
            # is what it sees, so the Gram-weighted choice would move error into it
            base = BASE_QUANTIZERS["rtn"]
            note = render(f"tied head {group[0].name}: round-to-nearest codes "
                          f"({opt('base_quant', spec.base)} elsewhere): the int4 embedding "
                          f"shares them")
            if note not in self.record.notes:
                self.record.notes.append(note)
        if base.needs_gram and not spec.column:
            gram = getattr(self.corrector, "gram", lambda ts: None)(group)
            if gram is None:
                raise LrcError(f"{opt('base_quant', spec.base)} needs calibration statistics "
                               f"of {group[0].name}'s input: not with {opt('method', 'svd')}")
        cached = self._qcache.pop((tuple(t.name for t in group), spec.bits, spec.block_size),
                                  None)
        if cached is not None:
            return ws, [dequantize(q) for q in cached], cached
        hats, quants = [], []
        for w in ws:
            if spec.column:
                q, s = quantize_columns(w, INT8_QMAX if spec.scheme == "int8" else 127)
                quants.append((q, s))
                hats.append(q.astype(np.float32) * s)
            else:
                bq = _as_stored(base.quantize(w, spec.bits, spec.block_size, gram), group[0],
                                spec)
                quants.append(bq)
                hats.append(dequantize(bq))
        return ws, hats, quants

    @staticmethod
    def _shares_codes(spec: QuantSpec) -> bool:
        """A tied head's MatMulNBits codes will also be the embedding's (EmbeddingPass)."""
        return (spec.form == "nbits" and spec.embedding != "float"
                and EMBEDDING.get(spec.embedding) == spec.bits)

    def _allocate(self, groups: list) -> list:
        """``correct_rank`` auto: every correctable group's whitened error spectrum (the
        ``σ²`` of ``SᵀE``, each member's error relative to its output ``‖X·W_i‖``), then
        whole blocks of rank handed out greedily where a block removes most relative squared
        error per byte it costs, until the budget is spent. Groups whose rank an override
        fixed keep it."""
        import heapq

        spectrum = getattr(self.corrector, "spectrum", None)
        if spectrum is None:
            raise LrcError(f"{opt('correct_rank', 'auto')} needs calibration statistics (the "
                           f"whitened error spectrum): not with {opt('method', 'svd')}")
        fixed = {sel for sel, _, r in self.spec.overrides if r is not None}
        cands, costs = [], []
        for gi, (spec, group) in enumerate(groups):
            if not spec.correct_rank or (fixed and any(selector_matches(sel, t) for sel in fixed
                                                       for t in group)):
                continue
            ws, hats, _ = self._quantized(group, spec)
            sig2 = spectrum(group, np.concatenate(ws, axis=1),
                            np.concatenate([w - h for w, h in zip(ws, hats)], axis=1))
            k, n = ws[0].shape[0], sum(w.shape[1] for w in ws)
            bs = spec.block_size if not spec.column else AUTO_RANK
            concat = not spec.column and spec.correct_form == "concat" and not k % bs
            # bytes of one block of rank: A's columns (floats, or block codes and one scale per
            # block of K) and B's rows (the scheme's bits and one scale per column in the concat
            # form; floats in the add form)
            item, sitem = _itemsize(group[0]), _scale_bytes(group[0], spec)
            a_cost = (k * bs * spec.correct_a_bits // 8 + (k // spec.block_size) * bs * sitem
                      if concat and spec.correct_a_bits < 32 else k * bs * item)
            cost = a_cost + (n * bs * spec.bits // 8 + n * sitem if concat else n * bs * item)
            gains = [float(np.sum(sig2[b * bs:(b + 1) * bs]))
                     for b in range(min(AUTO_MAX_BLOCKS, -(-len(sig2) // bs)))]
            cands.append((gi, bs, cost, gains))
            costs.append(cost * -(-AUTO_RANK // bs))
        budget = (self.spec.budget_mb * 1e6 if self.spec.budget_mb is not None
                  else float(sum(costs)))
        blocks = {gi: 0 for gi, *_ in cands}
        heap = [(-gains[0] / cost, gi, 0) for gi, bs, cost, gains in cands if gains]
        heapq.heapify(heap)
        info = {gi: (bs, cost, gains) for gi, bs, cost, gains in cands}
        spent = 0.0
        while heap:
            _, gi, b = heapq.heappop(heap)
            bs, cost, gains = info[gi]
            if spent + cost > budget:
                continue
            spent += cost
            blocks[gi] = b + 1
            if b + 1 < len(gains):
                heapq.heappush(heap, (-gains[b + 1] / cost, gi, b + 1))
        out = []
        for gi, (spec, group) in enumerate(groups):
            if gi in blocks:
                spec = replace(spec, correct_rank=blocks[gi] * info[gi][0], auto=False)
                if not spec.correct_rank:  # no correction: each member on its own
                    out.extend((spec, [t]) for t in group)
                    continue
            out.append((spec, group))
        ranks = [blocks[gi] * info[gi][0] for gi in blocks]
        self.record.notes.append(
            render(f"{opt('correct_rank', 'auto')}: ") + f"{spent / 1e6:.1f} of "
            f"{budget / 1e6:.1f} MB spent on the correction; ranks over {len(ranks)} groups: "
            + ", ".join(f"{r}: {ranks.count(r)}" for r in sorted(set(ranks))))
        return out

    def _allocate_bytes(self, model: ir.Model, targets: list, groups: list) -> list:
        """``target_mb``: per group of projections (one input) a choice of bits (4, or 8 where
        the target runs 8-bit weights), block size (32 / 64 / 128) and correction rank (whole
        blocks), so that every initializer of the output fits in the budget. A choice's cost
        is its exact bytes; its loss the group's measured sensitivity (KL of the model's output
        with that group alone at its cheapest choice, per unit of whitened error: one
        :attr:`probe` run per group) times the whitened error it leaves (the codes' error; a
        correction of rank r removes the error spectrum's r largest values). Choices are made
        by :func:`lrc.allocate.allocate` (loss removed per byte)."""
        from lrc.allocate import Choice, allocate

        if self.corrector is None or getattr(self.corrector, "spectrum", None) is None:
            raise LrcError(f"{opt('target_size')} with {opt('quantize')} needs calibration "
                           f"statistics: not with {opt('method', 'svd')}")
        # the bytes outside the choices, with a margin for what the estimate of the graph's
        # own bytes misses (0.14 MB of 88 on the builder's SmolLM2)
        fixed = _fixed_bytes(model, targets, self.spec) + int(SIZE_MARGIN * self.spec.target_mb
                                                              * 1e6)
        budget = self.spec.target_mb * 1e6 - fixed
        menus, sens, specs = [], [], []
        with_8 = self.spec.all_forms.get("int8-weight") is not None
        import time
        from concurrent.futures import Future, ThreadPoolExecutor

        t0 = time.perf_counter()
        probe = self.probe() if self.probe is not None else None
        t_probe = [time.perf_counter() - t0]
        # The probes run in a worker thread (ONNX Runtime) while the main thread makes the
        # next group's codes (mostly one core's numpy): group g's probe beside group g+1's codes
        worker = (ThreadPoolExecutor(1, thread_name_prefix="lrc-probe") if probe is not None
                  else None)

        def measure(values) -> float:
            t = time.perf_counter()
            kl = probe(values)
            t_probe[0] += time.perf_counter() - t
            return kl

        timed = self.spec.decode_budget or self.spec.prefill_budget
        cost = self.decode_cost() if self.decode_cost is not None and timed else None

        def priced(k, ns, bits, block, rank=0, a_bits=32):  # (decode, prefill) seconds
            if cost is None:
                return {}
            return {"seconds": cost.group(k, ns, bits, block, rank, a_bits),
                    "prefill": cost.group(k, ns, bits, block, rank, a_bits, prefill=True)
                    if cost.prefill else 0.0}

        a_bits = self.spec.correct_a_bits
        t_codes, n_probes, emb_kls, kls, refs = 0.0, 0, [], [], []
        # a tied table's embedding side, when the probe can change it apart from the head
        emb_inputs = getattr(probe, "embedding_inputs", {}) if probe is not None else {}
        for gi, (spec, group) in enumerate(groups):
            t1 = time.perf_counter()
            k, ns = group[0].shape[0], [t.shape[1] for t in group]
            item, sitem = _itemsize(group[0]), _scale_bytes(group[0], spec)
            names = tuple(t.name for t in group)
            corrected = spec.correct_rank > 0 and not spec.column
            shares = any(t.tied for t in group) and self._shares_codes(spec)
            fixed_bits = spec.scheme != self.spec.scheme or spec.column
            bits_menu = [spec.bits] if fixed_bits or shares or not with_8 else [4, 8]
            menu, ref = [], None
            # the embedding that shares this head's round-to-nearest codes: its own output
            # error at each block size (no correction reaches it), measured apart from the head
            emb = next(((i, emb_inputs[t.weight.name]) for i, t in enumerate(group)
                        if shares and t.tied and t.weight.name in emb_inputs), None)
            emb_kl: dict[int, float] = {}
            t_emb = 0.0

            norms: dict = {}  # the members' ‖X·W_i‖, computed once per group

            def known():  # what the corrector gave for them, passed back (not recomputed)
                return {"norms": norms["n"]} if "n" in norms else {}

            def err_of(ws, hats):
                _, info = self.corrector(group, np.concatenate(ws, axis=1), np.concatenate(
                    [w - h for w, h in zip(ws, hats)], axis=1), 0, **known())
                if info.get("norms") is not None:
                    norms["n"] = info["norms"]
                return float(np.sum(np.square(info["werr_before"])))

            for bits in bits_menu:
                scheme = "int4" if bits == 4 else "int8-weight"
                blocks = [b for b in (ALLOC_BLOCKS if bits == 4 and not spec.column else (32,))
                          if b == 32 or not k % b]
                # round-to-nearest codes at every block size (cheap): their errors, and the
                # weights the probe runs (the cheapest choice's)
                errs, at32 = {}, None
                for block in blocks:
                    s = replace(spec, scheme=scheme, block_size=block, correct_rank=0)
                    ws, hats, quants = self._quantized(group, replace(s, base="rtn"))
                    errs[block] = err_of(ws, hats)
                    if emb is not None and bits == 4:
                        t2 = time.perf_counter()
                        emb_kl[block] = worker.submit(measure, {emb[1]: _stored(
                            group[emb[0]], hats[emb[0]])}).result()
                        t_emb += time.perf_counter() - t2
                        n_probes += 1
                    if spec.base == "rtn" and not spec.column:
                        self._qcache[(names, bits, block)] = quants
                    nbytes = _choice_bytes(k, ns, bits, block, 0, s, item, sitem)
                    if ref is None or nbytes < ref[0]:
                        ref = (nbytes, errs[block], hats)
                    if block == 32:
                        at32 = (ws, hats)
                    del ws, hats, quants
                if spec.base != "rtn" and bits == 4 and not spec.column:
                    # the base quantiser's own codes at block 32 (the corrected one); at the
                    # other block sizes its error is estimated as round-to-nearest's times the
                    # ratio it reaches at 32 (its codes are made only for the choices taken)
                    ws, hats, quants = self._quantized(group, replace(
                        spec, scheme=scheme, block_size=32, correct_rank=0))
                    self._qcache[(names, bits, 32)] = quants
                    e32 = err_of(ws, hats)
                    errs = {b: e32 if b == 32 else e * e32 / max(errs[32], 1e-30)
                            for b, e in errs.items()}
                    at32 = (ws, hats)
                    del quants
                for block in blocks:
                    menu.append(Choice(bits, block, 0, _choice_bytes(
                        k, ns, bits, block, 0, replace(spec, block_size=block), item, sitem),
                        errs[block], **priced(k, ns, bits, block)))
                if bits == 4 and corrected and not k % 32:
                    ws, hats = at32
                    sig2 = self.corrector.spectrum(group, np.concatenate(ws, axis=1),
                                                   np.concatenate([w - h for w, h in
                                                                   zip(ws, hats)], axis=1),
                                                   **known())
                    for r in ALLOC_RANKS:
                        if r >= min(k, sum(ns)) // 2 or (r > 128 and not any(
                                t.role == "head" for t in group)):
                            continue
                        menu.append(Choice(4, 32, r, _choice_bytes(
                            k, ns, 4, 32, r, replace(spec, block_size=32), item, sitem),
                            max(errs[32] - float(np.sum(sig2[:r])), 0.0),
                            **priced(k, ns, 4, 32, r, a_bits)))
                    del ws, hats
                del at32
            values = {t.weight.name: _stored(t, h) for t, h in zip(group, ref[2])}
            t_codes += time.perf_counter() - t1 - t_emb
            if probe is not None:
                if kls:  # (the last group's probe done first: two groups' weights at most)
                    kls[-1].result()
                kls.append(worker.submit(measure, values))
                n_probes += 1
            else:
                kls.append(ref[1])
            if self.progress:
                self.progress(gi + 1, len(groups), f"measuring {group[0].name}")
            refs.append(ref[1])
            menus.append(menu)
            specs.append(spec)
            emb_kls.append(emb_kl)
            del values, ref
        if worker is not None:
            worker.shutdown(wait=True)
        t_plan = time.perf_counter() - t0
        self.record.plan_seconds = {"total": round(t_plan, 1), "codes": round(t_codes, 1),
                                    "probes": round(t_probe[0], 1),
                                    "probe_runs": n_probes + (probe is not None)}
        for gi, (kl, err, emb_kl) in enumerate(zip(kls, refs, emb_kls)):
            kl = kl.result() if isinstance(kl, Future) else kl
            sens.append(kl / err if err > 0 else 0.0)
            if emb_kl and sens[-1] > 0:
                # the embedding's error, in the head's units: every choice at that block
                # size leaves it, whatever the head's correction removes
                menus[gi] = [replace(c, err=c.err + emb_kl.get(c.block, 0.0) / sens[-1])
                             for c in menus[gi]]
        plain_s = plain_p = seconds_budget = prefill_budget = None
        if cost is not None:  # the time of plain 4-bit codes in blocks of 32, every group

            def plain(key):
                return sum(min((getattr(c, key) for c in m if (c.bits, c.block, c.rank)
                                == (4, 32, 0)), default=min(getattr(c, key) for c in m))
                           for m in menus)

            plain_s, plain_p = plain("seconds"), plain("prefill")
            if self.spec.decode_budget:
                seconds_budget = self.spec.decode_budget * plain_s
            if self.spec.prefill_budget:
                prefill_budget = self.spec.prefill_budget * plain_p
        alloc = allocate(menus, sens, budget, seconds_budget, prefill_budget)
        if alloc.min_bytes > budget:
            raise LrcError(f"{opt('target_size', f'{self.spec.target_mb:g}')}: the smallest "
                           f"choice of every projection takes {(alloc.min_bytes + fixed) / 1e6:.1f}"
                           f" MB ({fixed / 1e6:.1f} MB of it not quantised here); give more")
        out, counts = [], {}
        for (spec, group), menu, pick, emb_kl in zip(groups, menus, alloc.picks, emb_kls):
            c = menu[pick]
            counts[c.label()] = counts.get(c.label(), 0) + 1
            names = tuple(t.name for t in group)
            for key in [k for k in self._qcache if k[0] == names and k[1:] != (c.bits, c.block)]:
                del self._qcache[key]
            spec = replace(spec, scheme=spec.scheme if spec.column else
                           ("int4" if c.bits == 4 else "int8-weight"), block_size=c.block,
                           correct_rank=c.rank, auto=False, target_mb=None)
            self.record.allocation.append({"members": list(names), "choice": c.label(),
                                           "bytes": c.nbytes, "err": c.err,
                                           "sensitivity": sens[len(out)],
                                           **({"decode_us": round(c.seconds * 1e6, 1),
                                               "prefill_us": round(c.prefill * 1e6, 1)}
                                              if cost else {}),
                                           **({"embedding_kl": emb_kl} if emb_kl else {})})
            out.append((spec, group))
        self.record.notes.append(
            render(f"{opt('target_size', f'{self.spec.target_mb:g}')}: ") +
            f"{(alloc.nbytes + fixed) / 1e6:.1f} MB planned ({fixed / 1e6:.1f} MB not "
            f"quantised here, smallest choice {(alloc.min_bytes + fixed) / 1e6:.1f} MB); "
            f"choices over {len(groups)} groups, by measured sensitivity: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
            + f"; {t_plan:.0f} s: {t_codes:.0f} s on the choices' codes and errors, beside "
            f"them {t_probe[0]:.0f} s on {self.record.plan_seconds['probe_runs']} "
            "sensitivity runs")
        if cost is not None:
            self.record.decode = {"budget": self.spec.decode_budget, "plain_ms": plain_s * 1e3,
                                  "planned_ms": alloc.seconds * 1e3, "met": alloc.seconds_met,
                                  "priced": alloc.lam > 0, "cost": cost.describe(),
                                  "prefill": {"budget": self.spec.prefill_budget,
                                              "tokens": cost.tokens,
                                              "plain_ms": plain_p * 1e3,
                                              "planned_ms": alloc.prefill * 1e3,
                                              "met": alloc.prefill_met, "priced": alloc.mu > 0,
                                              "cost": cost.describe(prefill=True)}}
            for name, budget_x, took, plain_t, met, bound, what in (
                    ("decode_budget", self.spec.decode_budget, alloc.seconds, plain_s,
                     alloc.seconds_met, alloc.lam > 0, "a decoded token"),
                    ("prefill_budget", self.spec.prefill_budget, alloc.prefill, plain_p,
                     alloc.prefill_met, alloc.mu > 0, f"a {cost.tokens}-token prompt")):
                if not budget_x:
                    continue
                self.record.notes.append(
                    render(f"{opt(name, f'{budget_x:g}')}: ")
                    + f"the weight MatMuls of {what} predicted at {took * 1e3:.2f} ms, "
                    f"{took / plain_t:.3f}x plain 4-bit codes in blocks of 32 "
                    f"({plain_t * 1e3:.2f} ms; {cost.where}, {cost.threads} threads)"
                    + ("" if met else ": no choice within the size is that fast, the "
                       "fastest taken") + ("; time bound the choices" if bound else ""))
        # a corrected group is one; the uncorrected ones are written one member at a time
        return [x for spec, group in out
                for x in ([(spec, group)] if spec.correct_rank else [(spec, [t]) for t in group])]

    def solve(self, group: list[Target], spec: QuantSpec) -> "Solved":
        """The numbers of one group, no graph change: the members' quantised weights, the joint
        correction and the form it takes (what :meth:`_quantize_group` writes and what
        :meth:`Solved.effective` computes in float)."""
        ws, hats, quants = self._quantized(group, spec)
        factor_node = bool(group[0].node.metadata_props.get(FACTOR_META))
        rank = spec.correct_rank
        f, info = None, {}
        concat = (spec.correct_form == "concat" and not spec.column
                  and not ws[0].shape[0] % spec.block_size)
        if rank:  # (one member: no concatenated copies of a head-sized matrix)
            w_cat = ws[0] if len(ws) == 1 else np.concatenate(ws, axis=1)
            if len(ws) == 1:
                e_cat = np.subtract(ws[0], hats[0], out=hats[0] if concat else None)
            else:
                e_cat = np.concatenate([w - h for w, h in zip(ws, hats)], axis=1)
            if concat:  # written from the codes of [W; B]: the float copies are not needed
                hats = None
            f, info = self.corrector(group, w_cat, e_cat, rank)  # may overwrite e_cat
            del w_cat, e_cat
            if f is None and hats is None:  # no correction after all: the plain form's floats
                hats = [dequantize(q) for q in quants]
        elif self.corrector is not None and not factor_node:
            _, info = self.corrector(group, np.concatenate(ws, axis=1),
                                     np.concatenate([w - h for w, h in zip(ws, hats)], axis=1), 0)
        form = a_pad = None
        if f is not None:
            k = ws[0].shape[0]
            form = spec.correct_form
            if spec.column or k % spec.block_size:
                form = "add"
        offsets = np.cumsum([0] + [w.shape[1] for w in ws])
        bs = [None if f is None else f.b[:, offsets[i]:offsets[i + 1]] for i in range(len(ws))]
        a_codes = None
        if form == "concat":
            a_pad, f = _block_factors(f, spec.block_size)
            if spec.correct_a_bits < 32:  # A in the scheme's block codes, B refitted to it
                a_codes = _as_stored(quantize_blockwise(a_pad, spec.correct_a_bits,
                                                        spec.block_size), group[0], spec)
                a_pad = dequantize(a_codes)
                f = _refit(f, a_pad, ws, quants, self._gram(group))
            bs = [f.b[:, offsets[i]:offsets[i + 1]] for i in range(len(ws))]
            # [W; B] quantised: K is whole blocks, so its blocks are W's (already quantised)
            # followed by B's — W's codes are reused, not quantised twice
            quants = [_stack(wq, _as_stored(quantize_blockwise(b, spec.bits, spec.block_size),
                                            group[0], spec)) for wq, b in zip(quants, bs)]
        return Solved(ws, hats, quants, f, info, form, a_pad, bs, a_codes)

    def _gram(self, group: list[Target]):
        """The Gram the group's correction is whitened by (None: plain SVD of the error)."""
        gram = getattr(self.corrector, "gram", None)
        return gram(group) if gram is not None else None

    def _quantize_group(self, graph: ir.Graph, group: list[Target], spec: QuantSpec) -> None:
        sv = self.solved.pop(tuple(t.name for t in group), None) or self.solve(group, spec)
        f, info, form, a_pad = sv.f, sv.info, sv.form, sv.a_pad
        names = [t.name for t in group]
        if form == "concat" and f.rank < a_pad.shape[1]:
            note = render(f"{opt('correct_rank', f.rank)} is padded to {a_pad.shape[1]} in the "
                          f"concat form (whole blocks of {spec.block_size}): the same bytes and "
                          f"time as rank {a_pad.shape[1]}, less correction; use a multiple of "
                          f"{spec.block_size}")
            if note not in self.record.notes:
                self.record.notes.append(note)
        t_val = None
        for i, (t, w, qz, b) in enumerate(zip(group, sv.ws, sv.quants, sv.bs)):
            if form == "concat":
                if t_val is None:
                    t_val = self._concat_input(graph, t, a_pad, sv.a_codes, spec)
                after = self._block_node(graph, t, qz, t_val, spec)
            else:
                after = self._emit(graph, t, qz, spec)
                if f is not None:
                    if t_val is None:
                        t_val = self._a_product(graph, t, f.a.astype(np.float32))
                    after += self._add_branch(graph, t, t_val, b.astype(np.float32))
            if t.tied and spec.form == "nbits":  # its codes can serve the embedding too
                node = t.node if t.node.op_type == "MatMulNBits" else t.node.inputs[0].producer()
                self.tied_codes[id(t.weight)] = (node, w.shape[0])
            if f is not None and i == len(group) - 1:
                after += (sv.a_codes.packed.nbytes + sv.a_codes.scales.size
                          * _scale_bytes(t, spec) if sv.a_codes is not None else
                          (f.a.size if form == "add" else a_pad.size) * _itemsize(t))
            werr_b = info.get("werr_before", [None] * len(group))[i]
            werr_a = info.get("werr_after", [None] * len(group))[i]
            if form == "concat" and info.get("gram") is not None:
                werr_a = sv.whitened_error(i, info["gram"])
            self.record.nodes.append(QuantNode(
                name=t.name, role=t.role, block=t.block, shape=list(w.shape),
                scheme=spec.scheme, bits=spec.bits,
                block_size=None if spec.column else spec.block_size,
                rank=0 if f is None else f.rank, form=form,
                werr_before=None if werr_b is None else round(werr_b, 6),
                werr_after=None if werr_a is None else round(werr_a, 6),
                weight_bytes_before=w.size * t.weight.const_value.dtype.itemsize,
                weight_bytes_after=int(after),
                joint_with=[n for n in names if n != t.name] if f is not None else []))
        for t in group:  # written: the fitted target (sequential correction) is not needed again
            self.weights.pop(t.name, None)

    # -------------------------------------------------------------------------- node builders
    def _emit(self, graph, t: Target, qz, spec: QuantSpec) -> int:
        """Replace ``t``'s MatMul by the spec's form (same input, same output)."""
        return self._block_node(graph, t, qz, t.node.inputs[0], spec)

    def _a_product(self, graph, t: Target, a: np.ndarray) -> ir.Value:
        a = a.astype(_float(t), copy=False)
        av = add_initializer(graph, f"{t.weight.name}.lrc_corrA{a.shape[1]}", a)
        out = ir.Value(name=unique_name(graph, f"{t.name}/lrc_corrA_out"))
        node = ir.Node("", "MatMul", [t.node.inputs[0], av], outputs=[out],
                       name=f"{t.name}/lrc_corrA")
        t.node.graph.insert_before(t.node, node)
        return out

    def _add_branch(self, graph, t: Target, t_val: ir.Value, b: np.ndarray) -> int:
        """``Y = Q(X) + T·B``: the quantised node keeps computing Q(X) into a new value."""
        node = t.node
        b = b.astype(_float(t), copy=False)
        bv = add_initializer(graph, f"{t.weight.name}.lrc_corrB{b.shape[0]}", b)
        c = ir.Value(name=unique_name(graph, f"{t.name}/lrc_corrB_out"))
        mb = ir.Node("", "MatMul", [t_val, bv], outputs=[c], name=f"{t.name}/lrc_corrB")
        q = ir.Value(name=unique_name(graph, f"{t.name}/lrc_q_out"))
        newq = ir.Node(node.domain, node.op_type, list(node.inputs),
                       attributes=list(node.attributes.values()), outputs=[q],
                       name=f"{t.name}/lrc_q")
        node.graph.insert_before(node, [newq, mb])
        add = ir.Node("", "Add", [q, c], num_outputs=1, name=t.name)
        replace_node(node, add)
        t.node = add
        return b.nbytes

    def _concat_input(self, graph, t: Target, a_pad: np.ndarray, a_codes=None,
                      spec: QuantSpec | None = None) -> ir.Value:
        """``Concat([X, X·A], axis=-1)``, built once per input before its first reader; with
        ``a_codes`` the ``X·A`` product is itself a quantised MatMul in the spec's form."""
        if a_codes is None:
            t_val = self._a_product(graph, t, a_pad)
        else:
            from types import SimpleNamespace

            a_node = SimpleNamespace(name=f"{t.name}/lrc_corrA", node=t.node,
                                     weight=SimpleNamespace(name=f"{t.weight.name}.lrc_corrA"))
            node, _ = spec.qform.emit(graph, a_node, a_codes, t.node.inputs[0], {
                "accuracy_level": self.spec.accuracy_level, "float": _float(t),
                "shared": self._shared, "scales": self.spec.scales})
            node.name = f"{t.name}/lrc_corrA"
            t.node.graph.insert_before(t.node, node)
            t_val = node.outputs[0]
            t_val.name = unique_name(graph, f"{t.name}/lrc_corrA_out")
        xt = ir.Value(name=unique_name(graph, f"{t.name}/lrc_corr_cat"))
        cat = ir.Node("", "Concat", [t.node.inputs[0], t_val], outputs=[xt],
                      attributes=[ir.AttrInt64("axis", -1)], name=f"{t.name}/lrc_corr_cat")
        t.node.graph.insert_before(t.node, cat)
        return xt

    def _block_node(self, graph, t: Target, codes, x: ir.Value, spec: QuantSpec) -> int:
        """Replace ``t``'s MatMul by one quantised MatMul of ``x`` (``X``, or ``Concat([X, T])``
        with the weight ``[W; B]``) in the spec's form (:data:`lrc.graph.passes.qforms.FORMS`)."""
        node, nbytes = spec.qform.emit(graph, t, codes, x, {
            "accuracy_level": self.spec.accuracy_level, "float": _float(t),
            "shared": self._shared, "scales": self.spec.scales})
        if node is not None:
            replace_node(t.node, node)
            t.node = node
        return nbytes


@dataclass
class Solved:
    """One group's numbers (:meth:`QuantizePass.solve`): per member the float weight ``ws``,
    its dequantised ``hats`` and quantised form ``quants`` (``[W; B]`` stacked in the concat
    form), the joint correction ``f`` (``A`` is ``a_pad`` in the concat form) and each member's
    ``B`` in ``bs``."""

    ws: list
    hats: list | None  # None once only the graph is left to write
    quants: list
    f: Factors | None
    info: dict
    form: str | None
    a_pad: np.ndarray | None
    bs: list
    a_codes: BlockQuant | None = None  # A's codes when A is quantised (a_pad: deq of them)

    def effective(self, i: int, cols: slice = slice(None)) -> np.ndarray:
        """The ``[K, N]`` matrix member ``i``'s nodes compute with: ``deq(W) + A·B``, with
        ``B`` quantised in the concat form (``deq([W; B])`` split at ``K``); ``cols``: only
        those columns."""
        if self.form == "concat":
            d = dequantize(columns(self.quants[i], cols))
            k = self.ws[i].shape[0]
            return d[:k] + self.a_pad @ d[k:]
        if self.f is None:
            return self.hats[i][:, cols]
        return (self.hats[i][:, cols]
                + self.f.a.astype(np.float32) @ self.bs[i][:, cols].astype(np.float32))

    def whitened_error(self, i: int, g: np.ndarray) -> float:
        """:func:`~lrc.quantmath.whitened_error` of member ``i``'s weight and
        :meth:`effective`, made a block of columns at a time (a head is 49152 wide)."""
        return whitened_error(self.ws[i], lambda cols: self.effective(i, cols), g)


def _stack(wq: BlockQuant, bb: BlockQuant) -> BlockQuant:
    """``[W; B]``'s block quantisation from W's and B's (both whole blocks along K)."""
    return BlockQuant(np.concatenate([wq.packed, bb.packed], axis=1),
                      np.concatenate([wq.scales, bb.scales], axis=1), wq.bits, wq.block_size,
                      wq.k + bb.k, wq.n)


def _refit(f: Factors, a_hat: np.ndarray, ws: list, quants: list, g) -> Factors:
    """``B`` refitted to the quantised ``Â`` (its first ``f.rank`` columns; the padding stays
    zero): per member ``B_i = argmin ‖Sᵀ(E_i − Â·B_i)‖ = (ÂᵀGÂ)⁻¹ÂᵀG·E_i`` with ``G = SSᵀ``
    the input's Gram (the identity without one), ``E_i = W_i − deq(Q(W_i))`` made a block of
    columns at a time. Column-separable, so each member's own fit, whatever the joint
    weighting chose ``A`` with."""
    r = f.rank
    a = a_hat[:, :r].astype(np.float64)
    ga = a if g is None else g @ a
    lhs = a.T @ ga
    lhs += np.eye(r) * (1e-10 * max(float(np.trace(lhs)) / r, 1e-30))
    b = np.zeros_like(f.b)
    off = 0
    for w, wq in zip(ws, quants):
        n = w.shape[1]
        for c in range(0, n, COLUMNS):
            cols = slice(c, min(c + COLUMNS, n))
            e = w[:, cols].astype(np.float64) - dequantize(columns(wq, cols))
            b[:r, off + c:off + cols.stop] = np.linalg.solve(lhs, ga.T @ e)
        off += n
    return Factors(a_hat, b.astype(np.float32), f.rank, f.energy, f.rel_error, f.method,
                   f.output_energy)


def _block_factors(f: Factors, block_size: int) -> tuple[np.ndarray, Factors]:
    """The concat form's factors: rank padded with zeros to a whole block (zero columns of
    ``A`` give zero inputs, zero rows of ``B`` add nothing), ``B``'s rows scaled to unit norm
    and the norms moved into ``A`` (block scales of ``B`` then see values of one magnitude)."""
    r = f.a.shape[1]
    r_pad = -(-r // block_size) * block_size
    norms = np.linalg.norm(f.b, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    a = np.zeros((f.a.shape[0], r_pad), np.float32)
    a[:, :r] = f.a * norms[None, :]
    b = np.zeros((r_pad, f.b.shape[1]), np.float32)
    b[:r] = f.b / norms[:, None]
    return a, Factors(a, b, f.rank, f.energy, f.rel_error, f.method, f.output_energy)


def _stored(t, h: np.ndarray) -> np.ndarray:
    """A float weight ``h`` ([K, N]) in target ``t``'s initializer's layout and dtype."""
    dt = np.float16 if t.weight.const_value.dtype == ir.DataType.FLOAT16 else np.float32
    return np.ascontiguousarray(h.T if t.transposed else h, dt)


def _choice_bytes(k: int, ns: list[int], bits: int, block: int, rank: int, spec: QuantSpec,
                  item: int, scale: int | None = None) -> int:
    """Bytes of a group's weights ``[k, n_i]`` as ``bits``-bit codes in blocks of ``block``
    (one scale of ``scale`` bytes per block and column; default ``item``, the float's), with
    a concat correction of ``rank``: ``A`` (``spec.correct_a_bits`` codes or floats of
    ``item`` bytes) and ``B``'s rows stacked under each weight."""
    scale = item if scale is None else scale
    blocks = -(-k // block)
    n = sum(ns)
    size = n * blocks * (block * bits // 8 + scale)
    if rank:
        a = (k * rank * spec.correct_a_bits // 8 + blocks * rank * scale
             if spec.correct_a_bits < 32 else k * rank * item)
        size += a + n * (rank * bits // 8 + (rank // block) * scale)
    return size


def _as_stored(bq: BlockQuant, t: Target, spec: QuantSpec) -> BlockQuant:
    """``bq`` with its scales as the file will hold them (float16 where :func:`_scale_bytes`
    says 2): what every error, correction and stage then computes with is what ONNX Runtime
    runs."""
    if _scale_bytes(t, spec) != 2:
        return bq
    return replace(bq, scales=bq.scales.astype(np.float16).astype(np.float32))


def _scale_bytes(t: Target, spec: QuantSpec) -> int:
    """Bytes of one block scale of ``t``'s codes on disk, in the spec's form: float16 in
    ``MatMulNBits`` when the spec stores them so (:func:`lrc.graph.passes.qforms.scales_value`),
    else the float the node multiplies in."""
    return (scale_itemsize(_float(t), spec.scales) if spec.qform.name == "nbits"
            else _itemsize(t))


def smallest_bytes(model: ir.Model, spec: QuantSpec, select=None) -> tuple[int, int]:
    """``(fixed, smallest)``: the bytes target-size cannot choose (:func:`_fixed_bytes`) and
    the least its choices can take (every projection at its largest block, no correction):
    what a budget is checked against before any work."""
    targets, _ = quant_targets(model, select)

    def least(t):
        s, k = spec.for_target(t), t.shape[0]
        block = max([b for b in ALLOC_BLOCKS if not k % b] or [32])
        return _choice_bytes(k, [t.shape[1]], s.bits, 32 if s.column else block, 0, s,
                             _itemsize(t), _scale_bytes(t, s))

    return _fixed_bytes(model, targets, spec), _per_weight(targets, least)


def int4_form_bytes(model: ir.Model, spec: QuantSpec, select=None) -> int:
    """The bytes of the model in the builder's int4 form, what ``--target-size Nx`` multiplies:
    every projection 4-bit in blocks of 32 with no correction, the large embedding tables int4
    (a tied head's shared), the scales in the model's float (as the builder and ONNX Runtime's
    quantisers write them), the rest as it is."""
    spec = replace(spec, embedding="int4", block_size=32, scales="float32")
    targets, _ = quant_targets(model, select)
    return _fixed_bytes(model, targets, spec) + _per_weight(targets, lambda t: _choice_bytes(
        t.shape[0], [t.shape[1]], 4, 32, 0, spec, _itemsize(t)))


def _per_weight(targets: list, size_of) -> int:
    """``size_of(t)`` summed once per weight (a weight two targets read counts once)."""
    seen, total = set(), 0
    for t in targets:
        if id(t.weight) not in seen:
            seen.add(id(t.weight))
            total += size_of(t)
    return total


def _fixed_bytes(model: ir.Model, targets: list, spec: QuantSpec) -> int:
    """The bytes of the output's initializers that are not the targets' codes: everything
    else, with the large embedding tables as the embedding pass will store them (none where
    the int4 table shares a tied head's codes)."""
    seen = {id(t.weight) for t in targets}
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                if v.const_value is not None and id(v) not in seen)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and "value" in node.attributes:  # tensors held in nodes
            total += node.attributes["value"].as_tensor().nbytes
        # the graph itself in the file (names, edges, attributes: ~160 bytes a node in an
        # optimum export, 1.2 MB of SmolLM2's file), and the nodes and initializers the pass
        # adds (a few per group, counted as one more node per target)
        total += 24 + len(node.name or "") + len(node.op_type) + len(node.domain) + sum(
            4 + len(v.name or "") for v in (*node.inputs, *node.outputs) if v is not None) \
            + sum(8 + len(a.name) for a in node.attributes.values())
    total += 200 * len(targets) + sum(32 + len(v.name or "")
                                      for v in model.graph.initializers.values())
    bits = EMBEDDING[spec.embedding]
    tied = {id(t.weight) for t in targets if t.tied}
    done = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Gather" or not bits:
            continue
        tab = table(node)
        if tab is None or id(tab.value) in done:
            continue
        v, k = tab.shape
        if v * k < EMBED_MIN or k % spec.block_size:
            continue
        done.add(id(tab.value))
        shared = id(tab.value) in tied and bits == 4 and spec.form == "nbits"
        if id(tab.value) not in seen:
            total -= tab.tensor.nbytes
        if not shared:
            gbq = spec.embedding_form is not None and spec.embedding_form.name == "gbq"
            item = (scale_itemsize(tab.tensor.dtype.numpy(), spec.scales) if gbq
                    else tab.tensor.dtype.itemsize)
            total += v * k * bits // 8 + v * (k // spec.block_size) * item
    for t in targets:  # a tied table no embedding form replaces stays float beside the head
        if t.tied and id(t.weight) not in done:
            done.add(id(t.weight))
            total += t.weight.const_value.nbytes
    return int(total)


def _float(t: Target):
    """numpy dtype of what ``t``'s node multiplies in: float16 or float32."""
    return np.float16 if t.compute_dtype == ir.DataType.FLOAT16 else np.float32


def _itemsize(t: Target) -> int:
    return np.dtype(_float(t)).itemsize


def check_fp16(spec: QuantSpec, targets: list[Target]) -> None:
    """LrcError (one line) when a node that multiplies in float16 would get a form that has no
    float16 input: only ONNX Runtime's ``MatMulNBits`` (``int4`` / ``int8-weight``) takes one."""
    for t in targets:
        if t.compute_dtype != ir.DataType.FLOAT16:
            continue
        s = spec.for_target(t)
        if not s.qform.float16:
            what = (f"{s.qform.help.split(',')[0]} takes float32 activations only" if s.qform.ms
                    else f"lrc writes the {opt('target_runtime', s.target)} form for float32 "
                         f"only")
            raise LrcError(
                f"{opt('quantize', s.scheme)} on a float16 model ({t.name} multiplies in "
                f"float16): {what}; use {opt('quantize', 'int4')} or int8-weight (MatMulNBits "
                f"runs float16) or quantise the float32 export")


__all__ = ["AUTO_RANK", "CORRECT_FORMS", "EMBEDDING", "Corrector", "QuantNode", "QuantRecord",
           "QuantSpec", "QuantizePass", "SCHEMES", "Solved", "check_fp16", "int4_form_bytes",
           "quant_targets",
           "smallest_bytes"]
