"""How far one model's tensors are from another's: the numbers ``lrc verify`` reports for every
output and ``lrc eval --layers`` for intermediate tensors.

The metrics are :mod:`lrc.measure.metrics`' tensor metrics (``compare_tensors``, in float64):
max and mean absolute difference, relative error ``‖b−a‖/‖a‖`` and cosine similarity.

``layer_drift`` exposes intermediate tensors (the low-rank rewrite keeps each rewritten node's
output name) as extra graph outputs of both models (:func:`lrc.graph.expose.expose`), runs the
same feeds and reports the cosine and the relative norm of the difference per tensor, worst
first.
"""

from __future__ import annotations

import numpy as np

from lrc.errors import LrcError
from lrc.measure.metrics import compare_tensors
from lrc.modelref import resolve
from lrc.runtime.session import open_session

__all__ = ["default_drift_tensors", "layer_drift"]


def _drift_row(name: str, x: np.ndarray, y: np.ndarray) -> dict:
    """One row of ``layer_drift``: tensors of different shapes are not compared."""
    if x.shape != y.shape:
        return {"tensor": name, "cosine": float("nan"), "rel_error": float("inf"),
                "max_abs": float("inf"), "shape": list(x.shape), "note": f"shape {list(y.shape)}"}
    m = compare_tensors(x, y)
    return {"tensor": name, "cosine": m["cosine"], "rel_error": m["rel_error"], "max_abs": m["max_abs"],
            "shape": list(x.shape)}


def _node_outputs(model) -> set[str]:
    return {o for n in model.graph.node for o in n.output if o}


def default_drift_tensors(orig, new) -> list[str]:
    """Outputs of the original's weight MatMul/Gemm nodes (weight a constant, possibly through a
    Transpose as a tied lm_head reads it: the projections, not attention's activation products)
    that the new model also produces."""
    from lrc.graph.locate import weight_matmul_nodes

    mo, mn = resolve(orig).graph, resolve(new).graph
    new_outs = _node_outputs(mn)
    return [w.output for w in weight_matmul_nodes(mo)
            if w.op in ("MatMul", "Gemm") and w.weight_index == 1 and w.output in new_outs]


def _exposed_session(ref, names: list[str], threads: int | None):
    """A session on the referenced model with ``names`` added as graph outputs (nothing
    pruned), and the names it returns (graph inputs come from the feeds)."""
    import onnx

    from lrc.graph.expose import expose

    path = ref.need_file("drift")
    proto = onnx.load(str(path), load_external_data=False)
    try:
        fetch = expose(proto, names, prune=False)
    except LrcError as e:
        raise LrcError(f"{path.name}: {e}") from e
    return open_session(proto.SerializeToString(), threads=threads, path=path, ref=ref), fetch


def _default_feeds(sess, tokenizer, config: dict) -> dict:
    """64 news tokens (text models with a tokenizer), else random feeds."""
    from lrc.runtime import feeds as F

    if tokenizer is not None and "input_ids" in [i.name for i in sess.get_inputs()]:
        from lrc import data

        try:
            text = data.load_text("news")
        except LrcError:
            text = data.load_text("docs")
        ids = tokenizer.encode(text[:2000], add_special_tokens=True).ids[:64]
        return F.text_feeds(sess, np.array([ids], np.int64), config=config)
    return F.random_feeds(sess)


def layer_drift(orig, new, tensor_names=None, feeds: dict | None = None,
                threads: int | None = None) -> list[dict]:
    """Cosine and relative-error drift of intermediate tensors, worst (largest rel_error) first.

    ``tensor_names`` default: every weight MatMul/Gemm output of the original also present in
    the new model.  ``feeds`` default: 64 news tokens (text models) or random feeds.
    """
    ro, rn = resolve(orig), resolve(new)
    names = list(tensor_names) if tensor_names else default_drift_tensors(ro, rn)
    if not names:
        raise LrcError("no tensors to compare: name some (they must exist in both models)")
    so, fetch_o = _exposed_session(ro, names, threads)
    sn, fetch_n = _exposed_session(rn, names, threads)
    if feeds is None:
        feeds = _default_feeds(so, ro.load_tokenizer(), ro.config)

    def values(sess, fetch):
        wanted = {i.name for i in sess.get_inputs()}
        got = dict(zip(fetch, sess.run(fetch, {k: v for k, v in feeds.items() if k in wanted})))
        return [got[n] if n in got else np.asarray(feeds[n]) for n in names]

    a, b = values(so, fetch_o), values(sn, fetch_n)
    rows = [_drift_row(n, x, y) for n, x, y in zip(names, a, b)]
    return sorted(rows, key=lambda r: -r["rel_error"] if np.isfinite(r["rel_error"]) else -np.inf)
