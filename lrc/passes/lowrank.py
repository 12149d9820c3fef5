"""Low-rank rewrite: ``Y = X·W (+b)``  ->  ``Y = (X·A)·B (+b)``.

For every target chosen by the policy (see :mod:`lrc.passes.locate`, :mod:`lrc.policy`) the
effective weight ``W [in, out]`` (the initializer, its transpose for ``Transpose``-fed or
``Gemm(transB=1)`` weights) is factored by a truncated SVD (or a data-aware factoriser) into
``A [in, r]`` and ``B [r, out]``. The graph gets a new ``MatMul(X, A)`` and the original node is
re-wired to multiply by ``B``:

* ``MatMul(X, W)``            -> ``MatMul(MatMul(X, A), B)``
* ``MatMul(X, Transpose(E))`` -> ``MatMul(MatMul(X, A), B)``; ``E`` stays if a ``Gather`` uses it
* ``Gemm(X, W, C, α, β, transB)`` -> ``Gemm(MatMul(X, A), B, C, α, β, transB=0)``

Because the original node keeps its output value, the output tensor name, its consumers and any
graph output are untouched. A·B is never folded back. A weight shared by several targets is
factored once and the factors are shared. Each weight is read, factored and released one at a
time, so memory holds the model plus one matrix's workspace. The pass never touches files: it
returns the model and a record of every node it rewrote or left alone, with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from lrc.factorize import Factors, factorize, singular_values
from lrc.passes.locate import FACTOR_META, Target, locate
from lrc.policy import Policy

Factorizer = Callable[[Target, np.ndarray, int], Factors]
Progress = Callable[[int, int, str], None]


@dataclass
class Rewritten:
    name: str
    role: str
    block: int | None
    path: str
    shape: list[int]
    rank: int
    setting: str
    energy: float
    rel_error: float
    params_before: int
    params_after: int
    dtype: str
    method: str
    output: str
    shared_with: list[str] = field(default_factory=list)
    output_energy: float | None = None
    note: str | None = None
    tied: bool = False


@dataclass
class Skipped:
    name: str
    role: str
    block: int | None
    shape: list[int]
    reason: str
    kind: str  # ineligible | excluded | unprofitable


@dataclass
class LowRankRecord:
    rewritten: list[Rewritten] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict:
        seen: set[str] = set()
        before = after = 0
        for r in self.rewritten:  # a shared weight counts once
            key = r.shared_with[0] if r.shared_with and r.shared_with[0] in seen else r.name
            if key in seen:
                continue
            seen.add(r.name)
            seen.update(r.shared_with)
            before += r.params_before
            after += r.params_after
        kept = sum(r.params_before for r in self.rewritten if r.tied)
        return {"targets": len(self.rewritten) + len(self.skipped),
                "rewritten": len(self.rewritten), "skipped": len(self.skipped),
                "params_before": before, "params_after": after,
                "params_ratio": (after / before) if before else 1.0,
                # weights kept for another user (tied embedding): compute shrinks, storage not
                "params_kept_shared": kept,
                "stored_ratio": ((after + kept) / before) if before else 1.0}

    def to_dict(self) -> dict:
        return {"rewritten": [asdict(r) for r in self.rewritten],
                "skipped": [asdict(s) for s in self.skipped],
                "notes": list(self.notes), "totals": self.totals()}

    def summary_line(self) -> str:
        t = self.totals()
        kinds: dict[str, int] = {}
        for s in self.skipped:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        extra = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        return (f"rewrote {t['rewritten']} of {t['targets']} projections"
                + (f" ({extra} left dense)" if extra else "")
                + f"; projection params {t['params_before']:,} -> {t['params_after']:,}"
                  f" ({t['params_ratio']:.1%})"
                + (f", {t['params_kept_shared']:,} kept for shared users" if
                   t["params_kept_shared"] else ""))


def plain_svd(target: Target, w: np.ndarray, rank: int) -> Factors:
    return factorize(w, rank)


class LowRankPass(ir.passes.InPlacePass):
    """Factor every selected projection; ``self.record`` says what was done."""

    def __init__(self, policy: Policy, factorizer: Factorizer | None = None,
                 progress: Progress | None = None):
        super().__init__()
        self.policy = policy
        self.factorizer = factorizer or plain_svd
        self.progress = progress
        self.record = LowRankRecord()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets = locate(model)
        plan: list[tuple[Target, int, str, str | None]] = []  # target, rank, setting, note
        spectra: dict[tuple, np.ndarray] = {}
        for t in targets:
            if not t.eligible:
                self._skip(t, t.skip, "ineligible")
                continue
            sigma = None
            if self.policy.needs_spectrum:
                setting, _ = self.policy.setting_for(t)
                if setting is not None and setting.needs_spectrum:
                    if t.weight_key not in spectra:
                        spectra[t.weight_key] = singular_values(_effective_weight(t))
                    sigma = spectra[t.weight_key]
            d = self.policy.decide(t, sigma)
            if d.rank is None:
                self._skip(t, d.reason, d.kind)
            else:
                plan.append((t, d.rank, d.setting.describe(), d.reason))
        # One factorisation per (weight, layout, rank); targets sharing it reuse the factors.
        groups: dict[tuple, list] = {}
        for item in plan:
            groups.setdefault((*item[0].weight_key, item[1]), []).append(item)
        done = 0
        for (wname, transposed, rank), items in groups.items():
            t0 = items[0][0]
            w = _effective_weight(t0)
            f = self.factorizer(t0, w, rank)
            del w
            a_val, b_val = self._factor_values(graph, t0, f)
            names = [it[0].name for it in items]
            for t, r, setting, note in items:
                self._rewire(graph, t, a_val, b_val, f)
                m, n = t.shape
                self.record.rewritten.append(Rewritten(
                    name=t.name, role=t.role, block=t.block, path=t.path, shape=[m, n],
                    rank=f.rank, setting=setting, energy=round(f.energy, 6),
                    rel_error=round(f.rel_error, 6), params_before=m * n,
                    params_after=f.rank * (m + n), dtype=t.dtype, method=f.method,
                    output=t.node.outputs[0].name,
                    shared_with=[x for x in names if x != t.name],
                    output_energy=None if f.output_energy is None else round(f.output_energy, 6),
                    tied=t.tied,
                    note="; ".join(x for x in (note, "weight also used by another node "
                                                         "(kept for it)" if t.tied else None)
                                   if x) or None))
            _drop_if_unused(graph, t0.weight)
            done += len(items)
            if self.progress:
                self.progress(done, len(plan), t0.name)
        tied = [t for t, *_ in plan if t.tied]
        if tied:
            n = sum(t.params for t in {t.weight_key: t for t in tied}.values())
            self.record.notes.append(
                f"{len(tied)} rewritten projection(s) share their weight with another node "
                f"(tied embedding): that weight stays, so the file grows by the factors while "
                f"compute shrinks ({n:,} parameters kept; --exclude head avoids it).")
        if any(t.dtype == "float16" for t, *_ in plan):
            self.record.notes.append(
                "float16 weights: factors are stored as float16 like the weights they replace; "
                "ONNX Runtime's CPU EP runs them through fp32 casts it inserts itself, CUDA runs "
                "them natively.")
        return ir.passes.PassResult(model, modified=bool(plan))

    def _skip(self, t: Target, reason: str | None, kind: str) -> None:
        self.record.skipped.append(Skipped(t.name, t.role, t.block, list(t.shape),
                                           reason or "", kind))

    def _factor_values(self, graph: ir.Graph, t: Target, f: Factors):
        base = t.weight.name or t.name
        suffix = "_T" if t.transposed else ""
        vals = []
        for tag, arr in (("A", f.a), ("B", f.b)):
            name = _unique_name(graph, f"{base}{suffix}.lrc_{tag}{f.rank}")
            v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(arr), name=name))
            v.shape = ir.Shape(arr.shape)
            v.dtype = v.const_value.dtype
            graph.register_initializer(v)
            vals.append(v)
        return vals

    def _rewire(self, graph: ir.Graph, t: Target, a_val, b_val, f: Factors) -> None:
        node = t.node
        x = node.inputs[0]
        mid = ir.Value(name=_unique_name(graph, f"{t.name}/lrc_A_out"))
        meta = dict(node.metadata_props)
        meta[FACTOR_META] = "A"
        a_node = ir.Node("", "MatMul", [x, a_val], outputs=[mid],
                         name=f"{t.name}/lrc_A", metadata_props=meta)
        node.graph.insert_before(node, a_node)  # the node's own (sub)graph
        node.replace_input_with(0, mid)
        node.replace_input_with(1, b_val)
        if node.op_type == "Gemm":
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
        node.metadata_props[FACTOR_META] = "B"
        node.metadata_props["lrc.rank"] = str(f.rank)


def _effective_weight(t: Target) -> np.ndarray:
    w = t.weight.const_value.numpy()
    return np.ascontiguousarray(w.T) if t.transposed else w


def _drop_if_unused(graph: ir.Graph, weight: ir.Value) -> None:
    """Release the dense weight as soon as nothing uses it (streaming memory)."""
    if weight is None or weight.uses() or weight.is_graph_output():
        return
    name = weight.name
    if name in graph.initializers and graph.initializers[name] is weight:
        del graph.initializers[name]


def _unique_name(graph: ir.Graph, name: str) -> str:
    used = graph.meta.setdefault("lrc.names", None)
    if used is None:
        used = set()
        for n in graph:
            for v in n.outputs:
                used.add(v.name)
        used.update(graph.initializers)
        used.update(v.name for v in graph.inputs)
        graph.meta["lrc.names"] = used
    cand, i = name, 1
    while cand in used:
        cand = f"{name}_{i}"
        i += 1
    used.add(cand)
    return cand
