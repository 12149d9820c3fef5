"""ONNX Runtime GenAI's model builder as lrc's exporter of decoder LMs (``--exporter builder``).

The builder writes the graph ORT GenAI deploys: one ``GroupQueryAttention`` per layer,
``SkipSimplifiedLayerNormalization``, Q/K/V packed in one MatMul, a ``genai_config.json`` beside
it. lrc reads these folders everywhere (compress, eval, bench, generate); this module makes
them from what ``lrc export`` takes (an HF folder, a GGUF file via lrc's float HF folder, an
alias), in the environment of lrc's export extra: ``onnxruntime-genai==0.15.2`` is the last
release whose builder imports only what transformers 4.57 has (optimum-onnx 0.1.0 pins
transformers < 4.58; from 0.16 the builder imports Qwen3.5 classes that exist only in
transformers 5). Its runtime reads the folders lrc writes like 0.18 does (tests/test_genai.py).

Precisions: ``float32`` and ``float16`` (the builder's ``-p fp32 / fp16``, CPU), and ``int4``:
the builder's own round-to-nearest codes (blocks of 32, ``accuracy_level`` 4, the tied table
shared in int4) — a baseline to measure lrc against, not lrc's quantisation
(``lrc compress --quantize int4``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from lrc.errors import LrcError

#: lrc's --dtype -> the builder's -p
PRECISIONS = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "int4": "int4"}
#: the builder's int4 as users make it (and as benchmarks/genai_builder.py compares against)
INT4_OPTIONS = ("int4_block_size=32", "int4_accuracy_level=4")
MODULE = "onnxruntime_genai.models.builder"


def version() -> str | None:
    try:
        return importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError:
        return None


def _why(output: str) -> str:
    """The one line that says why the builder failed (its last exception line)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    m = next((re.search(r"cannot import name '(\w+)' from 'transformers'", ln) for ln in reversed(lines)
              if "cannot import name" in ln), None)
    if m:
        import transformers

        return (f"the builder of onnxruntime-genai {version()} imports {m.group(1)}, which "
                f"transformers {transformers.__version__} lacks: install onnxruntime-genai==0.15.2 "
                "(what lrc[export] pins: the last builder that runs with optimum-onnx's transformers)")
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or ["no output"])[-1][:300]


def check(config: dict) -> None:
    """Refuse, before the builder runs, what it would build wrong without saying so: its Gemma-3
    makes every 6th layer full attention and the others sliding-window (``is_local``), whatever
    ``layer_types`` says (Gemma-3-270M follows that pattern; a config that does not would get a
    graph with the wrong attention and RoPE base in some layers)."""
    text = config.get("text_config") or config
    kinds = text.get("layer_types")
    if str(text.get("model_type", "")).startswith("gemma3") and kinds:
        builder_kinds = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(len(kinds))]
        if list(kinds) != builder_kinds:
            raise LrcError("the builder makes every 6th Gemma-3 layer full attention and the rest "
                           "sliding-window, not what this config's layer_types say: its graph would "
                           "be wrong; use --exporter optimum")


def build(hf_dir: Path, out: Path, dtype: str, cache: Path) -> dict:
    """Run the builder on ``hf_dir`` into ``out`` (CPU); returns what to record in lrc.json."""
    precision = PRECISIONS.get(dtype)
    if precision is None:
        raise LrcError(f"the builder exports float32, float16 or int4, not {dtype!r}")
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise LrcError("--exporter builder needs onnxruntime-genai: pip install 'lrc[export]'")
    cmd = [sys.executable, "-m", MODULE, "-i", str(hf_dir), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(cache)]
    options = list(INT4_OPTIONS) if precision == "int4" else []
    if options:
        cmd += ["--extra_options", *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise LrcError(f"ONNX Runtime GenAI's model builder failed: {_why(r.stderr + r.stdout)}")
    if not (out / "genai_config.json").is_file():
        raise LrcError("ONNX Runtime GenAI's model builder wrote no genai_config.json")
    return {"builder": version(), "precision": precision, "options": options}


__all__ = ["INT4_OPTIONS", "PRECISIONS", "build", "check", "version"]
