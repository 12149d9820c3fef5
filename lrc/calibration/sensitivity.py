"""Measured sensitivity: how far the model's output moves when some weights change.

:class:`Probe` opens ONE ONNX Runtime session of the model in which the named weight
initializers are overridable (listed as graph inputs too, so a run may feed other values in
their place), runs the dense model once on a few calibration windows, and then answers
``probe({weight name: new value})`` with the mean KL divergence of the next-token distribution
(the output logits) from the dense one, over the windows' tokens. The quantisation allocator
(:mod:`lrc.allocate`) asks it once per group of projections with that group alone quantised:
the output error each choice causes, measured, not guessed from the per-matrix error.

A run changes the weights of one group, so it need not start at the input: the probe opens
sessions of the graph's tails (:func:`lrc.graph.expose.tail_nodes`: the nodes after a cut, fed what the dense model
computed before it — the residual stream, the attention's masks) and starts each run in the
shortest one that holds every node its weights reach. One tail, from the head's input, ends in
the KL terms; the others end where it starts and hand it their result, so only that session
holds logits-sized buffers. Each tail measures against its own dense run: unchanged weights
still give exactly 0. On the builder's SmolLM2 (2 cores) a run costs 1.2 s from the input,
0.3 s from the head's; target-size's 124 runs took 122 s instead of 174 s, the same choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from lrc.errors import LrcError
from lrc.graph.expose import data_flow, has_subgraphs, tail_nodes, tail_proto


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


#: tails of the graph (cuts) the probe opens beside the whole graph, at most
PROBE_CUTS = 8


class Probe:
    """``probe(values) -> KL``: mean KL(dense || changed) of the next-token distribution over
    ``batches`` (token-id windows) with the weights in ``values`` replaced (stored layout and
    dtype of each initializer). ``source``: what calibration runs (a model reference's source:
    a file or a model in memory); ``names``: the initializers a probe may replace. A tied
    table (a head's weight an embedding also reads) is two: ``name`` is what the head reads,
    ``embedding_inputs[name]`` what the embedding reads. ``cuts``: how many tails of the graph
    a run may start in (0: every run through the whole graph)."""

    def __init__(self, source, names: list[str], batches: list, *, path=None, ref=None,
                 threads: int | None = None, cuts: int = PROBE_CUTS):
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
        # every weight a probe may replace is an input fed from one array (a split table: both
        # of its names), its initializer dropped: the sessions share them, none holds a copy
        base = getattr(self._keep, "dir", None) or (Path(path).parent if path else None)
        self._tables: dict[str, np.ndarray] = {}
        for n in dict.fromkeys(names):
            self._tables[n] = _array(model, inits[n], base)
            proto.graph.initializer.remove(inits[n])
            if n in self.embedding_inputs:
                self._tables[self.embedding_inputs[n]] = self._tables[n]
        names = [*dict.fromkeys(names), *self.embedding_inputs.values()]
        for n in names:
            if n not in have:
                t = inits[n]
                proto.graph.input.append(onnx.helper.make_tensor_value_info(
                    n, t.data_type, list(t.dims)))
        if proto.ir_version < 4:
            proto.ir_version = 4
        self.output = proto.graph.output[0].name
        _kl_terms(proto, self.output)
        open_ = dict(threads=threads, path=path, optimization="all", ref=ref,
                     what=" for the sensitivity probe")
        self.first_use: dict[str, int] = {}
        plans = (self._plan_tails(proto, set(names), cuts)
                 if cuts > 0 and not has_subgraphs(proto) else [])
        wanted = sorted({t for _, _, b, _ in plans for t in b})
        # one dense run per window: the logits and the tails' boundary tensors (a session of
        # the whole graph asking for them too, closed before the tails' sessions open)
        self.tails: list[_Tail] = []
        if plans:
            for t in wanted:
                proto.graph.output.append(onnx.ValueInfoProto(name=t))
            dense = open_session(proto.SerializeToString(), **open_, arena=False)
            del proto.graph.output[len(proto.graph.output) - len(wanted):]
        else:  # the whole graph, ending in the KL terms: the probe's one session
            dense = self.sess = open_session(proto.SerializeToString(), **open_)
        from lrc.runtime.feeds import text_feeds

        self.feeds = [{**self._tables, **b} if isinstance(b, dict) else
                      text_feeds(dense, np.asarray(b), fill_other=self._table)
                      for b in batches]
        # per window the dense logits and probabilities (fed back to each probe's KL terms)
        self.refs, given = [], []
        for f in self.feeds:
            logits, *cut = self._run(dense, [self.output, *wanted], f)
            if logits.ndim != 3:
                raise LrcError(f"sensitivity probe: output {self.output!r} has shape "
                               f"{logits.shape}, not [batch, sequence, vocabulary] logits")
            self.refs.append({KL_REF: logits.astype(np.float32, copy=False),
                              KL_P: np.exp(log_softmax(logits))})
            given.append(dict(zip(wanted, cut)))
        del dense, logits, cut
        # the sessions a run may start in, latest first (the whole graph last)
        for c, keep, boundary, outs in plans:
            tail = tail_proto(proto, keep, {t: given[0][t] for t in boundary},
                               outs or [KL_DOT, KL_LSE])
            # an arena for the head's tail (logits-sized buffers, every run), none for the
            # others: a layer's activations (arenas in each held ~40 MB apiece), and in the
            # whole graph's a tied table's Transpose for the embedding (Gemma: 670 MB, faulted
            # in afresh each run: +0.7 s a run from the input, peak memory 640 MB lower)
            sess = open_session(tail.SerializeToString(), **open_, arena=outs is None)
            ins = {i.name for i in sess.get_inputs()}
            feeds = [{k: v for k, v in {**f, **g}.items() if k in ins}
                     for f, g in zip(self.feeds, given)]
            self.tails.append(_Tail(c, sess, ins, feeds, outs))
        self.tails.sort(key=lambda t: -t.start)
        if plans:
            self.sess = self.tails[-1].sess
        else:
            self.tails = [_Tail(0, self.sess, {i.name for i in self.sess.get_inputs()},
                                self.feeds, None)]
        del proto
        # per tail and window both KL terms of the dense model itself, from the run a probe
        # makes (on float16 logits ORT computes them apart from the logits it returns):
        # subtracted, unchanged weights give exactly 0
        self.terms: list[list] = []
        for t in self.tails:  # the head's tail first
            self.terms.append([self._kl_terms(t, w, {}) for w in range(len(self.feeds))])

    def _plan_tails(self, proto: onnx.ModelProto, weights: set[str], cuts: int) -> list:
        """``[(cut, nodes, boundary, hands)]``: the graph's tails, at the first uses of about
        evenly spaced weights, each fed what a dense run computed before its cut. The last
        starts at the head's first use and ends in the KL terms (``hands`` None); the others
        end where it starts and hand it their results (their activations are a layer's, not
        the vocabulary's: one session holds logits-sized buffers, not each)."""
        data_inputs = {i.name for i in proto.graph.input} - weights - {KL_REF, KL_P}
        data, producer, self.first_use = data_flow(proto, data_inputs, weights)
        starts = sorted(set(self.first_use.values()))
        if len(starts) < 2:
            return []
        step = len(starts) / cuts
        at = sorted({starts[min(int(round(j * step)), len(starts) - 1)]
                     for j in range(1, cuts)} | {starts[-1]})
        keep, head_in = tail_nodes(proto, at[-1], data, producer, [KL_DOT, KL_LSE])
        plans = [(at[-1], keep, head_in, None)]
        for c in sorted({0, *at[:-1]}):  # the whole graph too hands the head's tail its input
            outs = [t for t in head_in if producer[t] >= c]
            plans.append((c, *tail_nodes(proto, c, data, producer, outs), outs))
        return plans

    def _kl_terms(self, tail: "_Tail", w: int, values: dict) -> tuple[float, np.ndarray]:
        """``(Σ dot, lse)`` of window ``w`` with ``values`` replaced, starting in ``tail``."""
        feeds = {**tail.feeds[w], **{k: v for k, v in values.items() if k in tail.inputs}}
        if tail.hands is None:
            dot, lse = self._run(tail.sess, [KL_DOT, KL_LSE], {**feeds, **self.refs[w]})
            return float(np.sum(dot, dtype=np.float64)), lse.astype(np.float64)
        head = self.tails[0]
        mid = dict(zip(tail.hands, self._run(tail.sess, tail.hands, feeds)))
        if not values and self.terms and all(np.array_equal(m, head.feeds[w][k])
                                             for k, m in mid.items()):
            # a dense run handing the head exactly its cached input: the head's own terms
            # (one run of the head's tail fewer per tail when the probe opens)
            return self.terms[0][w]
        return self._kl_terms(head, w, {**values, **mid})

    def _table(self, spec) -> np.ndarray:
        if spec.name not in self._tables:
            raise LrcError(f"sensitivity probe: don't know how to fill input {spec.name!r}")
        return self._tables[spec.name]

    def _run(self, sess, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        try:
            return sess.run(outputs, feeds)
        except Exception as e:  # ORT raises its own types
            raise LrcError(f"sensitivity probe failed in onnxruntime: "
                           f"{str(e).splitlines()[0][:300]}") from e

    def _tail(self, values: dict) -> int:
        """The shortest tail holding every node the changed weights reach."""
        start = min((self.first_use.get(n, 0) for n in values), default=0)
        return next(i for i, t in enumerate(self.tails) if t.start <= start)

    def __call__(self, values: dict[str, np.ndarray]) -> float:
        """Mean over the windows' tokens of ``KL(p‖q) = Σ_v p_v (z_v − z'_v) + lse(z') −
        lse(z)`` (``z`` the dense logits, ``p`` their softmax, ``z'`` the changed ones): the
        sum over the vocabulary in the session (:func:`_kl_terms`), not a copy of the logits;
        the dense terms are the same tail's on the dense weights."""
        i = self._tail(values)
        kl, n = 0.0, 0
        for w, (dot0, lse0) in enumerate(self.terms[i]):
            dot, lse = self._kl_terms(self.tails[i], w, values)
            kl += dot - dot0 + float(np.sum(lse - lse0))
            n += lse.size
        return kl / max(n, 1)


class _Tail(NamedTuple):
    start: int  # its first node in the whole graph (0: the whole graph)
    sess: object
    inputs: set
    feeds: list  # per window: the data, the dense weights, the cached boundary
    hands: list | None  # what it hands the head's tail (None: it ends in the KL terms)


__all__ = ["Probe", "log_softmax"]
