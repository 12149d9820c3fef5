"""Migrate activation outliers into the weights (SmoothQuant, Xiao et al., ICML 2023), adding no node.

Dynamic INT8 quantises each activation tensor with ONE scale: a few outlier channels (LLMs have
them after every norm) set that scale and crush every other channel. For a tensor ``X`` read
only by projections ``Y_i = X·W_i``, ``X·W_i = (X·diag(s)⁻¹)·(diag(s)·W_i)`` for any positive
``s``: divide the channels by ``s_j = a_j^α / w_j^(1-α)`` (``a_j``: the channel's activation
scale on calibration text, ``w_j``: the largest ``|W_ij|`` over the readers) and the outliers
move into the weights, which are quantised per output column and absorb them better.

The division is folded into whatever produces ``X``, so the graph keeps its nodes:

* ``Mul(x̂, γ)`` with a constant per-channel ``γ`` (RMSNorm / LayerNorm as exported, also
  ``Add(Mul(x̂, γ), β)``; ``LayerNormalization`` / ``SimplifiedLayerNormalization``'s scale and
  bias): ``γ /= s`` (and ``β /= s``);
* ``Mul(a, Y_up)`` where ``Y_up = X_up·W_up`` is a projection read only by that ``Mul`` (the
  gated MLP's ``act(gate) * up`` feeding ``down``): the columns of ``W_up`` ``/= s``.

Other producers (the attention output feeding ``o_proj``) are left as they are and said so.

``alpha="auto"`` is AWQ (Lin et al., MLSys 2024) instead: ``s = a^α`` with ``α`` searched per
tensor on the output error the readers' weight-only block codes leave, measured with the
input's Gram (:func:`lrc.quantmath.awq_scales`); a tensor no scaling helps is left as it is.
Readers other than the projections may only be ``Shape`` nodes. The pass changes weights only:
``self.applied`` maps each smoothed tensor to its ``s`` (the Gram matrix of the new ``X`` is
``diag(s)⁻¹ G diag(s)⁻¹``, which the quantisation pass's corrector needs).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from lrc.graph.locate import Target, locate
from lrc.graph.plan import effective_weight
from lrc.quantmath import awq_scales

_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
          "SkipSimplifiedLayerNormalization")


def smoothing_scales(act: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = a_j^α / w_j^(1-α)``, normalised to geometric mean 1 and clipped to a factor of
    100 either side (a dead channel must not blow up)."""
    a = np.maximum(np.asarray(act, np.float64), 1e-8)
    w = np.maximum(np.asarray(w_absmax, np.float64), 1e-8)
    s = a ** alpha / w ** (1 - alpha)
    s /= np.exp(np.mean(np.log(s)))
    return np.clip(s, 1e-2, 1e2)


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    return v.const_value.numpy()


def _set_const(graph: ir.Graph, v: ir.Value, arr: np.ndarray) -> None:
    v.const_value = ir.tensor(np.ascontiguousarray(arr.astype(v.const_value.numpy().dtype)),
                              name=v.name)


