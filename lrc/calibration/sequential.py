"""Sequential joint update: low-rank factors fitted to the inputs the compressed model produces.

Whitening (SVD-LLM) fits each projection ``Y = X·W`` on the inputs ``X_o`` of the *original*
model. Once earlier projections are compressed, the model feeds each projection a different
input ``X_c``. The joint update fits the factors of every projection to what it will see:

    minimise ||X_c A B - X_o W||_F  over rank-r A [in, r], B [r, out]

With ``C = X_cᵀ X_c`` and ``M = X_cᵀ X_o`` (float64 sums over calibration tokens) the unconstrained
optimum is ``W* = C⁻¹ M W`` and, since ``||X_c (AB - W*)||`` differs from the objective by a
constant, the best rank-r fit is the whitened truncated SVD of ``chol(C)ᵀ W*``, i.e.
``lrc.factorize.whiten_factor(W, C, r, w_target=W*)``. ``C`` is damped by ``λ = damp·mean(diag C)``
towards the original weight: ``W* = (C + λI)⁻¹ (M + λI) W`` (so ``W* = W`` whenever ``X_c = X_o``).
Default ``damp=0.1``: on SmolLM2-135M (0.78 of projection params, 16k mixed calibration tokens)
news / docs perplexity was 138 / 58 at 0.01, 130 / 56 at 0.1, 147 / 65 at 0.5 (whitening alone
250 / 99, dense 35 / 19).

Residual target. A projection whose output is added to the residual stream (``h + X·W``:
attention ``o_proj``, MLP ``down_proj``) is fitted to ``X_o W + (h_o - h_c)`` instead: it also
makes up the error the compressed residual stream ``h_c`` already carries, so the block's output
(not only the projection's) matches the original's. The extra term is ``E = X_cᵀ(h_o - h_c)``,
added to the right-hand side. Measured by hand on SmolLM2 (0.8, ``--group-inputs``, 16k tokens),
news / docs perplexity: MLP only 240 / 95 -> 95 / 44; all projections but the head 119 / 52 ->
100 / 46. Without it the update made MLP-only compression worse than whitening alone (156 / 61).

How it runs (about two forward passes over the calibration set, not one per block):

* The graph's nodes are cut, in their (topological) order, into *stages*: a stage starts at a
  projection whose input is computed after the current cut (Q/K/V share one input, so they form
  one stage; then O, gate/up, down, and the next layer's Q/K/V). At each cut the tensors crossing
  it (the residual stream, a norm's output, rotary cos/sin, the attention mask, graph inputs...)
  are the whole state the rest of the graph needs; every stage's projections read their input
  from that state.
* The prefix before the first cut runs once per calibration batch. Then, stage by stage:
  accumulate ``C`` and ``M`` from the compressed state (``X_c``) and the original state
  (``X_o``), factor the stage's projections, and run the segment up to the next cut twice — the
  original segment on the original state, and the segment rewritten with the new factors on the
  compressed state — each as its own small ONNX Runtime session, keeping only the next cut's
  state (the original's is run one stage ahead: see Memory below). So every projection sees inputs produced by the model with *all* earlier projections
  (including earlier ones of its own block) already compressed.
* The factors are then written into the model by :class:`lrc.passes.lowrank.LowRankPass` (a
  factoriser that looks them up), so the result uses exactly lrc's rewrite; the segments
  replicate that rewrite (``MatMul(MatMul(X, A), B)``, Gemm with ``transB=0``).
* With ``Policy.group_inputs`` the projections reading one tensor (Q/K/V, gate/up) are one
  unit (:func:`lrc.passes.lowrank.plan_units`): they share ``X_c`` and ``X_o``, so the joint fit
  is the same formula applied to ``[W_1 W_2 ...]`` (norm-balanced), split into one B each.

Exports. Nothing crosses a cut but per-batch tensors (masks, rotary tables, shapes computed
from the inputs are carried like activations) and a segment declares each carried tensor's type,
never the shape an exporter traced for it, so optimum (KV cache) and torch-dynamo exports run
at any calibration length. A segment ONNX Runtime cannot load or run on its own raises
:class:`SegmentError` (one line: the nodes, the batch shapes, ORT's message); ``--update`` then
falls back to the one-shot method (whitening, the one-shot correction) and says so in the
report's ``calibration.fallback``.

Memory: the original model runs one cut ahead of the compressed one. Each batch's original
state at a cut is summed into that stage's ``C``, ``M`` (and ``E``) as soon as the compressed
state is there, then advanced to the next cut at once; so across a stage's solve only the
compressed model holds its state at that cut for every batch, the original its state one cut
later (at SmolLM2's down_proj cut, 1536 + 576 wide against 2 x 576), plus one stage's sums;
at the last cut neither is kept past its sums. Nothing in here knows about a particular model family:
stages come from the graph, roles and blocks from :func:`lrc.passes.locate.locate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from lrc.calibration.stats import row_mask
from lrc.calibration.tokens import token_batches, tokenizer_path
from lrc.errors import LrcError, opt, render
from lrc.factorize import Factors, whiten_factor
from lrc.graph.expose import Layout, ancestors, cut_segment, layout
from lrc.graph.locate import Target, locate
from lrc.graph.passes.lowrank import LowRankPass
from lrc.graph.plan import Unit, plan_items
from lrc.graph.plan import plan_units as _plan_units
from lrc.graph.policy import Policy
from lrc.runtime.session import open_session

log = logging.getLogger(__name__)

__all__ = ["Job", "SegmentError", "SegmentStats", "Stage", "joint_target", "plan_targets", "run_sequential",
           "sequential_factors", "sequential_factorizer", "sequential_quant", "sequential_update",
           "stages", "UpdateStats"]

Progress = Callable[[int, int], None]  # (projections done, total), like calib_progress
Rewrite = tuple  # (A, B, base): X·W -> (X·A)·B; (W', None, base): X·W -> X·W'


# --------------------------------------------------------------------------------------------
# Plan: which targets get which rank (the same decisions LowRankPass makes)
# --------------------------------------------------------------------------------------------


def plan_units(model: ir.Model, policy: Policy) -> list[Unit]:
    """The factorisations LowRankPass will make (same planning code), in graph order."""
    return _plan_units(plan_items(locate(model), policy), policy)


def plan_targets(model: ir.Model, policy: Policy) -> list[tuple[Target, int]]:
    """(target, rank) for every projection the policy rewrites, in graph order (the rank of its
    factorisation: a joint group's rank for members of one)."""
    return [(it[0], u.rank) for u in plan_units(model, policy) for it in u.items]


# --------------------------------------------------------------------------------------------
# Stages (positions and crossing tensors come from lrc.graph.expose.layout)
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """Projections whose inputs are all part of the state at ``cut`` (the position of the
    first one), with their ranks."""

    cut: int
    targets: list[tuple[Target, int]] = field(default_factory=list)


def stages(lay: Layout, plan: list[tuple[Target, int]]) -> list[Stage]:
    """Group planned targets: a new stage starts when a target's input is computed at or after
    the current cut (so each stage's inputs are all part of the state at its cut)."""
    items = sorted(plan, key=lambda it: lay.pos[id(it[0].node)])
    out: list[Stage] = []
    for t, r in items:
        x = t.node.inputs[0]
        p = lay.prod.get(id(x), -1)
        if not out or p >= out[-1].cut:
            out.append(Stage(lay.pos[id(t.node)]))
        out[-1].targets.append((t, r))
    return out


# --------------------------------------------------------------------------------------------
# Segments as ONNX Runtime sessions
# --------------------------------------------------------------------------------------------


class SegmentError(LrcError):
    """A segment of the cut graph cannot run on its own: this export's layout is not one the
    stage runner can cut (the callers fall back to the one-shot method, saying why)."""


def _first_line(e: BaseException) -> str:
    """The first line of an error, less ONNX Runtime's source location and status prefix."""
    import re

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    line = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", line)
    line = re.sub(r"\S*onnxruntime\S*:\d+ .*? was false\. ", "", line)
    return line if len(line) <= 400 else line[:397] + "..."


class _Segment:
    """A segment of the graph (:func:`lrc.graph.expose.cut_segment`) as an ONNX Runtime session.
    ``rewrites`` maps id(target node) to ``(A, B, base)`` for projections in the range to
    rewrite as ``(X·A)·B`` (``B`` None: ``X·A``, a replaced weight); ``path`` is the model's
    file (external data). A segment that ONNX Runtime cannot load or run raises
    :class:`SegmentError` naming the nodes and the batch."""

    def __init__(self, model: ir.Model, lay: Layout, start: int, stop: int,
                 wanted: list[ir.Value], state_dtypes: dict[str, np.dtype],
                 rewrites: dict[int, Rewrite] | None = None,
                 threads: int | None = None, path=None):
        nodes = lay.nodes[start:stop]
        self.where = (f"nodes {start}-{stop - 1} ({nodes[0].name or nodes[0].op_type} .. "
                      f"{nodes[-1].name or nodes[-1].op_type})" if nodes else "the graph inputs")
        seg = cut_segment(model, lay, start, stop, wanted, state_dtypes, rewrites)
        self.inputs, self.outputs, self.n_nodes = seg.inputs, seg.outputs, seg.n_nodes
        self.session = None
        if self.outputs:
            try:
                self.session = open_session(seg.proto.SerializeToString(), threads=threads,
                                            inter_op=1 if threads else None,
                                            optimization="all", path=path, arena=False,
                                            what=" (a segment for the update)")
            except LrcError as e:
                raise SegmentError(f"{self.where} cannot be loaded as a segment: "
                                   f"{_first_line(e)}") from e

    def run(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            return {}
        missing = [k for k in self.inputs if k not in state]
        if missing:
            raise SegmentError(f"{self.where} read {missing[0]!r}, which the state at the cut "
                               f"does not carry")
        feeds = {k: state[k] for k in self.inputs}
        try:
            outs = self.session.run(self.outputs, feeds)
        except Exception as e:  # ORT raises its own exception types
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in list(feeds.items())[:3])
            raise SegmentError(f"{self.where} failed on its own (inputs {shapes}"
                               f"{', ...' if len(feeds) > 3 else ''}): {_first_line(e)}") from e
        return dict(zip(self.outputs, outs))


class _Inputs:
    """The declared inputs of an onnx-ir model as an InferenceSession lists them (name, ORT type
    string, shape), for :func:`lrc.runtime.feeds.text_feeds`: feeds for the update are built
    without opening a session on the whole model. ORT's type string is ONNX's element type
    name, lower case, in ``tensor(...)``."""

    class _Arg:
        def __init__(self, v: ir.Value):
            self.name = v.name
            elem = onnx.TensorProto.DataType.Name(int(v.dtype)).lower() if v.dtype else "float"
            self.type = f"tensor({elem})"
            self.shape = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]

    def __init__(self, model: ir.Model, ref):
        self._inputs = [self._Arg(v) for v in model.graph.inputs]
        self.lrc_ref = ref  # its configuration gives the KV-cache dims
        self.lrc_path = str(ref.file) if ref is not None and ref.file is not None else None

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return []


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------


