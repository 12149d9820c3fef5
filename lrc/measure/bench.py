"""Honest latency benchmarks of ONNX models on ONNX Runtime's providers and other runtimes.

The pieces live where the rest of lrc finds them: timed IO-bound runs in
:mod:`lrc.runtime.runner`, the Amdahl profile in :mod:`lrc.runtime.profile`, the machine record
and memory probe in :mod:`lrc.measure.machine`, the tables in :mod:`lrc.present.bench`. This
module runs the protocol and assembles the result.

``bench(models, ...)`` measures every model under the same conditions, in one process:

* all models' sessions for one execution provider (EP) are alive together and are run
  round-robin (A, B, C, A, B, C, ...) after ``warmup`` round-robin warm-ups, so that drift of a
  shared machine (other tenants, thermal, frequency) hits every model alike;
* intra-op thread spinning is switched off (``session.intra_op.allow_spinning = 0``): with
  several sessions alive, the idle spinning threads of one session otherwise steal the cores of
  the next one and produce impossible speedups;
* statistics are p50 / p90 / p99 / mean over ``runs`` timed runs (use >= 25: shared cores are
  noisy by +-10 %); ``speedup`` is ``p50(first model) / p50(model)`` for the same EP, batch,
  sequence length and phase, so the first model is 1.0 and faster models are > 1;
* inputs are bound with IO binding on the EP's device (``cuda`` for CUDA / TensorRT, ``dml``
  for DirectML, ``cpu`` otherwise) and outputs are left on that device, so host<->device copies
  are not timed; for decoders the KV cache stays on the device between decode steps.

Runtimes (:mod:`lrc.runtime.runtimes`): ``runtimes=("ort", "openvino", "tract")`` measures on each
with the same protocol, one after the other: ORT on every EP of ``eps``, the others on their CPU
device, pinned to ``precision`` (f32). Ratios are to the first model on the same runtime, never
across runtimes. Before the warm-ups every model runs one untimed prefill and decode step (what a
runtime compiles lazily is compiled then): a model a runtime cannot load or run is not measured
there, a decoder whose decode step fails is measured on prefill only, and ``notes`` says why;
when the first model fails, nothing is measured on that runtime. ORT sessions are strict (a GPU
EP that fell back to the CPU is an error). Non-ORT runtimes take host tensors converted to their
own before the clock starts (no IO binding); memory is probed for ORT sessions only.

Encoders (no ``past_*`` inputs): latency of one forward pass at ``batch x seq``.
Decoders (a KV cache, as :mod:`lrc.runtime.feeds` detects it: ``past_key_values.N.key``,
``past.N.key``, ``past_key.N``): ``prefill``
latency at ``batch x seq`` with an empty cache, then ``decode``: ``decode_tokens`` single-token
steps that reuse the cache produced by the prefill; the statistics are over runs of the mean
per-token step time, and ``tokens_per_s = batch * 1000 / p50_ms``.

Memory: for each model and EP a fresh Python subprocess imports onnxruntime, resets the
high-water mark (``echo 5 > /proc/self/clear_refs``), reads ``/proc/self/status`` VmRSS, creates
the session, reads VmRSS, runs it once at the first batch / seq (one decode step for decoders)
and reads VmRSS and VmHWM. All are deltas over the RSS before creation (MB = 1e6 bytes):
``rss_after_load_mb``, ``rss_after_first_run_mb``, ``peak_rss_mb`` -- host memory attributable
to that session alone (measuring in the benchmarking process would let memory freed by earlier
work, e.g. building baselines, hide the session's own). GPU memory is not measured. ``load_s``
is the session creation time in the benchmarking process (file cache warm after the first).

Amdahl bound: the first (dense) model is profiled once with ORT profiling on the first EP and
the first batch / sequence length; ``f`` is the fraction of kernel time spent in MatMul-like nodes
(MatMul, Gemm, FusedMatMul, ...) whose weight is a constant (initializer, possibly through
Transpose / Cast / Reshape). For each later (non-baseline) model ``rho`` = weight-MatMul
parameters of that model / those of the first model, counted in the graphs; if the graph cannot
be read, ``totals.params_after / totals.params_before`` (or ``flop_ratio``) of an lrc summary
JSON beside the model (``NEW.onnx.lrc.json`` or ``DIR/lrc.json``) is used. The bound on the
speedup is ``1 / ((1 - f) + f * rho)``: what the parameter reduction allows if the MatMuls
shrank in proportion to their FLOPs and everything else stayed as is. Models whose weight
MatMuls are stored quantised (MatMulNBits, DynamicQuantizeMatMul, ...) get no such bound: their
FLOPs do not shrink, their bytes do. For every later model ``bytes_bound`` = bytes of constants a
decode step reads in the first model / in this one (``lrc.graph.locate.bytes_read_per_token``:
every initializer but tables only Gathers read): the decode speedup memory traffic allows.

Result (JSON-serialisable dict, ``schema == "lrc.bench/1"``)::

    {
      "schema": "lrc.bench/1",
      "machine": {"cpu": str, "logical_cores": int, "physical_cores": int|None,
                  "affinity_cores": int|None, "platform": str, "python": str,
                  "onnxruntime": str, "onnx": str, "numpy": str,
                  "available_providers": [str], "gpu": str|None,
                  "loadavg_1min": float|None},
      "settings": {"eps": [str], "providers": [str], "threads": int|None,
                   "runtimes": [str], "precision": "f32"|"f16"|"bf16",
                   "targets": [{"key": str, "runtime": str, "provider": str|None,
                                "describe": {"runtime", "title", "version", "device",
                                             "precision", "threads", ...}}],
                   "threads_note": str, "batch_sizes": [int], "seq_lens": [int],
                   "decode_tokens": int, "warmup": int, "runs": int,
                   "interleaved": true, "allow_spinning": false,
                   "memory_method": str, "timer": "time.perf_counter"},
      "models": [{"name": str, "path": str, "kind": "encoder"|"decoder",
                  "baseline": None|"int8-dynamic"|"int4-matmulnbits"|"ort-optimized",
                  "size_bytes": int, "weight_matmul_params": int|None,
                  "flop_ratio": float|None, "flop_ratio_source": "graph"|"summary"|None,
                  "amdahl_bound": {"encoder"|"prefill"|"decode": float}|None,
                  "bytes_read": int|None, "bytes_bound": float|None, "quantized": bool,
                  "sessions": {KEY: {"load_s": float, "runtime": str, "rss_after_load_mb": float,
                                    "rss_after_first_run_mb": float,
                                    "peak_rss_mb": float|None}},
                  "notes": [str]}],
      "runs": [{"model": str, "runtime": str, "ep": KEY,
                "phase": "encoder"|"prefill"|"decode",
                "batch": int, "seq": int, "input": "1x128" | "1x3x224x224" (the first input's
                shape, as it is), "decode_tokens": int|None, "n": int,
                "p50_ms": float, "p90_ms": float, "p99_ms": float, "mean_ms": float,
                "std_ms": float, "min_ms": float, "speedup": float|None,
                "tokens_per_s": float|None, "rounds_ms": [float] (round k of every model
                of the table ran back to back), "paired_speedup": float, "speedup_ci95":
                [lo, hi] (against the first model: paired_speedup(); absent for it)}],
      "amdahl": {"model": str, "ep": str, "batch": int, "seq": int,
                 "matmul_fraction": {"encoder"|"prefill"|"decode": float},
                 "note": str} | None,
      "notes": [str]
    }

``KEY`` is a target's key: the EP alias (``cpu``, ``cuda``) on ONNX Runtime, the runtime's name
(``openvino``, ``tract``) otherwise; memory fields are ORT-only.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from lrc.errors import LrcError, opt
from lrc.graph.locate import bytes_read_per_token, weight_matmul_nodes, weight_matmuls

# weight MatMuls whose weights are stored quantised: Amdahl on parameters says nothing about
# them; the bytes-read bound does
_QUANTIZED = {"MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat",
              "QGemm", "QLinearMatMul", "MatMulFpQ4", "MatMulBnb4"}
from lrc.graph.model import ONNX_NAMES, file_size
from lrc.modelref import resolve
from lrc.measure.machine import machine_info, measure_memory
from lrc.runtime import quantizers
from lrc.modelref import is_past
from lrc.runtime.feeds import model_config
from lrc.runtime.profile import amdahl_bound, profile_matmul_fraction
from lrc.runtime.providers import device_of, lookup, resolve_ep
from lrc.runtime.runner import Runner
from lrc.runtime.runtimes import load as load_on, resolve_runtime, runtime_error

__all__ = ["SCHEMA", "bench", "build_baselines", "copy_side_files", "model_name", "summary_for",
           "summary_flop_ratio"]

SCHEMA = "lrc.bench/1"


def model_name(path, taken: set[str]) -> str:
    """The folder's name for an exported folder's model file, else the file's stem; unique
    among ``taken`` (which it extends): how bench and eval name their models."""
    from pathlib import PurePath

    path = PurePath(str(path))
    base = path.parent.name if path.name in ONNX_NAMES and path.parent.name else path.stem
    name, i = base, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    taken.add(name)
    return name


def _is_decoder_graph(model: onnx.ModelProto) -> bool:
    """Does the graph take a KV cache (read from the protobuf, before any session exists)?"""
    return any(is_past(i.name) for i in model.graph.input)


def summary_for(path: Path) -> dict | None:
    """The lrc summary JSON beside a model (``NEW.onnx.lrc.json`` or ``DIR/lrc.json``), if any."""
    for cand in (path.with_name(path.name + ".lrc.json"), path.parent / "lrc.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except (OSError, ValueError):
                return None
    return None


def summary_flop_ratio(summary: dict | None) -> float | None:
    """Parameter ratio after/before of an lrc summary (``flop_ratio`` or ``totals``)."""
    if not summary:
        return None
    for src in (summary, summary.get("totals") or {}):
        if isinstance(src.get("flop_ratio"), (int, float)):
            return float(src["flop_ratio"])
    tot = summary.get("totals") or {}
    a, b = tot.get("params_after"), tot.get("params_before")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return float(a) / float(b)
    return None


def paired_speedup(ref_s: list[float], s: list[float], seed: int = 0,
                   n_boot: int = 2000) -> dict[str, Any] | None:
    """The speedup of ``s`` over ``ref_s`` from rounds timed back to back (round k of each, the
    round-robin's pairs): the median of the per-round ratios and its 95 % bootstrap interval.
    A pair shares the machine's state of its moment, so drift and neighbours cancel in it; the
    interval says whether a few percent is a difference or noise. None under 5 pairs."""
    n = min(len(ref_s), len(s))
    if n < 5:
        return None
    r = np.asarray(ref_s[:n], dtype=np.float64) / np.asarray(s[:n], dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = np.median(r[rng.integers(0, n, (n_boot, n))], axis=1)
    return {"paired_speedup": float(np.median(r)),
            "speedup_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}


def _ms(samples_s: list[float]) -> list[float]:
    return [round(x * 1000.0, 4) for x in samples_s]


def _stats(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
        "std_ms": float(a.std()), "min_ms": float(a.min()),
    }


_OPT_TYPES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
    "mpnet": "bert", "electra": "bert", "camembert": "bert", "deberta": "bert",
    "gpt2": "gpt2", "gpt_neox": "gpt_neox", "phi": "phi", "qwen3": "qwen3", "t5": "t5",
    "bart": "bart", "vit": "vit", "clip": "clip", "swin": "swin",
}


def _needs_external(path: Path) -> bool:
    return file_size(path) > 1_800_000_000


def _float16_weights(path: Path) -> bool:
    """Whether a weight MatMul of the model reads a float16 constant (weights not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    f16 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    casts = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type in ("Cast",
                                                                                "Transpose")}
    for w in weight_matmul_nodes(proto):
        name = w.weight
        for _ in range(2):  # through a Cast / Transpose to the initializer
            name = casts.get(name, name)
        if name in f16:
            return True
    return False


def build_baselines(first: Path, out_dir: Path, provider: str = "CPUExecutionProvider",
                    log: Callable[[str], None] | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """ORT INT8 dynamic (per-channel), 4-bit MatMulNBits (block 32) and ORT-optimized dense
    versions of ``first`` in ``out_dir``. Returns ([(baseline_kind, path)], notes)."""
    log = log or (lambda _m: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, Path]] = []
    notes: list[str] = []
    ext = _needs_external(first)
    cfg = model_config(first)

    p = out_dir / "int8-dynamic.onnx"
    if _float16_weights(first):
        # quantize_dynamic leaves fp16 MatMuls alone and writes fp16 scales on the embedding's
        # DequantizeLinear, which ORT then refuses to load
        notes.append("int8-dynamic baseline skipped: the model's weights are float16 and ORT's "
                     "quantize_dynamic quantises float32 models only")
    else:
        try:
            log("baseline: quantize_dynamic INT8 per-channel")
            quantizers.int8_dynamic(first, p, per_channel=True, external=ext)
            made.append(("int8-dynamic", p))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"int8-dynamic baseline failed: {str(exc).splitlines()[0][:200]}")

    p = out_dir / "int4-matmulnbits.onnx"
    try:
        log("baseline: MatMulNBits 4-bit block 32")
        quantizers.matmul_nbits(first, p, bits=4, block_size=32, symmetric=True,
                                accuracy_level=4 if provider == "CPUExecutionProvider" else None,
                                external=ext)
        made.append(("int4-matmulnbits", p))
        notes.append("int4-matmulnbits: symmetric, block 32"
                     + (", accuracy_level 4 (int8 compute on CPU)" if provider == "CPUExecutionProvider" else ""))
    except Exception as exc:  # noqa: BLE001
        notes.append(f"int4-matmulnbits baseline failed: {str(exc).splitlines()[0][:200]}")

    p = out_dir / "ort-optimized.onnx"
    try:
        hf_type = str(cfg.get("model_type", "")).lower()
        mtype = _OPT_TYPES.get(hf_type)
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 0)
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
        if mtype is None:
            graph = onnx.load(str(first), load_external_data=False)
            fallback = "gpt2" if _is_decoder_graph(graph) else "bert"
            notes.append(f"ort-optimized: model_type {hf_type or '(no config.json)'} has no ORT fusion "
                         f"recipe; used {fallback!r} generic fusions")
            mtype = fallback
        if not heads or not hidden:
            notes.append("ort-optimized: num_heads/hidden_size unknown (no config.json); ORT detects them from the graph")
        log(f"baseline: ORT transformer optimizer model_type={mtype}")
        quantizers.transformer_optimized(first, p, model_type=mtype, num_heads=heads,
                                         hidden_size=hidden, use_gpu=device_of(provider) == "cuda",
                                         external=ext)
        made.append(("ort-optimized", p))
    except Exception as exc:  # noqa: BLE001
        notes.append(f"ort-optimized baseline failed: {str(exc).splitlines()[0][:200]}")
    return made, notes


_SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja")


def copy_side_files(model_file: Path, out_dir: Path) -> list[Path]:
    """Copy the tokenizer / config files beside ``model_file`` (``*.json`` but lrc summaries,
    ``*.txt``, ``*.model``, ``*.jinja``) into ``out_dir``, when ``model_file`` sits in an
    exported folder (a ``config.json`` or ``tokenizer.json`` beside it); ONNX files and their
    external data are never copied. Returns the copies."""
    ref = resolve(model_file)
    src = ref.folder
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not ref.has_side_files:
        return []
    if src.resolve() == out_dir.resolve():
        return []
    copied = []
    for f in sorted(src.iterdir()):
        if (f.is_file() and f.suffix in _SIDE_SUFFIXES and f.name != "lrc.json"
                and not f.name.endswith(".lrc.json")):
            shutil.copy2(f, out_dir / f.name)
            copied.append(out_dir / f.name)
    return copied


def _targets(eps: Sequence[str], runtimes: Sequence[str], precision: str) -> list[dict]:
    """What bench measures on, in order: ``ort`` once per execution provider of ``eps``, each
    other runtime once (on its CPU device). ``key`` names the target in rows and sessions: the EP
    alias for ORT (``cpu``), the runtime's name otherwise. LrcError (one line) for a runtime that
    is not installed or an EP this ORT build lacks, before any work."""
    names = list(dict.fromkeys(str(r).strip().lower() for r in runtimes if str(r).strip())) or ["ort"]
    if "ort" not in names and [str(e).lower() for e in eps] not in ([], ["cpu"]):
        raise LrcError(f"{opt('ep', ','.join(eps))} names ONNX Runtime providers: add ort to "
                       f"{opt('runtime')}")
    out: list[dict] = []
    for name in names:
        rt = resolve_runtime(name, precision)
        if rt.name == "ort":
            for e in eps:
                prov = resolve_ep(e)
                out.append({"key": lookup(prov).alias, "runtime": "ort", "provider": prov})
        else:
            out.append({"key": rt.name, "runtime": rt.name, "provider": None})
    keys = [t["key"] for t in out]
    for t in out:  # an ORT provider called like a runtime (--ep openvino --runtime ort,openvino)
        if t["runtime"] == "ort" and keys.count(t["key"]) > 1:
            t["key"] = f"ort-{t['key']}"
    return out


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LrcError) else runtime_error(exc)