class SmoothPass(ir.passes.InPlacePass):
    """``act_scales``: ``{tensor name: per-channel activation scale}`` (from calibration);
    ``select(target)``: the projections that will be quantised (only tensors whose every
    projection reader is selected are smoothed)."""

    def __init__(self, act_scales: dict[str, np.ndarray], alpha: float | str = 0.5,
                 select: Callable[[Target], bool] | None = None, *, grams=None,
                 bits: int = 4, block_size: int = 32):
        """``alpha="auto"`` (AWQ): ``grams`` maps each tensor to its ``XᵀX`` and ``bits`` /
        ``block_size`` are the readers' codes the search measures."""
        super().__init__()
        self.act_scales = act_scales
        self.alpha = alpha
        self.select = select
        self.grams, self.bits, self.block_size = grams, bits, block_size
        self.applied: dict[str, np.ndarray] = {}
        self.record: dict = {"alpha": alpha, "smoothed": [], "left": []}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets = [t for t in locate(model) if t.eligible and t.op == "MatMul"
                   and (self.select is None or self.select(t))]
        readers: dict[int, list[Target]] = {}
        values: dict[int, ir.Value] = {}
        for t in targets:
            x = t.node.inputs[0]
            readers.setdefault(id(x), []).append(t)
            values[id(x)] = x
        for key, ts in readers.items():
            x = values[key]
            why = self._smooth(graph, x, ts)
            if why:
                self.record["left"].append({"tensor": x.name, "reason": why})
        return ir.passes.PassResult(model, modified=bool(self.applied))

    def _smooth(self, graph: ir.Graph, x: ir.Value, ts: list[Target]) -> str | None:
        act = self.act_scales.get(x.name)
        if act is None:
            return "no calibration statistics"
        mine = {id(t.node) for t in ts}
        for user, _ in x.uses():
            if id(user) not in mine and user.op_type != "Shape":
                return f"also read by {user.op_type} {user.name!r}"
        if x.is_graph_output() or x.is_graph_input():
            return "a graph input or output"
        if any(t.transposed or len(t.weight.uses()) > 1 for t in ts):
            return "a reader's weight is shared or transposed"
        searched = None
        if self.alpha == "auto":
            gram = self.grams.get(x.name) if self.grams is not None else None
            if gram is None:
                return "no Gram matrix"
            w = np.concatenate([effective_weight(t) for t in ts], axis=1)
            if w.shape[0] % self.block_size:
                return f"{w.shape[0]} channels: not whole blocks of {self.block_size}"
            s, alpha, before, after = awq_scales(act, w, gram, self.bits, self.block_size)
            if alpha == 0:
                return "no scaling lowers its readers' output error"
            searched = {"alpha": alpha, "error_ratio": round(after / before, 4)}
        else:
            w_absmax = np.max([np.abs(effective_weight(t)).max(axis=1) for t in ts], axis=0)
            s = smoothing_scales(act, w_absmax, self.alpha)
        fold = self._folder(x, s)
        if isinstance(fold, str):
            return fold
        fold()
        for t in ts:
            w = t.weight.const_value.numpy()
            _set_const(graph, t.weight, w * s[:, None].astype(w.dtype))
        self.applied[x.name] = s
        self.record["smoothed"].append({
            "tensor": x.name, "readers": [t.name for t in ts],
            "s_max_over_min": round(float(s.max() / s.min()), 2), **(searched or {})})
        return None

    def _folder(self, x: ir.Value, s: np.ndarray):
        """A function dividing ``x``'s channels by ``s`` at its producer, or why not."""
        p = x.producer()
        if p is None:
            return "no producer"
        if p.op_type in _NORMS:
            if x is not p.outputs[0]:
                return f"{p.op_type}'s output {x.name!r} is not its normalised one"
            # (X, scale[, B]); Skip*: (input, skip, gamma[, beta]); SkipSimplified's 4th input
            # is a bias added before the norm, not after: gamma only
            first = 2 if p.op_type.startswith("Skip") else 1
            simple = "Simplified" in p.op_type
            scale = p.inputs[first] if len(p.inputs) > first else None
            bias = p.inputs[first + 1] if len(p.inputs) > first + 1 and not simple else None
            consts = [v for v in (scale, bias) if v is not None]
            if not consts or any(_const(v) is None or len(v.uses()) > 1 for v in consts):
                return f"{p.op_type}'s scale / bias are not constants of its own"
            return lambda: [_set_const(None, v, _const(v) / s) for v in consts]
        if p.op_type == "Add":
            for i in (0, 1):
                beta, other = p.inputs[i], p.inputs[1 - i]
                b = _const(beta)
                if b is not None and b.shape[-1:] == s.shape and len(beta.uses()) == 1 \
                        and other.producer() is not None and len(other.uses()) == 1:
                    inner = self._folder(other, s)
                    if isinstance(inner, str):
                        return inner
                    return lambda: (inner(), _set_const(None, beta, b / s))
            return "Add without a per-channel constant"
        if p.op_type == "Mul":
            for i in (0, 1):
                gamma, other = p.inputs[i], p.inputs[1 - i]
                g = _const(gamma)
                if g is not None and g.ndim >= 1 and g.shape[-1] == s.shape[0] \
                        and int(np.prod(g.shape)) == s.shape[0] and len(gamma.uses()) == 1:
                    return lambda: _set_const(None, gamma, g / s.reshape(g.shape))
            for i in (0, 1):  # act(gate) * up: fold into up's columns
                up = p.inputs[i].producer()
                if up is not None and up.op_type == "MatMul" and len(p.inputs[i].uses()) == 1:
                    wv = up.inputs[1]
                    w = _const(wv)
                    if w is not None and w.ndim == 2 and w.shape[1] == s.shape[0] \
                            and len(wv.uses()) == 1:
                        return lambda: _set_const(None, wv, w / s[None, :])
            return "Mul without a per-channel constant or a projection factor"
        return f"produced by {p.op_type}"


__all__ = ["SmoothPass", "smoothing_scales"]