@dataclass
class UpdateStats:
    stages: int = 0
    segments_nodes: int = 0
    batches: int = 0
    tokens: int = 0
    seconds_forward: float = 0.0
    seconds_gram: float = 0.0
    seconds_factor: float = 0.0
    seconds_total: float = 0.0
    fallback: str | None = None  # why the one-shot method was used instead (SegmentError)
    per_target: dict = field(default_factory=dict)  # name -> {"shift": ..., "out_energy": ...}

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if d["fallback"] is None:
            del d["fallback"]
        for k in list(d):
            if k.startswith("seconds"):
                d[k] = round(d[k], 2)
        return d


def _model_ref(model: ir.Model, model_path):
    """The reference of the model the stages cut: ``model_path`` (a ModelRef, or the file the
    model was read from), else the one :func:`lrc.modelref.resolve` knows for ``model``."""
    from lrc.modelref import ModelRef, resolve

    if isinstance(model_path, ModelRef):
        return model_path
    return resolve(model, origin=model_path)


def _batch_feeds(model: ir.Model, ref, batches, batch_windows: int) -> list[dict]:
    """Feeds dicts: dicts pass through; token-id windows of one length are stacked
    ``batch_windows`` at a time and turned into feeds by ``lrc.feeds.text_feeds``."""
    from lrc.runtime.feeds import text_feeds

    out: list[dict] = []
    shim = _Inputs(model, ref)
    pending: dict[int, list[np.ndarray]] = {}

    def flush(length):
        rows = pending.pop(length)
        out.append(text_feeds(shim, np.concatenate(rows, axis=0)))

    for b in batches:
        if isinstance(b, dict):
            out.append(b)
            continue
        a = np.asarray(b, dtype=np.int64)
        a = a[None, :] if a.ndim == 1 else a
        pending.setdefault(a.shape[1], []).append(a)
        if sum(x.shape[0] for x in pending[a.shape[1]]) >= batch_windows:
            flush(a.shape[1])
    for length in list(pending):
        flush(length)
    return out


