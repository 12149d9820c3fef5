"""Does an exported decoder compute what its source computes? The check optimum's exporter runs
on its own output (``do_validation``), for the exporter that has none: ONNX Runtime GenAI's
model builder, which builds a graph per architecture from its own code and can build a wrong
one without saying so (its Gemma-3 ignores ``layer_types``: :func:`lrc.exporters.builder.check`).

:func:`agreement` runs the Hugging Face model in PyTorch and the exported folder in ONNX Runtime
(lrc's session factory and feeds, so the builder's cache layout comes from its
genai_config.json) on the same random token ids, from an empty cache, and compares the logits.
``lrc export`` hands it to :func:`lrc.exporters.export` as ``check``: it runs on the staged
folder, before the folder appears, and a failure is one line (with ``--exporter auto``, the
reason optimum exports instead). Needs torch and transformers (the export extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrc.errors import LrcError

#: the largest |logits difference| / max |logits| that passes, per precision; int4 (the
#: builder's own round-to-nearest codes) is measured and reported, not judged
TOLERANCE = {"fp32": 5e-3, "fp16": 3e-2}
TOKENS = 12


def agreement(hf_dir: Path, folder: Path, precision: str = "fp32", *, seed: int = 0,
              tokens: int = TOKENS) -> dict:
    """Logits of the exported ``folder`` (ONNX Runtime CPU) against ``hf_dir``'s model (PyTorch,
    float32) on ``tokens`` random ids: ``{"tokens", "rel_error", "top1", "tolerance"}``;
    LrcError when the relative error is over :data:`TOLERANCE` of ``precision``."""
    import torch
    from transformers import AutoModelForCausalLM

    from lrc.runtime import feeds as F
    from lrc.runtime.session import open_session

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    ids = np.random.default_rng(seed).integers(1, int(cfg.vocab_size), size=(1, tokens))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits[0].float().numpy()
    del model
    sess = open_session(folder / "model.onnx", threads=None)
    try:
        got = sess.run(["logits"], F.text_feeds(sess, ids))[0][0].astype(np.float32)
    except Exception as e:  # noqa: BLE001 - any runtime failure of the new graph is the answer
        raise LrcError(f"the exported graph does not run in ONNX Runtime: "
                       f"{str(e).strip().splitlines()[0][:200]}") from e
    if got.shape != want.shape:
        raise LrcError(f"the exported graph's logits are {list(got.shape)}, the model's "
                       f"{list(want.shape)}")
    rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    tol = TOLERANCE.get(precision)
    out = {"tokens": tokens, "rel_error": float(f"{rel:.3g}"), "top1": round(top1, 3),
           "tolerance": tol}
    if tol is not None and not rel <= tol:
        raise LrcError(f"the exported graph's logits differ from the model's (relative error "
                       f"{rel:.2g} > {tol:g} on {tokens} tokens; top-1 agreement {top1:.0%})")
    return out


__all__ = ["TOLERANCE", "agreement"]