def _trial_round(runners: list[Runner], target: dict, no_decode: dict[str, str], notes: list[str],
                 log: Callable[[str], None]) -> list[Runner]:
    """One untimed prefill and decode step per model (what a runtime compiles lazily, it
    compiles here). A model whose prefill fails is not measured on this target; a decoder whose
    decode step fails is measured on prefill only; both say why in ``notes``. Without the first
    model (the reference of the ratios) nothing is measured on the target."""
    key, kept = target["key"], []
    for r in runners:
        if r.name in no_decode:
            r.step_values = []
        try:
            _, outs = r.run_bound(r.prefill_values)
        except Exception as exc:  # noqa: BLE001 - any runtime's failure, said in one line
            notes.append(f"[{key}] {r.name} not measured: {_reason(exc)}")
            continue
        if r.step_values:
            try:
                r.decode_step(r.step_values[0], outs)
            except Exception as exc:  # noqa: BLE001
                no_decode[r.name] = _reason(exc)
                r.step_values = []
                notes.append(f"[{key}] {r.name}: decode steps not measured (prefill only): "
                             f"{no_decode[r.name]}")
        kept.append(r)
    if runners and (not kept or kept[0] is not runners[0]):
        log(f"[{key}] the first model failed: nothing measured on {key}")
        notes.append(f"[{key}] skipped: the first model (the reference) did not run")
        return []
    return kept


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def bench(models: list[str | Path], eps: Sequence[str] = ("cpu",), threads: int | None = None,
          batch_sizes: Sequence[int] = (1,), seq_lens: Sequence[int] = (128,), decode_tokens: int = 32,
          warmup: int = 3, runs: int = 30, baselines: bool = False,
          progress: Callable[[str], None] | None = None, workdir: str | Path | None = None,
          amdahl: bool = True, memory: bool = True,
          baselines_dir: str | Path | None = None, runtimes: Sequence[str] = ("ort",),
          precision: str = "f32") -> dict:
    """Benchmark ``models`` (``.onnx`` files or exported folders, found by
    :func:`lrc.graph.model.resolve_model_path`) interleaved; see the module doc.

    ``progress``: optional callable receiving one-line status messages.
    ``workdir``: where baselines and profiles are written (default: a temp dir, deleted after).
    ``amdahl``: profile the first model and compute Amdahl bounds for the others.
    ``memory``: measure per-session memory in a subprocess per model (about 1 s each).
    ``baselines_dir``: build the baselines there and keep them (default: ``workdir/baselines``),
    with the first model's tokenizer and config files copied beside them when it is an exported
    folder, so ``lrc eval`` / ``lrc generate`` can run the very files that were timed (the
    result's ``models[i].path`` names them).
    ``runtimes``: runtimes of :mod:`lrc.runtime.runtimes` (``ort`` runs on each of ``eps``);
    ``precision``: what every runtime is pinned to (``f32``).
    """
    if not models:
        raise LrcError("bench: no models given")
    if runs < 1 or warmup < 0:
        raise LrcError("bench: runs must be >= 1 and warmup >= 0")
    log = progress or (lambda _m: None)
    targets = _targets(eps, runtimes, precision)  # fail fast, before any work
    providers = [t["provider"] for t in targets if t["runtime"] == "ort"]
    paths = [resolve(m).need_file("bench") for m in models]

    machine = machine_info()  # before the work: was the machine busy with something else?
    busy = machine.get("loadavg_1min")
    sampled = machine.get("cpu_busy")
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="lrc-bench-")) if own_tmp else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    cores = machine.get("affinity_cores") or machine.get("logical_cores") or 1
    if sampled is not None:
        if sampled > 0.25:
            notes.append(f"machine busy before the benchmark: {sampled:.0%} of the CPU time of "
                         f"{os.cpu_count()} logical cores in use by other work (2 s sample); "
                         "timings are noisier (interleaving keeps the ratios fairer than the "
                         "absolute times)")
    elif busy is not None and busy > 0.5 * cores:
        notes.append(f"machine busy before the benchmark: 1-min load average {busy:.2f} on {cores} cores; "
                     "timings are noisier (interleaving keeps the ratios fairer than the absolute times)")
    try:
        entries: list[dict[str, Any]] = []
        taken: set[str] = set()
        for p in paths:
            entries.append({"name": model_name(p, taken), "path": str(p), "baseline": None})
        if baselines:
            bdir = work / "baselines" if baselines_dir is None else Path(baselines_dir)
            if baselines_dir is not None:
                copy_side_files(paths[0], bdir)
            made, bnotes = build_baselines(paths[0], bdir, (providers or ["cpu"])[0], log)
            notes.extend(bnotes)
            for kind, p in made:
                entries.append({"name": f"{entries[0]['name']}+{kind}", "path": str(p), "baseline": kind})

        first_weights: int | None = None
        first_bytes: int | None = None
        for i, e in enumerate(entries):
            p = Path(e["path"])
            e["size_bytes"] = file_size(p)
            e["notes"] = []
            e["sessions"] = {}
            try:
                g = onnx.load(str(p), load_external_data=False)
                e["kind"] = "decoder" if _is_decoder_graph(g) else "encoder"
                e["weight_matmul_params"] = int(sum(weight_matmuls(g).values()))
                e["bytes_read"] = bytes_read_per_token(g)
                e["quantized"] = any(w.op in _QUANTIZED for w in weight_matmul_nodes(g))
                del g
            except Exception as exc:  # noqa: BLE001
                e["kind"] = "unknown"
                e["weight_matmul_params"] = None
                e["notes"].append(f"graph not readable: {exc}")
            if i == 0:
                first_weights = e["weight_matmul_params"]
                first_bytes = e.get("bytes_read")
            e["flop_ratio"], e["flop_ratio_source"] = None, None
            e["bytes_bound"] = (round(first_bytes / e["bytes_read"], 4) if i > 0 and first_bytes
                                and e.get("bytes_read") else None)
            if i > 0 and e["baseline"] is None and not e.get("quantized"):
                if first_weights and e["weight_matmul_params"]:
                    e["flop_ratio"] = e["weight_matmul_params"] / first_weights
                    e["flop_ratio_source"] = "graph"
                else:
                    r = summary_flop_ratio(summary_for(p))
                    if r is not None:
                        e["flop_ratio"], e["flop_ratio_source"] = r, "summary"
            summ = summary_flop_ratio(summary_for(p)) if i > 0 else None
            if summ is not None:
                e["summary_flop_ratio"] = summ
            e["amdahl_bound"] = None
        run_rows: list[dict[str, Any]] = []
        mem_method = ("in a fresh Python subprocess per model and EP (onnxruntime imported first): "
                      "/proc/self/status VmRSS before creating the session, after creating it and after one "
                      "run at the first batch/seq; peak = VmHWM after resetting it via /proc/self/clear_refs; "
                      "all as deltas over the RSS before creation; host memory only")
        if not Path("/proc/self/status").exists():
            mem_method = "not measured (no /proc/self/status on this OS)"
            memory = False
        elif not memory:
            mem_method = "not measured (memory=False)"

        amdahl_info = None
        for target in targets:
            ep_key, provider, is_ort = target["key"], target["provider"], target["runtime"] == "ort"
            runners: list[Runner] = []
            for i, e in enumerate(entries):
                p = Path(e["path"])
                log(f"[{ep_key}] loading {e['name']}")
                t0 = time.perf_counter()
                try:
                    loaded = load_on(p, target["runtime"], threads=threads, precision=precision,
                                     provider=provider or "cpu", timing=True)
                except LrcError as exc:
                    if is_ort:
                        raise
                    notes.append(f"[{ep_key}] {e['name']} not measured: {exc}")
                    if i == 0:  # no reference on this runtime: no ratios
                        notes.append(f"[{ep_key}] skipped: the first model is the reference")
                        runners = []
                        break
                    continue
                load_s = time.perf_counter() - t0
                target.setdefault("describe", loaded.describe())
                r = loaded.timer(e["name"], model_config(p))
                sess_rec: dict[str, Any] = {"load_s": load_s, "runtime": target["runtime"]}
                if memory and is_ort:
                    mem = measure_memory(p, provider, threads, batch_sizes[0], seq_lens[0])
                    if mem is None:
                        e["notes"].append("memory probe subprocess failed")
                    else:
                        sess_rec.update({k: v for k, v in mem.items() if k != "load_s"})
                        sess_rec["load_s_fresh_process"] = mem.get("load_s")
                e["sessions"][ep_key] = sess_rec
                runners.append(r)

            no_decode: dict[str, str] = {}
            for batch in batch_sizes:
                for seq in seq_lens:
                    log(f"[{ep_key}] preparing inputs (batch {batch}; seq {seq} if the "
                        "model reads a sequence)")
                    for r in runners:
                        r.prepare(batch, seq, decode_tokens)
                    shape = getattr(runners[0], "input_shape", "") if runners else ""
                    what = f"input {shape}" if shape else f"batch {batch} seq {seq}"
                    runners = _trial_round(runners, target, no_decode, notes, log)
                    for w in range(warmup):
                        for r in runners:
                            r.one_round()
                    main = {r.name: [] for r in runners}
                    dec = {r.name: [] for r in runners}
                    for k in range(runs):
                        for r in runners:  # round-robin A/B/C
                            a, d = r.one_round()
                            main[r.name].append(a)
                            if d is not None:
                                dec[r.name].append(d)
                        if progress and (k + 1) % max(1, runs // 5) == 0:
                            log(f"[{ep_key}] {what}: {k + 1}/{runs} rounds")
                    rows = []
                    for r in runners:
                        ph = "prefill" if r.is_decoder else "encoder"
                        where = {"model": r.name, "runtime": target["runtime"], "ep": ep_key}
                        where["input"] = getattr(r, "input_shape", "") or f"{batch}x{seq}"
                        rows.append({**where, "phase": ph, "batch": batch, "seq": seq,
                                     "decode_tokens": None, **_stats(main[r.name]), "tokens_per_s": None,
                                     "rounds_ms": _ms(main[r.name])})
                        if dec[r.name]:
                            s = _stats(dec[r.name])
                            rows.append({**where, "phase": "decode", "batch": batch,
                                         "seq": seq, "decode_tokens": decode_tokens, **s,
                                         "tokens_per_s": batch * 1000.0 / s["p50_ms"],
                                         "rounds_ms": _ms(dec[r.name])})
                    first = entries[0]["name"]
                    ref = ({row["phase"]: row["p50_ms"] for row in rows if row["model"] == first}
                           if runners and runners[0].name == first else {})
                    for row in rows:
                        base = ref.get(row["phase"])
                        row["speedup"] = (base / row["p50_ms"]) if base and row["p50_ms"] > 0 else None
                        samples = dec if row["phase"] == "decode" else main
                        if base and row["model"] != first and first in samples:
                            row.update(paired_speedup(samples[first], samples[row["model"]])
                                       or {})
                    run_rows.extend(rows)

            if amdahl and amdahl_info is None and is_ort:
                log(f"[{ep_key}] profiling {entries[0]['name']} for the MatMul time fraction")
                try:
                    prof = profile_matmul_fraction(Path(entries[0]["path"]), provider, threads, batch_sizes[0],
                                                   seq_lens[0], decode_tokens, min(runs, 10), work)
                    amdahl_info = {"model": entries[0]["name"], "ep": ep_key, "batch": batch_sizes[0],
                                   "seq": seq_lens[0], "matmul_fraction": prof["matmul_fraction"],
                                   "note": prof["note"] or "f = weight-MatMul kernel time / all node kernel time (ORT profiling)"}
                except LrcError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"Amdahl profiling failed: {str(exc).splitlines()[0][:200]}")
            del runners
            gc.collect()
        if not run_rows:
            raise LrcError("bench: nothing could be measured: " + "; ".join(notes[-3:]))

        if amdahl_info:
            for e in entries[1:]:
                if e["flop_ratio"] is not None:
                    e["amdahl_bound"] = {ph: amdahl_bound(f, e["flop_ratio"])
                                         for ph, f in amdahl_info["matmul_fraction"].items()}

        return {
            "schema": SCHEMA,
            "machine": machine,
            "settings": {
                "eps": list(eps), "providers": providers, "threads": threads,
                "runtimes": list(dict.fromkeys(t["runtime"] for t in targets)),
                "precision": precision,
                "targets": [{k: v for k, v in t.items()} for t in targets],
                "threads_note": "ORT default (one per physical core)" if not threads else "intra_op_num_threads",
                "batch_sizes": list(batch_sizes), "seq_lens": list(seq_lens), "decode_tokens": decode_tokens,
                "warmup": warmup, "runs": runs, "interleaved": True, "allow_spinning": False,
                "memory_method": mem_method, "timer": "time.perf_counter",
                "io_binding": {lookup(p).alias: device_of(p) for p in providers},
            },
            "models": entries,
            "runs": run_rows,
            "amdahl": amdahl_info,
            "notes": notes,
        }
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)

