"""How far one model's tensors are from another's: the numbers ``lrc verify`` reports for every
output and ``lrc eval --layers`` for intermediate tensors.

``compare_arrays`` is the one implementation of the metrics (in float64): max and mean absolute
difference, relative error ``‖b−a‖/‖a‖`` (a zero reference gives 0 when both are zero, else 1)
and cosine similarity (1 when both are zero).

``layer_drift`` exposes intermediate tensors (the low-rank rewrite keeps each rewritten node's
output name) as extra graph outputs of both models (:func:`lrc.graph.expose.expose`), runs the
same feeds and reports the cosine and the relative norm of the difference per tensor, worst
first.
"""

from __future__ import annotations

import numpy as np

from lrc.errors import LrcError
from lrc.graph.model import resolve_model_path
from lrc.runtime.session import open_session

__all__ = ["compare_arrays", "default_drift_tensors", "layer_drift"]


def compare_arrays(a: np.ndarray, b: np.ndarray) -> dict:
    """``max_abs``, ``mean_abs``, ``rel`` and ``cosine`` of ``b`` against the reference ``a``
    (compared element by element, whatever their shapes); ``{"shape_mismatch": [...]}`` when
    their sizes differ."""
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    if a64.shape != b64.shape:
        return {"shape_mismatch": [list(np.shape(a)), list(np.shape(b))]}
    diff = np.abs(a64 - b64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    rel = float(np.linalg.norm(a64 - b64) / na) if na > 0 else float(np.linalg.norm(b64) > 0)
    cos = float(a64 @ b64 / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    return {"max_abs": float(diff.max()) if diff.size else 0.0,
            "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "rel": rel, "cosine": cos}


def _drift_row(name: str, x: np.ndarray, y: np.ndarray) -> dict:
    """One row of ``layer_drift``: tensors of different shapes are not compared."""
    if x.shape != y.shape:
        return {"tensor": name, "cosine": float("nan"), "rel_norm": float("inf"),
                "max_abs": float("inf"), "shape": list(x.shape), "note": f"shape {list(y.shape)}"}
    m = compare_arrays(x, y)
    return {"tensor": name, "cosine": m["cosine"], "rel_norm": m["rel"], "max_abs": m["max_abs"],
            "shape": list(x.shape)}


def _node_outputs(model) -> set[str]:
    return {o for n in model.graph.node for o in n.output if o}


def default_drift_tensors(orig, new) -> list[str]:
    """Outputs of the original's weight MatMul/Gemm nodes (weight a constant, possibly through a
    Transpose as a tied lm_head reads it: the projections, not attention's activation products)
    that the new model also produces."""
    import onnx

    from lrc.graph.locate import weight_matmul_nodes

    mo = onnx.load(str(resolve_model_path(orig)), load_external_data=False)
    mn = onnx.load(str(resolve_model_path(new)), load_external_data=False)
    new_outs = _node_outputs(mn)
    return [w.output for w in weight_matmul_nodes(mo)
            if w.op in ("MatMul", "Gemm") and w.weight_index == 1 and w.output in new_outs]


def _exposed_session(path, names: list[str], threads: int | None):
    """A session on the model at ``path`` with ``names`` added as graph outputs (nothing
    pruned), and the names it returns (graph inputs come from the feeds)."""
    import onnx

    from lrc.graph.expose import expose

    proto = onnx.load(str(path), load_external_data=False)
    try:
        fetch = expose(proto, names, prune=False)
    except LrcError as e:
        raise LrcError(f"{path.name}: {e}") from e
    return open_session(proto.SerializeToString(), threads=threads, path=path), fetch


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
    """Cosine and relative-norm drift of intermediate tensors, worst (largest rel_norm) first.

    ``tensor_names`` default: every weight MatMul/Gemm output of the original also present in
    the new model.  ``feeds`` default: 64 news tokens (text models) or random feeds.
    """
    from lrc.calibration.tokens import load_tokenizer
    from lrc.runtime.feeds import model_config

    fo, fn = resolve_model_path(orig), resolve_model_path(new)
    names = list(tensor_names) if tensor_names else default_drift_tensors(fo, fn)
    if not names:
        raise LrcError("no tensors to compare: name some (they must exist in both models)")
    so, fetch_o = _exposed_session(fo, names, threads)
    sn, fetch_n = _exposed_session(fn, names, threads)
    if feeds is None:
        feeds = _default_feeds(so, load_tokenizer(None, fo), model_config(fo))

    def values(sess, fetch):
        wanted = {i.name for i in sess.get_inputs()}
        got = dict(zip(fetch, sess.run(fetch, {k: v for k, v in feeds.items() if k in wanted})))
        return [got[n] if n in got else np.asarray(feeds[n]) for n in names]

    a, b = values(so, fetch_o), values(sn, fetch_n)
    rows = [_drift_row(n, x, y) for n, x, y in zip(names, a, b)]
    return sorted(rows, key=lambda r: -r["rel_norm"] if np.isfinite(r["rel_norm"]) else -np.inf)
