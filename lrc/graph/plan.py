"""Planning: which projections get factorised at which rank, before any factor is computed.

Everything here reads the graph and the policy only (numpy for spectra of ``energy`` settings):

* :func:`build_policy` turns the CLI / API options into a :class:`~lrc.graph.policy.Policy`;
* :func:`solve_budget` turns a global budget (``--target-params``, ``--target-size``) into the
  uniform ratio that meets it;
* :func:`plan_items` decides every target (rewrite at rank r, or why it stays dense) and
  :func:`plan_units` groups the rewrites into factorisations (a shared weight once; with
  ``group_inputs`` the projections reading one tensor jointly);
* :func:`make_plan` does both for a model: the value the compress pipeline hands from its plan
  phase to statistics, factors and passes, so the low-rank pass and calibration act on one plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lrc.errors import LrcError, opt
from lrc.factorize import Factors, break_even_rank, rank_for_ratio, singular_values
from lrc.graph.locate import Target, locate
from lrc.graph.policy import Policy, Setting, load_policy, make_setting

EDGE_BLOCKS = {0, -1}

PlanItem = tuple  # (Target, rank, setting description, note)


def build_policy(*, rank=None, energy=None, ratio=None, include=(), exclude=(), policy=None,
                 align: int = 1, allow_larger: bool = False, group_inputs: bool = False,
                 dense_edges: bool = False) -> Policy:
    """CLI/API options -> Policy. With nothing given the default is ``ratio 0.8``.

    ``dense_edges``: leave the first and the last transformer block dense (before any block rule
    of a policy file); with a budget (``target_params`` ...) the cut goes to the other blocks."""
    pol = _build_policy(rank, energy, ratio, include, exclude, policy, align, allow_larger,
                        group_inputs)
    if dense_edges and not any(b == EDGE_BLOCKS for b, _ in pol.blocks):
        pol.blocks.insert(0, (set(EDGE_BLOCKS), Setting(skip=True)))
    return pol


def _build_policy(rank, energy, ratio, include, exclude, policy, align, allow_larger,
                  group_inputs) -> Policy:
    if isinstance(policy, Policy):
        if group_inputs:
            policy.group_inputs = True
        return policy
    given = any(v is not None for v in (rank, energy, ratio))
    default = make_setting(rank, energy, ratio) if given else make_setting(ratio=0.8)
    base = Policy(default=default, include=list(include or []), exclude=list(exclude or []),
                  align=align, allow_larger=allow_larger, group_inputs=group_inputs)
    if policy is not None:
        pol = load_policy(policy, base)
        if given:  # explicit CLI flags beat the file's default
            pol.default = default
        return pol
    return base


#: target-params is refused when a dense head in its total forces the selected projections
#: this far below it
FORCED_CUT = 0.15


def solve_budget(model: ir.Model, pol: Policy, target_params=None, target_size_mb=None) -> dict:
    """The uniform ratio for the selected projections that meets a global budget.

    ``target_params``: fraction of all eligible projection parameters kept overall (matrices not
    selected count at full size). ``target_size_mb``: size of all initializers in MB. Ranks are
    allocated uniformly: on SmolLM2 every automatic per-layer allocator we measured (normalised
    whitened energy, raw energy, measured sensitivity) lost to uniform, so uniform is what ships.
    A hand-written policy does beat it there: the first and last blocks dense, a uniform ratio
    elsewhere (benchmarks/allocation.md; benchmarks/policies/smollm2-0.78.yaml)."""
    seen: dict = {}
    for t in locate(model):
        if t.eligible and t.weight_key not in seen:
            seen[t.weight_key] = t
    sel = [t for t in seen.values() if pol.setting_for(t)[0] is not None]
    total = sum(t.params for t in seen.values())
    chosen = sum(t.params for t in sel)
    if not chosen:
        raise LrcError("the budget selects no eligible projection")
    if target_params is not None:
        if not 0 < target_params <= 1:
            raise LrcError(f"{opt('target_params')} must be in (0, 1], got {target_params}")
        ratio = (target_params * total - (total - chosen)) / chosen
        want = f"{target_params:g} of {total:,} projection parameters"
        dense = sorted((t for t in seen.values() if t not in sel), key=lambda t: -t.params)
        if 0 < ratio < target_params - FORCED_CUT and any(t.role == "head" for t in dense):
            # a dense (tied) head counted in the total: on a large vocabulary it is most of it
            names = ", ".join(f"{t.role or t.name} {t.params / total:.0%}" for t in dense[:2]
                              if t.params >= 0.01 * total)
            raise LrcError(
                f"{opt('target_params', f'{target_params:g}')} counts all {total:,} projection "
                f"parameters and {(total - chosen) / total:.0%} of them stay dense ({names}): "
                f"the selected projections would keep only {ratio:.0%} of theirs, a cut that "
                f"destroys language models (Gemma-3-270M this way: perplexity x44.5 on a "
                f"held-out text); give {opt('ratio', f'{ratio:.2f}')} to accept that cut, or "
                f"a larger target")
    else:
        itemsize = {t.weight_key: t.weight.const_value.dtype.itemsize for t in sel}
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                   if v.const_value is not None)
        sel_bytes = sum(t.params * itemsize[t.weight_key] for t in sel)
        tied = sum(t.params * itemsize[t.weight_key] for t in sel if t.tied)
        # the selected matrices' bytes scale with the ratio; tied ones add their factors
        ratio = (target_size_mb * 1e6 - (size - sel_bytes + tied)) / sel_bytes
        want = f"{target_size_mb:g} MB of weights (now {size / 1e6:.1f} MB)"
    if ratio <= 0:
        raise LrcError(f"budget {want} cannot be met by factorising the selected projections")
    if ratio >= 1:
        raise LrcError(f"budget {want} needs no compression of the selected projections")
    return {"ratio": round(float(ratio), 6), "target": want, "allocation": "uniform",
            "selected_params": int(chosen), "all_params": int(total)}


def effective_weight(t: Target) -> np.ndarray:
    """The ``[in, out]`` matrix a target multiplies by (the initializer, transposed if fed so)."""
    w = t.weight.const_value.numpy()
    return np.ascontiguousarray(w.T) if t.transposed else w


@dataclass
class Unit:
    """What one factorisation serves. ``joint=False``: targets sharing one weight (factored once,
    each node gets the same A and B). ``joint=True``: targets reading one input with different
    weights, factored as ``[W_1 W_2 ...]`` (one A node shared, one B per target)."""

    items: list
    rank: int
    joint: bool = False
    scales: list = field(default_factory=list)

    @property
    def first(self) -> Target:
        return self.items[0][0]

    def weight(self) -> np.ndarray:
        """The matrix this unit factors: the weight, or the members' weights side by side,
        each divided by its Frobenius norm (so the joint truncation balances relative errors
        instead of favouring the largest member; :meth:`unscale` puts the norms back in B)."""
        if not self.joint:
            return effective_weight(self.first)
        ws = [effective_weight(it[0]) for it in self.items]
        self.scales = [float(np.linalg.norm(w)) or 1.0 for w in ws]
        return np.concatenate([w / s for w, s in zip(ws, self.scales)], axis=1)

    def unscale(self, f: Factors) -> Factors:
        if not self.joint:
            return f
        b = np.array(f.b, copy=True)
        for sl, s in zip(self.b_slices(), self.scales):
            b[:, sl] *= s
        return dataclasses.replace(f, b=b.astype(f.b.dtype, copy=False))

    def key(self) -> tuple:
        return (*self.first.weight_key, self.rank)

    def b_slices(self) -> list[slice]:
        out, off = [], 0
        for it in self.items:
            n = it[0].shape[1]
            out.append(slice(off, off + n))
            off += n
        return out


def plan_items(targets: list[Target], policy: Policy, on_skip=None) -> list[PlanItem]:
    """(target, rank, setting, note) for every target the policy rewrites, in graph order."""
    plan: list[PlanItem] = []
    spectra: dict[tuple, np.ndarray] = {}
    for t in targets:
        if not t.eligible:
            if on_skip:
                on_skip(t, t.skip, "ineligible")
            continue
        sigma = None
        if policy.needs_spectrum:
            setting, _ = policy.setting_for(t)
            if setting is not None and setting.needs_spectrum:
                if t.weight_key not in spectra:
                    spectra[t.weight_key] = singular_values(effective_weight(t))
                sigma = spectra[t.weight_key]
        d = policy.decide(t, sigma)
        if d.rank is None:
            if on_skip:
                on_skip(t, d.reason, d.kind)
        else:
            plan.append((t, d.rank, d.setting.describe(), d.reason))
    return plan


def plan_units(plan: list[PlanItem], policy: Policy) -> list[Unit]:
    """Group planned targets into factorisations (see :class:`Unit`), in graph order.

    Joint groups (``policy.group_inputs``) take targets that read the same value, have a ratio
    setting of the same value and dtype, and whose weight nothing else uses; the joint rank is
    the ratio's rank for the ``in x sum(out)`` matrix. Anything else is factored on its own."""
    by_weight: dict[tuple, list] = {}
    for item in plan:
        by_weight.setdefault(item[0].weight_key, []).append(item)
    joint: dict[tuple, list] = {}
    if policy.group_inputs:
        for item in plan:
            t = item[0]
            setting, _ = policy.setting_for(t)
            if (t.tied or len(by_weight[t.weight_key]) > 1 or setting is None
                    or setting.ratio is None or setting.rank is not None):
                continue
            key = (id(t.node.inputs[0]), float(setting.ratio), t.dtype)
            joint.setdefault(key, []).append(item)
    member: dict[int, tuple] = {}
    for key, items in joint.items():
        if len(items) < 2:
            continue
        m = items[0][0].shape[0]
        n = sum(it[0].shape[1] for it in items)
        r = rank_for_ratio(m, n, key[1])
        if policy.align > 1:
            r = max(policy.align, (r // policy.align) * policy.align)
        if r >= min(m, n) or r > break_even_rank(m, n):
            continue
        for it in items:
            member[id(it[0].node)] = (key, r)
    units: list[Unit] = []
    made: dict[tuple, Unit] = {}
    for item in plan:
        t = item[0]
        if id(t.node) in member:
            key, r = member[id(t.node)]
            if key not in made:
                made[key] = Unit([], r, joint=True)
                units.append(made[key])
            made[key].items.append(item)
            continue
        wkey = (*t.weight_key, item[1])
        if wkey not in made:
            made[wkey] = Unit([], item[1])
            units.append(made[wkey])
        made[wkey].items.append(item)
    return units


@dataclass
class Plan:
    """A model's plan: the rewrites (graph order), what stays dense and why, the units."""

    policy: Policy
    targets: list[Target]
    items: list[PlanItem]
    skipped: list[tuple[Target, str | None, str]]  # (target, reason, kind)
    units: list[Unit]

    def calibration_inputs(self) -> list[str]:
        """Names of the tensors whose statistics data-aware methods need: the input of every
        eligible projection the policy selects (sorted; also those left dense as unprofitable,
        so the statistics cache key does not depend on ranks)."""
        return sorted({t.node.inputs[0].name for t in self.targets
                       if t.eligible and self.policy.setting_for(t)[0] is not None})


def make_plan(model: ir.Model, policy: Policy) -> Plan:
    """Locate the targets of ``model`` and decide each one (see :func:`plan_items`)."""
    targets = locate(model)
    skipped: list = []
    items = plan_items(targets, policy, on_skip=lambda t, why, kind: skipped.append((t, why, kind)))
    return Plan(policy, targets, items, skipped, plan_units(items, policy))


__all__ = ["EDGE_BLOCKS", "Plan", "PlanItem", "Unit", "build_policy", "effective_weight",
           "make_plan", "plan_items", "plan_units", "solve_budget"]
