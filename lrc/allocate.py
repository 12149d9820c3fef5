"""Bytes where they pay: one choice per group of weights under a byte budget (no ONNX here).

Each group (the projections that read one input) has a menu of :class:`Choice` s — bits, block
size, correction rank — each with its exact bytes and its predicted loss: the group's measured
sensitivity (how much the model's output moves per unit of the group's whitened error, measured
by running the model with only that group quantised: :mod:`lrc.calibration.sensitivity`) times
the whitened error the choice leaves. :func:`allocate` starts every group at its cheapest
choice and spends the rest of the budget where a byte removes most predicted loss, walking
each menu's lower convex hull (a multiple-choice knapsack, solved greedily; exact at the hull's
corners).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


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

    def label(self) -> str:
        return f"int{self.bits}/{self.block}" + (f"+r{self.rank}" if self.rank else "")


@dataclass
class Allocation:
    picks: list[int]  # the chosen index into each menu
    nbytes: int
    loss: float  # predicted: sum of sensitivity x error
    min_bytes: int  # every group at its cheapest choice
    max_bytes: int  # every group at its best choice


def _hull(menu: list[Choice], sens: float) -> list[int]:
    """Indices of the menu's lower convex hull in (bytes, loss), cheapest first: choices that
    are worse and dearer than another, or above the hull, are never worth their bytes."""
    order = sorted(range(len(menu)), key=lambda i: (menu[i].nbytes, menu[i].err))
    pts: list[int] = []
    for i in order:
        if pts and sens * menu[i].err >= sens * menu[pts[-1]].err:
            continue  # dearer and no better
        while len(pts) >= 2:
            a, b = menu[pts[-2]], menu[pts[-1]]
            c = menu[i]
            # b above the segment a-c: drop it
            if (b.err - a.err) * (c.nbytes - a.nbytes) >= (c.err - a.err) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def allocate(menus: list[list[Choice]], sens: list[float], budget: float) -> Allocation:
    """The choice per group that minimises ``sum(sens[g] * err)`` within ``budget`` bytes
    (greedy on each menu's hull: upgrades taken by loss removed per byte while they fit)."""
    hulls = [_hull(m, max(s, 0.0)) for m, s in zip(menus, sens)]
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
        return (sens[g] * (a.err - b.err)) / max(b.nbytes - a.nbytes, 1), b.nbytes - a.nbytes

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
    return Allocation(picks, int(spent), float(loss), int(min_bytes), int(max_bytes))


__all__ = ["Allocation", "Choice", "allocate"]
