"""Bytes where they pay: one choice per group of weights under a byte budget (no ONNX here).

Each group (the projections that read one input) has a menu of :class:`Choice` s — bits, block
size, correction rank — each with its exact bytes and its predicted loss: the group's measured
sensitivity (how much the model's output moves per unit of the group's whitened error, measured
by running the model with only that group quantised: :mod:`lrc.calibration.sensitivity`) times
the whitened error the choice leaves. :func:`allocate` starts every group at its cheapest
choice and spends the rest of the budget where a byte removes most predicted loss, walking
each menu's lower convex hull (a multiple-choice knapsack, solved greedily; exact at the hull's
corners).

A second budget, on time: each choice may carry its predicted seconds per decoded token (its
MatMuls' time, :mod:`lrc.runtime.decodecost`). With ``seconds_budget`` the allocator prices a
second as ``lam`` units of loss (a Lagrange multiplier) and raises ``lam`` (bisection) until the
choices fit both budgets: a correction's fixed cost then goes where it removes most loss. A
third, on a prompt's time (``prefill_budget``: the MatMuls' predicted seconds at 128 tokens,
where the kernels are bound by arithmetic and a correction's two extra nodes cost more than at
one token), is priced the same way, ``mu`` per second, around the decode price.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Choice:
    """One way to store a group: ``bits``-bit codes in blocks of ``block`` rows, a correction
    of ``rank``, costing ``nbytes``, leaving ``err`` (the members' summed relative squared
    whitened output error)."""

    bits: int
    block: int
    rank: int
    nbytes: int
    err: float
    seconds: float = 0.0  # predicted time of the group's MatMuls per decoded token
    prefill: float = 0.0  # predicted time of the group's MatMuls over a prompt

    def label(self) -> str:
        return f"int{self.bits}/{self.block}" + (f"+r{self.rank}" if self.rank else "")


@dataclass
class Allocation:
    picks: list[int]  # the chosen index into each menu
    nbytes: int
    loss: float  # predicted: sum of sensitivity x error
    min_bytes: int  # every group at its cheapest choice
    max_bytes: int  # every group at its best choice
    seconds: float = 0.0  # predicted seconds per decoded token of the choices taken
    lam: float = 0.0  # loss per second the time budget was priced at (0: it did not bind)
    seconds_met: bool = True  # within seconds_budget (when one was given)
    prefill: float = 0.0  # predicted seconds of the choices taken over a prompt
    mu: float = 0.0  # loss per second of prefill the prefill budget was priced at
    prefill_met: bool = True  # within prefill_budget (when one was given)


def _hull(menu: list[Choice], sens: float, lam: float = 0.0, mu: float = 0.0) -> list[int]:
    """Indices of the menu's lower convex hull in (bytes, loss + lam x seconds + mu x
    prefill), cheapest first: choices that are worse and dearer than another, or above the
    hull, are never worth their bytes."""
    v = [sens * c.err + lam * c.seconds + mu * c.prefill for c in menu]
    order = sorted(range(len(menu)), key=lambda i: (menu[i].nbytes, v[i]))
    pts: list[int] = []
    for i in order:
        if pts and v[i] >= v[pts[-1]]:
            continue  # dearer and no better
        while len(pts) >= 2:
            a, b, c = pts[-2], pts[-1], i
            # b above the segment a-c: drop it
            if ((v[b] - v[a]) * (menu[c].nbytes - menu[a].nbytes)
                    >= (v[c] - v[a]) * (menu[b].nbytes - menu[a].nbytes)):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def allocate(menus: list[list[Choice]], sens: list[float], budget: float,
             seconds_budget: float | None = None,
             prefill_budget: float | None = None) -> Allocation:
    """The choice per group that minimises ``sum(sens[g] * err)`` within ``budget`` bytes
    (greedy on each menu's hull: upgrades taken by loss removed per byte while they fit) and,
    given ``seconds_budget``, within that many predicted seconds per decoded token: the
    smallest price ``lam`` per second that brings the choices under it (bisection); when none
    does, the fastest allocation found, with ``seconds_met`` False. ``prefill_budget`` bounds
    the choices' predicted prefill seconds the same way (a price ``mu``, the decode price
    found again at each), with ``prefill_met``."""
    def decode_at(mu: float) -> Allocation:
        a = _meet(lambda lam: _allocate(menus, sens, budget, lam, mu), "seconds",
                  seconds_budget)
        return replace(a, seconds_met=seconds_budget is None
                       or a.seconds <= seconds_budget * (1 + 1e-12))

    best = _meet(decode_at, "prefill", prefill_budget)
    best = replace(best, prefill_met=prefill_budget is None
                   or best.prefill <= prefill_budget * (1 + 1e-12))
    if best.lam == 0 and best.mu == 0:
        return best
    return _improve(menus, sens, budget, seconds_budget, prefill_budget, best)


def _meet(alloc_at, key: str, limit: float | None, steps: int = 30) -> Allocation:
    """The allocation ``alloc_at(price)`` at the smallest price whose ``key`` seconds are
    within ``limit`` (x4 until one is, then bisection); none is: the fastest one found."""
    first = alloc_at(0.0)
    if limit is None or getattr(first, key) <= limit:
        return first
    # a price per second: from one that is negligible against the loss, x4 until it binds
    scale = max(first.loss, 1e-30) / max(getattr(first, key), 1e-30)
    lo, hi, fastest = 0.0, scale * 1e-3, first
    for _ in range(40):
        a = alloc_at(hi)
        if getattr(a, key) <= limit:
            break
        if getattr(a, key) < getattr(fastest, key):
            fastest = a
        lo, hi = hi, hi * 4
    else:  # no price meets it: the fastest found
        return fastest
    best = a
    for _ in range(steps):  # the smallest price that meets it
        mid = (lo + hi) / 2
        a = alloc_at(mid)
        if getattr(a, key) <= limit:
            hi, best = mid, a
        else:
            lo = mid
    return best


def _improve(menus, sens, budget, seconds_budget, prefill_budget, a: Allocation) -> Allocation:
    """The priced allocation lies on the hull of (loss, seconds): a better one may fit between
    its points. Change one group at a time to the choice that removes most loss and keeps every
    budget (a time budget missed: no slower than it is), while one does."""
    picks = list(a.picks)
    spent = sum(m[p].nbytes for m, p in zip(menus, picks))
    secs = sum(m[p].seconds for m, p in zip(menus, picks))
    pre = sum(m[p].prefill for m, p in zip(menus, picks))
    s_cap = max(seconds_budget, secs) if seconds_budget is not None else float("inf")
    p_cap = max(prefill_budget, pre) if prefill_budget is not None else float("inf")
    while True:
        best = None
        for g, (m, s) in enumerate(zip(menus, sens)):
            cur = m[picks[g]]
            for i, c in enumerate(m):
                gain = s * (cur.err - c.err)
                if (gain > 0 and spent - cur.nbytes + c.nbytes <= budget
                        and secs - cur.seconds + c.seconds <= s_cap * (1 + 1e-12)
                        and pre - cur.prefill + c.prefill <= p_cap * (1 + 1e-12)
                        and (best is None or gain > best[0])):
                    best = (gain, g, i)
        if best is None:
            break
        _, g, i = best
        spent += menus[g][i].nbytes - menus[g][picks[g]].nbytes
        secs += menus[g][i].seconds - menus[g][picks[g]].seconds
        pre += menus[g][i].prefill - menus[g][picks[g]].prefill
        picks[g] = i
    loss = sum(s * m[p].err for m, s, p in zip(menus, sens, picks))
    return replace(a, picks=picks, nbytes=int(spent), loss=float(loss), seconds=float(secs),
                   prefill=float(pre))


def _allocate(menus, sens, budget, lam, mu=0.0) -> Allocation:
    hulls = [_hull(m, max(s, 0.0), lam, mu) for m, s in zip(menus, sens)]
    at = [0] * len(menus)
    picks = [h[0] for h in hulls]
    spent = sum(m[p].nbytes for m, p in zip(menus, picks))
    min_bytes = spent
    max_bytes = sum(min(m, key=lambda c: (c.err, c.nbytes)).nbytes for m in menus)

    def gain(g):
        h, i = hulls[g], at[g]
        if i + 1 >= len(h):
            return None
        a, b = menus[g][h[i]], menus[g][h[i + 1]]
        removed = (sens[g] * (a.err - b.err) + lam * (a.seconds - b.seconds)
                   + mu * (a.prefill - b.prefill))
        return removed / max(b.nbytes - a.nbytes, 1), b.nbytes - a.nbytes

    heap = []
    for g in range(len(menus)):
        x = gain(g)
        if x is not None:
            heap.append((-x[0], g))
    heapq.heapify(heap)
    while heap:
        _, g = heapq.heappop(heap)
        _, extra = gain(g)
        if spent + extra > budget:
            continue  # this step does not fit; a later, cheaper one of another group may
        spent += extra
        at[g] += 1
        picks[g] = hulls[g][at[g]]
        x = gain(g)
        if x is not None:
            heapq.heappush(heap, (-x[0], g))
    loss = sum(s * m[p].err for m, s, p in zip(menus, sens, picks))
    seconds = sum(m[p].seconds for m, p in zip(menus, picks))
    prefill = sum(m[p].prefill for m, p in zip(menus, picks))
    return Allocation(picks, int(spent), float(loss), int(min_bytes), int(max_bytes),
                      float(seconds), float(lam), prefill=float(prefill), mu=float(mu))


__all__ = ["Allocation", "Choice", "allocate"]
