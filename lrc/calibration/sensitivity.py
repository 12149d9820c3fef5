"""Measured sensitivity: how far the model's output moves when some weights change.

:class:`Probe` opens ONE ONNX Runtime session of the model in which the named weight
initializers are overridable (listed as graph inputs too, so a run may feed other values in
their place), runs the dense model once on a few calibration windows, and then answers
``probe({weight name: new value})`` with the mean KL divergence of the next-token distribution
(the output logits) from the dense one, over the windows' tokens. The quantisation allocator
(:mod:`lrc.allocate`) asks it once per group of projections with that group alone quantised:
the output error each choice causes, measured, not guessed from the per-matrix error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from lrc.errors import LrcError


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities of logits along the last axis (float32; the sums in float64): the
    one used wherever lrc scores a language model (:mod:`lrc.measure.quality` too)."""
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def _split_tied_tables(proto: onnx.ModelProto, names: list[str], inits: dict) -> dict[str, str]:
    """A table read both by an embedding's ``Gather`` (directly or through a ``Transpose``
    only Gathers read) and by other nodes (a tied head's MatMul): the embedding's nodes read a
    second name, ``NAME::embedding``, so a probe can change the head and the embedding apart.
    Returns ``{name: the second name}``; the caller feeds both (no copy of the table)."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for i, x in enumerate(node.input):
            consumers.setdefault(x, []).append((node, i))

    def gathers_only(node) -> bool:
        uses = consumers.get(node.output[0], [])
        return bool(uses) and all(c.op_type == "Gather" and j == 0 for c, j in uses)

    out = {}
    for n in names:
        uses = consumers.get(n, [])
        emb = [(node, i) for node, i in uses
               if (node.op_type == "Gather" and i == 0)
               or (node.op_type == "Transpose" and gathers_only(node))]
        if not emb or len(emb) == len(uses):
            continue
        alias = f"{n}::embedding"
        for node, i in emb:
            node.input[i] = alias
        inits[alias] = inits[n]
        out[n] = alias
    return out


def _array(model, t: onnx.TensorProto, base) -> np.ndarray:
    """An initializer's values: from the in-memory model when it holds them (a lazy tensor is
    mapped, not read), else from the proto (its external data beside ``base``)."""
    import onnx_ir as ir

    if isinstance(model, ir.Model) and t.name in model.graph.initializers:
        v = model.graph.initializers[t.name].const_value
        if v is not None:
            return v.numpy()
    return onnx.numpy_helper.to_array(t, str(base) if base is not None else "")


# the KL terms' tensors in the probe's graph (:func:`_kl_terms`)
KL_REF, KL_P, KL_DOT, KL_LSE = ("lrc_probe_ref_logits", "lrc_probe_ref_p", "lrc_probe_dot",
                                "lrc_probe_lse")


def _kl_terms(proto: onnx.ModelProto, logits: str) -> None:
    """Nodes after ``logits [batch, seq, vocab]`` giving per token ``Σ_v p_v (z_v − logits_v)``
    (``KL_DOT``; ``z``, ``p``: the dense logits and probabilities, inputs with a zero default so
    a run that does not ask for it needs neither) and ``log Σ_v exp(logits_v)`` (``KL_LSE``)."""
    from onnx import TensorProto, helper

    g = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        raise LrcError(f"sensitivity probe: the model's opset {opset} is below 13")
    for name in (KL_REF, KL_P):
        g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [1, 1, 1], [0.0]))
        g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    axes = "lrc_probe_axes"
    g.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [1], [-1]))
    kind = next(o.type.tensor_type.elem_type for o in g.output if o.name == logits)
    if kind != TensorProto.FLOAT:  # float16 logits: the terms in float32
        g.node.append(helper.make_node("Cast", [logits], ["lrc_probe_logits32"],
                                       to=TensorProto.FLOAT))
        logits = "lrc_probe_logits32"
    lse = (helper.make_node("ReduceLogSumExp", [logits, axes], [KL_LSE], keepdims=0)
           if opset >= 18 else
           helper.make_node("ReduceLogSumExp", [logits], [KL_LSE], axes=[-1], keepdims=0))
    g.node.extend([
        helper.make_node("Sub", [KL_REF, logits], ["lrc_probe_diff"]),
        helper.make_node("Mul", [KL_P, "lrc_probe_diff"], ["lrc_probe_pdiff"]),
        helper.make_node("ReduceSum", ["lrc_probe_pdiff", axes], [KL_DOT], keepdims=0),
        lse])
    for name in (KL_DOT, KL_LSE):
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))


class Probe:
    """``probe(values) -> KL``: mean KL(dense || changed) of the next-token distribution over
    ``batches`` (token-id windows) with the weights in ``values`` replaced (stored layout and
    dtype of each initializer). ``source``: what calibration runs (a model reference's source:
    a file or a model in memory); ``names``: the initializers a probe may replace. A tied
    table (a head's weight an embedding also reads) is two: ``name`` is what the head reads,
    ``embedding_inputs[name]`` what the embedding reads."""

    def __init__(self, source, names: list[str], batches: list, *, path=None, ref=None,
                 threads: int | None = None):
        from lrc.calibration.stats import _graph_proto, _origin, _source
        from lrc.runtime.session import open_session

        model, ref0 = _source(source, path)
        ref = ref or ref0
        path = _origin(ref0) if path is None else path
        proto, self._keep = _graph_proto(model, path)
        inits = {t.name: t for t in proto.graph.initializer}
        missing = [n for n in names if n not in inits]
        if missing:
            raise LrcError(f"sensitivity probe: {missing[0]!r} is not an initializer")
        have = {i.name for i in proto.graph.input}
        self.embedding_inputs = _split_tied_tables(proto, names, inits)
        # a split table: both names are inputs fed from one array, its initializer dropped
        base = getattr(self._keep, "dir", None) or (Path(path).parent if path else None)
        self._tables: dict[str, np.ndarray] = {}
        for n, alias in self.embedding_inputs.items():
            self._tables[n] = self._tables[alias] = _array(model, inits[n], base)
            proto.graph.initializer.remove(inits[n])
        names = [*names, *self.embedding_inputs.values()]
        for n in names:
            if n not in have:
                t = inits[n]
                proto.graph.input.append(onnx.helper.make_tensor_value_info(
                    n, t.data_type, list(t.dims)))
        if proto.ir_version < 4:
            proto.ir_version = 4
        self.output = proto.graph.output[0].name
        _kl_terms(proto, self.output)
        data = proto.SerializeToString()
        del proto
        self.sess = open_session(data, threads=threads, path=path, optimization="all",
                                 ref=ref, what=" for the sensitivity probe")
        from lrc.runtime.feeds import text_feeds

        self.feeds = [{**self._tables, **b} if isinstance(b, dict) else
                      text_feeds(self.sess, np.asarray(b),
                                 fill_other=self._table)
                      for b in batches]
        # per window the dense logits and probabilities (fed back to each probe's KL terms),
        # then both terms of the dense model itself from a run that asks what a probe asks (on
        # float16 logits ORT computes the terms apart from the logits it returns): subtracted,
        # unchanged weights give exactly 0
        self.refs = []
        for f in self.feeds:
            logits = self._run([self.output], f)[0]
            if logits.ndim != 3:
                raise LrcError(f"sensitivity probe: output {self.output!r} has shape "
                               f"{logits.shape}, not [batch, sequence, vocabulary] logits")
            ref = {KL_REF: logits.astype(np.float32, copy=False),
                   KL_P: np.exp(log_softmax(logits))}
            dot, lse = self._run([KL_DOT, KL_LSE], {**f, **ref})
            self.refs.append({**ref, "dot": float(np.sum(dot, dtype=np.float64)),
                              "lse": lse.astype(np.float64)})

    def _table(self, spec) -> np.ndarray:
        if spec.name not in self._tables:
            raise LrcError(f"sensitivity probe: don't know how to fill input {spec.name!r}")
        return self._tables[spec.name]

    def _run(self, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        try:
            return self.sess.run(outputs, feeds)
        except Exception as e:  # ORT raises its own types
            raise LrcError(f"sensitivity probe failed in onnxruntime: "
                           f"{str(e).splitlines()[0][:300]}") from e

    def __call__(self, values: dict[str, np.ndarray]) -> float:
        """Mean over the windows' tokens of ``KL(p‖q) = Σ_v p_v (z_v − z'_v) + lse(z') −
        lse(z)`` (``z`` the dense logits, ``p`` their softmax, ``z'`` the changed ones): the
        sum over the vocabulary in the session (:func:`_kl_terms`), not a copy of the logits."""
        kl, n = 0.0, 0
        for feeds, ref in zip(self.feeds, self.refs):
            dot, lse = self._run([KL_DOT, KL_LSE], {**feeds, **values, KL_REF: ref[KL_REF],
                                                    KL_P: ref[KL_P]})
            kl += float(np.sum(dot, dtype=np.float64) - ref["dot"] + np.sum(lse - ref["lse"]))
            n += lse.size
        return kl / max(n, 1)


__all__ = ["Probe", "log_softmax"]
