"""``lrc verify ORIG NEW``: is NEW a valid model, and how far are its outputs from ORIG's?

Structure: the full onnx checker (with strict shape inference; or the strongest check ORIG itself
passes, :func:`lrc.graph.model.check_level`) and an ONNX Runtime CPU session.
Numbers: both models run on the same inputs — random ones of the right dtypes and shapes by
default (token ids within the vocabulary, masks of ones), or the user's arrays from an ``.npz`` —
and every output common to both is compared: max/mean absolute error, relative error
``‖a−b‖/‖a‖`` and cosine similarity (:func:`lrc.measure.metrics.compare_tensors`, the metrics
``lrc eval --layers`` reports too).

``runtime``: NEW runs on that runtime (:mod:`lrc.runtime.runtimes`: ``openvino``, ``tract``, pinned
to ``precision``, f32 by default) while ORIG runs on ONNX Runtime's CPU EP, on the same feeds (built
from ORIG's session by :mod:`lrc.runtime.feeds`): the error of the rewrite and of the runtime
together; with ``verify(M, M, runtime=...)`` the runtime's own. A runtime that is not installed,
or cannot load or run NEW, is one line (LrcError) with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrc.errors import LrcError
from lrc.graph.model import check_level, structural_check
from lrc.measure.metrics import compare_tensors
from lrc.modelref import resolve
from lrc.runtime.runtimes import load as load_on
from lrc.runtime.session import open_session


def load_inputs(path: str | Path) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise LrcError(f"inputs file {p} not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise LrcError(f"inputs file {p}: not a readable .npz ({type(e).__name__})")


def verify(orig, new, inputs: str | Path | dict | None = None, dims: dict | None = None,
           seed: int = 0, threads: int | None = None, structural: bool = True,
           runtime: str = "ort", precision: str = "f32") -> dict:
    """Check NEW structurally and compare its outputs (on ``runtime``) with ORIG's (on ONNX
    Runtime) on the same inputs."""
    from lrc.runtime import feeds as F

    # lrc's loader checks both (external data locations, tensor sizes, ...) before the onnx
    # checker and the runtimes read them
    ro, rn = resolve(orig), resolve(new)
    po, pn = ro.need_file("verify"), rn.need_file("verify")
    ro.graph, rn.graph  # noqa: B018 - read (and so validated) now
    result: dict = {"orig": str(po), "new": str(pn)}
    if structural:
        from lrc.runtime.session import onnx_domain_ops

        # NEW is held to the strongest check ORIG itself passes (a model builder's graph fails
        # strict shape inference on its own; the rewrite is not to blame for that): ORIG is
        # checked only when NEW fails the full check
        ops = onnx_domain_ops()
        try:
            result["structure"] = structural_check(pn, ops)
        except LrcError:
            level, weaker = check_level(po, ops)
            if not weaker:
                raise
            result["structure"] = structural_check(pn, ops, level)
            result["structure"]["checker_level"] = (f"{level}: ORIG itself fails the stronger "
                                                    f"check ({weaker})")
    try:
        so = open_session(ro, threads=threads)
        if runtime == "ort" and precision == "f32":
            sn = open_session(rn, threads=threads)
            result.setdefault("structure", {})["ort_cpu_session"] = "ok"
        else:
            sn = load_on(pn, runtime, threads=threads, precision=precision)
            result.setdefault("structure", {})[f"{sn.runtime.name}_load"] = "ok"
            result["runtimes"] = {"orig": "ONNX Runtime CPU EP", "new": _label(sn.describe())}
    except LrcError:
        raise
    except Exception as e:
        raise LrcError(f"ONNX Runtime could not load a model: {str(e).strip().splitlines()[0]}")
    if isinstance(inputs, (str, Path)):
        feeds = load_inputs(inputs)
        result["inputs"] = f"from {inputs}"
    elif isinstance(inputs, dict):
        feeds = inputs
        result["inputs"] = "given"
    else:
        feeds = F.random_feeds(so, dims=dims, seed=seed)
        result["inputs"] = "random (seed %d): " % seed + ", ".join(
            f"{k}{list(v.shape)}" for k, v in feeds.items())
    names_o = {i.name for i in so.get_inputs()}
    names_n = {i.name for i in sn.get_inputs()}
    missing = (names_o | names_n) - set(feeds)
    if missing:
        raise LrcError(f"inputs lack {sorted(missing)}")
    try:
        out_o = so.run(None, {k: v for k, v in feeds.items() if k in names_o})
        fn = {k: v for k, v in feeds.items() if k in names_n}
        out_n = sn.run(None, fn) if runtime == "ort" and precision == "f32" else sn.run(fn)
    except LrcError:
        raise
    except Exception as e:
        raise LrcError(f"ONNX Runtime failed to run: {str(e).strip().splitlines()[0]}")
    o_names = [o.name for o in so.get_outputs()]
    n_map = {o.name: v for o, v in zip(sn.get_outputs(), out_n)}
    outputs = {}
    for name, a in zip(o_names, out_o):
        if name in n_map:
            outputs[name] = compare_tensors(a, n_map[name])
        else:
            outputs[name] = {"missing_in_new": True}
    result["outputs"] = outputs
    rels = [v["rel_error"] for v in outputs.values() if "rel_error" in v]
    result["worst_rel"] = max(rels) if rels else None
    return result


def _label(d: dict) -> str:
    thr = f", {d['threads']} threads" if d.get("threads") else ""
    return f"{d['title']} {d.get('version') or ''} {d['device']}, {d['precision']}{thr}"