def _roots(graph: ir.Graph, targets: list[Target]) -> list[ir.Node]:
    """The projections' nodes and the nodes reading their outputs (the residual ``Add`` after
    an o_proj / down_proj reads the stream the update's residual target needs)."""
    out = []
    for t in targets:
        out.append(t.node)
        for v in t.node.outputs:
            out.extend(u.node for u in v.uses() if u.node.graph is graph)
    return out


def _shared(state: dict) -> dict:
    """``state`` with tensors equal to another of it replaced by that one (an export's
    ``Cast`` to the dtype a tensor already has is a copy ONNX Runtime returns separately: the
    state would carry both over every batch)."""
    seen: dict[tuple, list] = {}
    for k, v in state.items():
        if not isinstance(v, np.ndarray) or v.nbytes < (1 << 20):
            continue
        same = seen.setdefault((v.shape, v.dtype.str), [])
        for other in same:
            if np.array_equal(v, other):
                state[k] = other
                break
        else:
            same.append(v)
    return state


def _advance(seg: _Segment, s: dict, wnames: Sequence[str]) -> dict:
    """The state ``s`` taken across ``seg``: the tensors ``wnames`` crossing its end cut, each
    computed there or carried from ``s``."""
    new = seg.run(s)
    lost = [k for k in wnames if k not in new and k not in s]
    if lost:
        raise SegmentError(f"{lost[0]!r}, needed after {seg.where}, is neither "
                           f"computed there nor carried from the cut before")
    return _shared({k: (new[k] if k in new else s[k]) for k in wnames})


def _rows(x: np.ndarray, mask) -> np.ndarray:
    sel = row_mask(x, mask)
    r = x.reshape(-1, x.shape[-1])
    return r[sel] if sel is not None else r


def joint_target(w: np.ndarray, c: np.ndarray, m: np.ndarray, damp: float = 0.1,
                 e: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(W*, C_d)``: the least-squares weight for ``||X_c W* - X_o W||`` (``C = X_cᵀX_c``,
    ``M = X_cᵀX_o``) damped towards ``W``, ``W* = C_d⁻¹ (M W + λW)`` with
    ``C_d = C + λI``, ``λ = damp·mean(diag C)``. With ``e = X_cᵀ(h_o - h_c)`` the target is
    ``X_o W + h_o - h_c`` instead: the projection also makes up the error the residual stream
    ``h`` it is added to already carries."""
    w_star, cd, _ = _joint(w, c, m, damp, e)
    return w_star, cd


def _joint(w, c, m, damp, e):
    """:func:`joint_target` and the lower Cholesky factor of ``C_d`` (None when it is not
    positive definite), with no more float64 ``[d, d]`` copies than those three: a
    down_proj's are 1536 x 1536, held while the state at its cut is."""
    cd = np.asarray(c, dtype=np.float64) + np.asarray(c, dtype=np.float64).T
    cd *= 0.5
    lam = damp * max(float(np.mean(np.diag(cd))), 1e-12)
    cd.flat[::len(cd) + 1] += lam
    w64 = np.asarray(w, dtype=np.float64)
    rhs = m @ w64
    rhs += lam * w64
    if e is not None:
        rhs += e
    try:
        from scipy.linalg import solve_triangular

        chol = np.linalg.cholesky(cd)
        w_star = solve_triangular(chol, solve_triangular(chol, rhs, lower=True), lower=True,
                                  trans="T")
    except Exception:  # no scipy, or not PD: a general solve
        chol = None
        w_star = np.linalg.solve(cd, rhs)
    return w_star, cd, chol


def joint_factor(w: np.ndarray, c: np.ndarray, m: np.ndarray, rank: int,
                 damp: float = 0.1, e: np.ndarray | None = None) -> Factors:
    """Best rank-``rank`` ``A B`` for ``||X_c A B - X_o W||`` (the whitened truncated SVD of
    :func:`joint_target`'s ``W*`` under ``C_d``)."""
    w_star, cd, chol = _joint(w, c, m, damp, e)
    f = whiten_factor(w, cd, rank, w_target=w_star, chol=chol)
    f.method = "svd-llm+update"
    return f


def _first_met(cuts: list[Stage]) -> list[dict[int, str]]:
    """For each stage, ``{job index: the input it is fitted on}`` of the jobs met there first
    (a job's projections share one input; it is solved at the first stage that reads it)."""
    seen: set[int] = set()
    out = []
    for stage in cuts:
        todo: dict[int, str] = {}
        for t, ji in stage.targets:
            if ji not in seen and ji not in todo:
                todo[ji] = t.node.inputs[0].name
        seen.update(todo)
        out.append(todo)
    return out


class _Sums:
    """What the jobs first met at one stage are solved from, summed one batch at a time: for
    each input, ``[C M] = X_cᵀ[X_c X_o]`` (float64, in place: no ``[X_c X_o]`` copy) and the
    relative shift ``‖X_c - X_o‖ / ‖X_o‖``; for a residual job, ``E = X_cᵀ(h_o - h_c)``."""

    def __init__(self, jobs: list[Job], todo: dict[int, str], work: np.dtype, residual: bool):
        self.jobs, self.todo, self.work = jobs, todo, work
        self.acc: dict[str, np.ndarray] = {}
        self.num = dict.fromkeys(todo.values(), 0.0)
        self.den = dict.fromkeys(todo.values(), 0.0)
        # residual jobs still in the running: {job index: the stream h (None until seen)}
        self.resid: dict[int, str | None] = {
            ji: None for ji in todo
            if residual and jobs[ji].residual and len(jobs[ji].targets) == 1}
        self.e: dict[int, np.ndarray] = {}

    def add(self, so: dict, sc: dict, m) -> None:
        work = self.work
        for name in self.num:
            xo = _rows(np.asarray(so[name]), m).astype(work, copy=False)
            xc = _rows(np.asarray(sc[name]), m).astype(work, copy=False)
            d = xc.shape[1]
            acc = self.acc.get(name)
            if acc is None:
                acc = self.acc[name] = np.zeros((d, 2 * d))
            xct = np.ascontiguousarray(xc.T)  # (faster than the strided view)
            acc[:, :d] += xct @ xc
            acc[:, d:] += xct @ xo
            diff = xc - xo
            self.num[name] += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
            self.den[name] += float(np.einsum("ij,ij->", xo, xo, dtype=np.float64))
            del diff, xo
            # E for a projection whose output is added to a residual stream h the state
            # carries (attention o_proj, MLP down_proj): see joint_target
            for ji in [ji for ji in self.resid if self.todo[ji] == name]:
                t = self.jobs[ji].targets[0]
                h = self.resid[ji] = self.resid[ji] or _residual_input(t, so)
                ho = np.asarray(so[h]) if h is not None else None
                if ho is None or ho.shape[:-1] != np.asarray(sc[name]).shape[:-1]:
                    # no stream, or not one row per token (a broadcast): the plain target
                    del self.resid[ji]
                    self.e.pop(ji, None)
                    continue
                dh = _rows(ho, m).astype(work) - _rows(np.asarray(sc[h]), m).astype(work)
                blk = (xct @ dh).astype(np.float64, copy=False)
                if ji in self.e:
                    self.e[ji] += blk
                else:
                    self.e[ji] = blk
            del xct, xc

    def result(self, ji: int) -> tuple:
        """``(C, M, E or None, shift)`` for job ``ji``."""
        name = self.todo[ji]
        acc = self.acc[name]
        d = acc.shape[0]
        den = self.den[name]
        shift = (self.num[name] / den) ** 0.5 if den > 0 else 0.0
        return acc[:, :d], acc[:, d:], self.e.get(ji) if ji in self.resid else None, shift


@dataclass
class Job:
    """One fit of the sequential pass: projections reading one input, solved together at the
    stage where the first of them runs. ``solve(C, M, e, shift)`` gets ``C = X_cᵀX_c`` and
    ``M = X_cᵀX_o`` of that input (float64 sums), ``e = X_cᵀ(h_o - h_c)`` when ``residual``
    and the single projection's output is added to a carried residual stream ``h`` (else
    None), and the input's relative shift ``‖X_c - X_o‖ / ‖X_o‖``; it returns
    ``{id(node): Rewrite}`` for the nodes the compressed model computes differently."""

    targets: list[Target]
    solve: Callable[..., dict]
    residual: bool = False


def run_sequential(model: ir.Model, jobs: list[Job], batches: Iterable, *, model_path=None,
                   batch_windows: int = 8, threads: int | None = None,
                   progress: Progress | None = None, precision: str = "float32",
                   residual: bool = True, st: UpdateStats | None = None) -> UpdateStats:
    """Run the original and the compressed model side by side, stage by stage (see the module
    docstring), calling each job's ``solve`` on the inputs both produce at its stage; the
    compressed model's segments apply every rewrite returned so far. ``batches``: feeds dicts
    or token-id windows. The model is not modified."""
    if precision not in ("float32", "float64"):
        raise LrcError(f"precision must be 'float32' or 'float64', not {precision!r}")
    work = np.dtype(precision)
    t_start = time.perf_counter()
    st = st or UpdateStats()
    plan = [(t, ji) for ji, job in enumerate(jobs) for t in job.targets]
    if not plan:
        return st
    ref = _model_ref(model, model_path)
    model_path = ref.file
    # only what leads to a planned projection: a converted model's casts of its KV-cache
    # outputs at the graph's end would otherwise keep every layer's cache in the state
    lay = layout(model.graph, ancestors(model.graph, _roots(model.graph, [t for t, _ in plan])))
    cuts = stages(lay, plan)
    st.stages = len(cuts)
    feeds = _batch_feeds(model, ref, batches, batch_windows)
    if not feeds:
        raise LrcError("no calibration batches")
    st.batches = len(feeds)
    masks = [f.get("attention_mask") for f in feeds]
    dtypes: dict[str, np.dtype] = {}

    def note_dtypes(states):
        for s in states:
            for k, v in s.items():
                dtypes.setdefault(k, np.asarray(v).dtype)

    todo_at = _first_met(cuts)

    def original(si: int) -> tuple[_Segment | None, list[str]]:
        """The original model's segment from cut ``si`` to the next (None at the last)."""
        if si + 1 >= len(cuts):
            return None, []
        wanted = lay.crossing(cuts[si + 1].cut)
        seg = _Segment(model, lay, cuts[si].cut, cuts[si + 1].cut, wanted, dtypes,
                       threads=threads, path=model_path)
        st.segments_nodes += seg.n_nodes
        return seg, [v.name for v in wanted]

    # The original model runs one cut ahead: each batch's original state at a cut is summed
    # into the stage's C and M as soon as the compressed one is there, then advanced at once,
    # so only the compressed model's state is held (all batches) across a stage's solve.
    # Prefix: graph inputs -> state at the first cut (identical for both models).
    first = cuts[0].cut
    wanted = lay.crossing(first)
    note_dtypes(feeds)
    prefix = _Segment(model, lay, 0, first, wanted, dtypes, threads=threads, path=model_path)
    sums = _Sums(jobs, todo_at[0], work, residual)
    state_o: list[dict] = []
    state_c: list[dict] = []
    seg_o = wnames_o = None
    for i, (f, m) in enumerate(zip(feeds, masks)):
        t0 = time.perf_counter()
        s = {v.name: f[v.name] for v in wanted if v.name in f}
        s.update(prefix.run(f))
        if i == 0:
            note_dtypes([s])
            seg_o, wnames_o = original(0)
        st.seconds_forward += time.perf_counter() - t0
        st.tokens += int(_rows(s[cuts[0].targets[0][0].node.inputs[0].name], m).shape[0])
        t0 = time.perf_counter()
        sums.add(s, s, m)
        st.seconds_gram += time.perf_counter() - t0
        t0 = time.perf_counter()
        # (one stage only: nothing runs after its cut, no state is kept)
        state_c.append(s if seg_o is not None else {})
        state_o.append(_advance(seg_o, s, wnames_o) if seg_o is not None else {})
        st.seconds_forward += time.perf_counter() - t0
    del prefix, seg_o
    note_dtypes(state_o[:1])

    rewrites: dict[int, Rewrite] = {}
    n_done = 0
    for si, stage in enumerate(cuts):
        # 1. Solve the jobs first met here from C = X_cᵀX_c and M = X_cᵀX_o (and E).
        t0 = time.perf_counter()
        for ji in todo_at[si]:
            rewrites.update(jobs[ji].solve(*sums.result(ji)))
        del sums
        st.seconds_factor += time.perf_counter() - t0
        n_done += len(stage.targets)
        # 2. Advance the compressed state to the next cut, sum the next stage's C and M
        #    batch by batch, and take the original state one cut further.
        if si + 1 < len(cuts):
            nxt = cuts[si + 1].cut
            wnames = [v.name for v in lay.crossing(nxt)]
            # each node lies in one segment: its rewrite is not needed once that one is built
            here = {id(n): rewrites.pop(id(n)) for n in lay.nodes[stage.cut:nxt]
                    if id(n) in rewrites}
            seg_c = _Segment(model, lay, stage.cut, nxt, lay.crossing(nxt), dtypes,
                             rewrites=here, threads=threads, path=model_path)
            del here
            seg_o, wnames_o = original(si + 1)
            sums = _Sums(jobs, todo_at[si + 1], work, residual)
            for i, m in enumerate(masks):
                t0 = time.perf_counter()
                state_c[i] = _advance(seg_c, state_c[i], wnames)
                t1 = time.perf_counter()
                sums.add(state_o[i], state_c[i], m)
                t2 = time.perf_counter()
                if seg_o is not None:
                    state_o[i] = _advance(seg_o, state_o[i], wnames_o)
                else:  # the last cut: nothing runs after it, both states are done
                    state_o[i] = state_c[i] = {}
                st.seconds_forward += (t1 - t0) + (time.perf_counter() - t2)
                st.seconds_gram += t2 - t1
            note_dtypes(state_c[:1])
            note_dtypes(state_o[:1])
            del seg_o, seg_c
        if progress:
            progress(n_done, len(plan))
    st.seconds_total = time.perf_counter() - t_start
    return st


def _base(t: Target) -> str:
    return (t.weight.name or t.name) + ("_T" if t.transposed else "")


def sequential_factors(model: ir.Model, policy: Policy, batches: Iterable, *,
                       model_path=None, damp: float = 0.1, batch_windows: int = 8,
                       threads: int | None = None, progress: Progress | None = None,
                       precision: str = "float32", residual: bool = True,
                       ) -> tuple[dict[tuple, Factors], UpdateStats]:
    """Factors for every planned projection, keyed by ``(*weight_key, rank)`` like the groups
    of LowRankPass. ``batches``: feeds dicts, or token-id windows ([L] or [1, L]) from which
    feeds are built (``model_path``: the model's file, default the one it was loaded from, for
    its external data and config.json). The model is not modified. ``precision``: dtype of each batch's
    ``X_cᵀ[X_c X_o]`` product (sums over batches are float64 either way); ``"float32"`` is about
    twice as fast as ``"float64"``."""
    st = UpdateStats()
    factors: dict[tuple, Factors] = {}   # (*weight_key, rank) -> Factors
    jobs: list[Job] = []
    by_key: dict[tuple, Job] = {}
    for u in plan_units(model, policy):
        if u.key() in by_key:  # a weight factored by an earlier unit: its nodes reuse it
            by_key[u.key()].targets.extend(it[0] for it in u.items)
            continue

        def solve(c, m, e, shift, u=u):
            f_raw = joint_factor(u.weight(), c, m, u.rank, damp=damp, e=e)
            # what LowRankPass's factoriser returns (it unscales), on disk until then
            factors[u.key()] = _kept(model, f_raw, u.key())
            f = u.unscale(f_raw)
            mine = {id(it[0].node) for it in u.items}
            for it in u.items:
                st.per_target[it[0].name] = {"input_shift": round(shift, 5),
                                             "output_energy": round(float(f.output_energy or 0), 6),
                                             "residual_target": e is not None}
            out = {}
            for it, sl in zip(u.items, u.b_slices() if u.joint else [None] * len(u.items)):
                b = f.b if sl is None else np.ascontiguousarray(f.b[:, sl])
                out[id(it[0].node)] = (f.a, b, _base(it[0]))
            for t in by_key[u.key()].targets:
                if id(t.node) not in mine:
                    out[id(t.node)] = (f_raw.a, f_raw.b, _base(t))
            return out

        by_key[u.key()] = Job([it[0] for it in u.items], solve, residual=not u.joint)
        jobs.append(by_key[u.key()])
    run_sequential(model, jobs, batches, model_path=model_path, batch_windows=batch_windows,
                   threads=threads, progress=progress, precision=precision, residual=residual,
                   st=st)
    return factors, st


def _kept(model: ir.Model, f: Factors, key: tuple) -> Factors:
    """``f`` with its arrays in the model's :class:`~lrc.graph.model.Store` (when lrc loaded
    it from a file): the factors of every projection wait there, not in memory, for the pass
    that writes them (:func:`lookup_factorizer` reads them back one unit at a time)."""
    import dataclasses

    from lrc.graph.model import Store

    store = model.graph.meta.get("lrc.store")
    if not isinstance(store, Store):
        return f
    name = "/".join(str(k) for k in key)
    return dataclasses.replace(f, a=store.put(f.a, name + "/A"), b=store.put(f.b, name + "/B"))


def sequential_quant(model: ir.Model, qpass, grams: dict, batches: Iterable, *,
                     model_path=None, damp: float = 0.1, batch_windows: int = 8,
                     threads: int | None = None, progress: Progress | None = None,
                     ) -> UpdateStats:
    """The sequential correction: quantise and correct stage by stage on the inputs the already
    quantised (and corrected) model produces.

    For each group of ``qpass`` (a :class:`~lrc.graph.passes.quant.QuantizePass`: projections
    reading one input, with their scheme and rank) the target is :func:`joint_target`'s
    ``W* = C_d⁻¹(M W + λW [+ e])`` — the float weight that best maps the quantised model's
    input ``X_c`` to the original output (and, for ``o_proj`` / ``down_proj``, makes up the
    residual stream's error) — then ``W*`` is quantised and its error ``W* - deq(Q(W*))``
    corrected under ``C`` (whitened by what the quantised model feeds it; the damping only
    regularises ``W*``: a damped Gram under-weights the directions the inputs use, measured
    worse on a synthetic residual MLP). The quantised
    model's next segments run with each group's float equivalent (``deq + A·B``,
    :meth:`~lrc.graph.passes.quant.Solved.effective`). Fills ``qpass.weights`` with each
    target's ``W*`` and ``grams`` (the dict ``qpass``'s corrector reads, ``{input name: obj
    with .xtx}``) with each input's ``C``; running ``qpass`` on ``model`` afterwards writes
    the same numbers into the graph. Not simulated: activation quantisation inside
    ``MatMulNBits`` (accuracy_level 4) and the embedding tables' quantisation."""
    from types import SimpleNamespace

    from lrc.graph.passes.quant import quant_targets
    from lrc.graph.plan import effective_weight

    if qpass.spec.auto and qpass.planned is None:
        raise LrcError(f"{opt('correct_rank', 'auto')} with {opt('update')} is not supported: "
                       "give the ranks")
    targets, _ = quant_targets(model, qpass.select)
    jobs = []
    # target-size's choices (made on the original model: QuantizePass.plan), else the spec's
    for spec, group in (qpass.planned if qpass.planned is not None else qpass.groups(targets)):
        def solve(c, m, e, shift, spec=spec, group=group):
            ws = [effective_weight(t) for t in group]
            w_star, _ = joint_target(np.concatenate(ws, axis=1), c, m, damp, e)
            cuts = np.cumsum([0, *[w.shape[1] for w in ws]])
            for i, t in enumerate(group):
                qpass.weights[t.name] = w_star[:, cuts[i]:cuts[i + 1]].astype(np.float32)
            grams[group[0].node.inputs[0].name] = SimpleNamespace(xtx=0.5 * (c + c.T))
            sv = qpass.solve(group, spec)
            out = {id(t.node): (sv.effective(i), None, _base(t)) for i, t in enumerate(group)}
            sv.hats = None  # the graph is written from the codes and factors: no float copy kept
            qpass.solved[tuple(t.name for t in group)] = sv
            return out

        jobs.append(Job(group, solve, residual=True))
    batches = list(batches)
    try:
        return run_sequential(model, jobs, batches, model_path=model_path,
                              batch_windows=batch_windows, threads=threads, progress=progress)
    except SegmentError as e:
        # The one-shot correction instead: no fitted targets, each group's error whitened by
        # its input's Gram on the original model (what the corrector reads from ``grams``).
        note = fallback_note(str(e), "whitened correction")
        log.warning("%s", note)
        qpass.weights.clear()
        qpass.solved.clear()
        grams.clear()
        grams.update(_input_stats(model, model_path, [t.node.inputs[0].name for t in targets],
                                  batches, threads))
        st = UpdateStats(fallback=note)
        st.tokens = max((g.n for g in grams.values()), default=0)
        return st


class SegmentStats:
    """Activation statistics (:class:`~lrc.calibration.stats.ActStats`) of projection inputs,
    gathered by running the graph segment by segment (the stage runner above, original model
    only) instead of in one session: memory holds one segment's weights and the state at one
    cut, never the whole model in ONNX Runtime. ``collector(names, batches)`` is called with
    slices of names in graph order (:class:`~lrc.calibration.stats.SlicedStats`) and resumes
    where the last call stopped; a name of a stage already passed restarts from the graph's
    inputs. ``targets``: ``{input name: a Target reading it}``."""

    def __init__(self, model: ir.Model, targets: dict[str, Target], *, model_path=None,
                 batch_windows: int = 8, threads: int | None = None):
        self.model = model
        self.ref = _model_ref(model, model_path)
        self.path = self.ref.file
        self.lay = layout(model.graph, ancestors(model.graph, _roots(model.graph,
                                                                     list(targets.values()))))
        self.cuts = stages(self.lay, [(t, 0) for t in targets.values()])
        self.stage_of = {t.node.inputs[0].name: i for i, s in enumerate(self.cuts)
                         for t, _ in s.targets}
        self.batch_windows, self.threads = batch_windows, threads
        self.feeds: list[dict] | None = None
        self.states: list[dict] | None = None
        self.at = -1  # the stage whose cut the states are at
        self.passes = 0  # how many times the graph was entered from its inputs

    def _start(self, batches) -> None:
        if self.feeds is None:
            self.feeds = _batch_feeds(self.model, self.ref, batches, self.batch_windows)
            if not self.feeds:
                raise LrcError("no calibration batches")
        self.dtypes: dict[str, np.dtype] = {}
        for f in self.feeds:
            for k, v in f.items():
                self.dtypes.setdefault(k, np.asarray(v).dtype)
        first = self.cuts[0].cut
        wanted = self.lay.crossing(first)
        prefix = _Segment(self.model, self.lay, 0, first, wanted, self.dtypes,
                          threads=self.threads, path=self.path)
        states = []
        for f in self.feeds:
            s = {v.name: f[v.name] for v in wanted if v.name in f}
            s.update(prefix.run(f))
            states.append(s)
        for k, v in states[0].items():
            self.dtypes.setdefault(k, np.asarray(v).dtype)
        self.states, self.at = states, 0
        self.passes += 1

    def _advance(self) -> None:
        """States to the next stage's cut."""
        here, nxt = self.cuts[self.at].cut, self.cuts[self.at + 1].cut
        wanted = self.lay.crossing(nxt)
        seg = _Segment(self.model, self.lay, here, nxt, wanted, self.dtypes,
                       threads=self.threads, path=self.path)
        names = [v.name for v in wanted]
        for i, s in enumerate(self.states):
            self.states[i] = _advance(seg, s, names)
            for k, v in self.states[i].items():
                self.dtypes.setdefault(k, np.asarray(v).dtype)
        self.at += 1

    def __call__(self, names: Sequence[str], batches) -> dict:
        from lrc.calibration.stats import Gram, _Accumulator

        unknown = [n for n in names if n not in self.stage_of]
        if unknown:
            raise LrcError(f"no projection reads {unknown[0]!r}: cannot gather its statistics "
                           "by segments")
        need = sorted({self.stage_of[n] for n in names})
        if self.states is None or need[0] < self.at:
            self._start(batches)
        gram = Gram("float64", self.threads)
        accs = {n: _Accumulator(n, gram) for n in names}
        masks = [f.get("attention_mask") for f in self.feeds]
        for si in need:
            while self.at < si:
                self._advance()
            for n in (n for n in names if self.stage_of[n] == si):
                for s, m in zip(self.states, masks):
                    accs[n].add(_rows(np.asarray(s[n]), None if m is None else np.asarray(m)))
        if self.at == len(self.cuts) - 1:  # the last stage: nothing further to walk to
            self.states = None  # (a later call for an earlier name starts again)
        return {n: a.result() for n, a in accs.items()}


def _residual_input(t: Target, state: dict) -> str | None:
    """Name of the tensor ``h`` in ``Add(h, X·W)`` (either order) when ``t``'s output feeds
    nothing but that Add and ``h`` is part of the carried state; None otherwise."""
    out = t.node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other.name not in state:
        return None
    shape_o, shape_h = out.shape, other.shape
    if shape_o is not None and shape_h is not None and len(shape_o) != len(shape_h):
        return None  # a broadcast add (a bias), not a residual stream
    return other.name


def lookup_factorizer(factors: dict[tuple, Factors], fallback=None):
    """A LowRankPass factoriser returning precomputed factors (``fallback`` for others)."""

    def factor(t: Target, w: np.ndarray, rank: int) -> Factors:
        import dataclasses

        f = factors.get((*t.weight_key, rank))
        if f is None:
            if fallback is None:
                raise LrcError(f"no precomputed factors for {t.name} at rank {rank}")
            return fallback(t, w, rank)
        if not isinstance(f.a, np.ndarray):  # kept on disk (_kept): read back
            f = dataclasses.replace(f, a=np.asarray(f.a), b=np.asarray(f.b))
        return f

    return factor


def sequential_factorizer(model: ir.Model, model_path, policy: Policy, texts: Sequence[str], *,
                          n_tokens: int = 16384, seq_len: int = 256, tokenizer=None,
                          damp: float = 0.1, threads: int | None = None,
                          progress: Progress | None = None, batches=None):
    """``(factorizer, info)`` for ``LowRankPass`` / ``lrc.compress``: the joint update computed
    on ``texts`` (tokenised like ``lrc.calibration.stats.cached_stats`` does), or on
    ``batches`` (feeds dicts or token-id arrays, e.g. from ``--calib-inputs``) when given.

    ``model_path``: the model's reference or file (tokenizer.json, config.json and external
    data beside it); None: the file ``model`` was loaded from, if any; an in-memory model
    without one needs ``tokenizer``."""
    ref = _model_ref(model, model_path)
    model_path = ref
    if batches is not None:
        windows = list(batches)
    else:
        tok = tokenizer_path(ref, tokenizer)
        windows = token_batches(tok, list(texts), n_tokens=n_tokens, seq_len=seq_len, bos=True)
    try:
        factors, st = sequential_factors(model, policy, windows, model_path=model_path,
                                         damp=damp, threads=threads, progress=progress)
    except SegmentError as e:
        return _whitening_fallback(model, model_path, policy, windows, str(e), seq_len=seq_len,
                                   threads=threads)
    info = {"method": "svd-llm+update", "tokens": st.tokens, "seq_len": seq_len,
            "damp": damp, **{k: v for k, v in st.to_dict().items() if k != "per_target"},
            "per_target": st.per_target}
    return lookup_factorizer(factors), info


def fallback_note(reason: str, method: str) -> str:
    """The one line a report carries when the update could not run in segments."""
    return render(f"{opt('update')} fell back to one-shot {method}: {reason}")


def _input_stats(model: ir.Model, model_path, names, windows, threads) -> dict:
    from lrc.calibration.stats import collect_stats

    return collect_stats(model, sorted(set(names)), windows, threads=threads,
                         path=_model_ref(model, model_path).file)


def _whitening_fallback(model: ir.Model, model_path, policy: Policy, windows, reason: str, *,
                        seq_len: int, threads: int | None):
    """``(factorizer, info)`` of one-shot SVD-LLM (each projection whitened by its input's
    Gram on the original model, one ONNX Runtime pass over ``windows``): what ``--update``
    gives when the graph cannot be run in segments (``reason``)."""
    from lrc.graph.passes.lowrank import plain_svd

    note = fallback_note(reason, "svd-llm")
    log.warning("%s", note)
    names = [t.node.inputs[0].name for t, _ in plan_targets(model, policy)]
    stats = _input_stats(model, model_path, names, windows, threads) if names else {}

    def factor(t: Target, w: np.ndarray, rank: int) -> Factors:
        st = stats.get(t.node.inputs[0].name)
        if st is None:
            return plain_svd(t, w, rank)
        f = whiten_factor(w, st.xtx, rank)
        f.method = "svd-llm"
        return f

    tokens = max((st.n for st in stats.values()), default=0)
    return factor, {"method": "svd-llm", "fallback": note, "tokens": tokens, "seq_len": seq_len,
                    "inputs": len(stats)}


def sequential_update(model, policy: Policy, *, calib_texts: Sequence[str],
                      n_tokens: int = 16384, seq_len: int = 256, tokenizer=None,
                      damp: float = 0.1, threads: int | None = None,
                      progress: Progress | None = None) -> tuple[ir.Model, dict]:
    """Compute the joint-update factors of ``model`` and rewrite it with them. ``model``: a
    .onnx file or model folder (loaded), an ``onnx_ir.Model`` (rewritten in place) or an
    ``onnx.ModelProto``; an in-memory model not loaded from a file needs ``tokenizer``.
    Returns ``(ir.Model, report)`` like ``lrc.compress``."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from lrc.modelref import resolve

    ref = resolve(model)
    model = ref.load()
    factorizer, info = sequential_factorizer(model, ref, policy, calib_texts, n_tokens=n_tokens,
                                             seq_len=seq_len, tokenizer=tokenizer, damp=damp,
                                             threads=threads, progress=progress)
    lr = LowRankPass(policy, factorizer=factorizer)
    lr(model)
    RemoveUnusedNodesPass()(model)
    report = lr.record.to_dict()
    report["summary"] = lr.record.summary_line()
    report["method"] = "svd-llm+update"
    report["calibration"] = info
    return model, report
