"""Honest latency benchmarks of ONNX models with ONNX Runtime.

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

Encoders (no ``past_*`` inputs): latency of one forward pass at ``batch x seq``.
Decoders (inputs named ``past_key_values.*`` / ``past.*``, optimum's layout): ``prefill``
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
shrank in proportion to their FLOPs and everything else stayed as is.

Result (JSON-serialisable dict, ``schema == "lrc.bench/1"``)::

    {
      "schema": "lrc.bench/1",
      "machine": {"cpu": str, "logical_cores": int, "physical_cores": int|None,
                  "affinity_cores": int|None, "platform": str, "python": str,
                  "onnxruntime": str, "onnx": str, "numpy": str,
                  "available_providers": [str], "gpu": str|None,
                  "loadavg_1min": float|None},
      "settings": {"eps": [str], "providers": [str], "threads": int|None,
                   "threads_note": str, "batch_sizes": [int], "seq_lens": [int],
                   "decode_tokens": int, "warmup": int, "runs": int,
                   "interleaved": true, "allow_spinning": false,
                   "memory_method": str, "timer": "time.perf_counter"},
      "models": [{"name": str, "path": str, "kind": "encoder"|"decoder",
                  "baseline": None|"int8-dynamic"|"int4-matmulnbits"|"ort-optimized",
                  "size_bytes": int, "weight_matmul_params": int|None,
                  "flop_ratio": float|None, "flop_ratio_source": "graph"|"summary"|None,
                  "amdahl_bound": {"encoder"|"prefill"|"decode": float}|None,
                  "sessions": {EP: {"load_s": float, "rss_after_load_mb": float,
                                    "rss_after_first_run_mb": float,
                                    "peak_rss_mb": float|None}},
                  "notes": [str]}],
      "runs": [{"model": str, "ep": str, "phase": "encoder"|"prefill"|"decode",
                "batch": int, "seq": int, "decode_tokens": int|None, "n": int,
                "p50_ms": float, "p90_ms": float, "p99_ms": float, "mean_ms": float,
                "std_ms": float, "min_ms": float, "speedup": float|None,
                "tokens_per_s": float|None}],
      "amdahl": {"model": str, "ep": str, "batch": int, "seq": int,
                 "matmul_fraction": {"encoder"|"prefill"|"decode": float},
                 "note": str} | None,
      "notes": [str]
    }
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lrc.errors import LrcError
from lrc.graph.locate import MATMUL_OPS, weight_matmuls
from lrc.runtime import quantizers
from lrc.runtime.providers import device_of

SCHEMA = "lrc.bench/1"

# short name -> ORT provider name
EP_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "azure": "AzureExecutionProvider",
}
# provider -> OrtValue device type for IO binding (anything else binds on the host)
_DEVICE_OF = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}
_INSTALL_HINT = {
    "CUDAExecutionProvider": " (install onnxruntime-gpu instead of onnxruntime, with a matching CUDA/cuDNN)",
    "TensorrtExecutionProvider": " (install onnxruntime-gpu with TensorRT libraries)",
    "DmlExecutionProvider": " (install onnxruntime-directml on Windows)",
    "OpenVINOExecutionProvider": " (install onnxruntime-openvino)",
    "ROCMExecutionProvider": " (install an onnxruntime build with ROCm)",
}
_NP_OF = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}
_MB = 1e6


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def resolve_model(path: str | Path) -> Path:
    """A ``.onnx`` file, or a folder holding ``model.onnx`` (else the only ``*.onnx`` in it)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.onnx").is_file():
            return p / "model.onnx"
        found = sorted(p.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        raise LrcError(f"{p}: folder has no model.onnx ({len(found)} other .onnx files)")
    if not p.is_file():
        raise LrcError(f"{p}: no such ONNX file or folder")
    return p


def _model_name(path: Path, taken: set[str]) -> str:
    base = path.parent.name if path.name == "model.onnx" and path.parent.name else path.stem
    name, i = base, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    taken.add(name)
    return name


def _load_graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def model_size_bytes(path: str | Path) -> int:
    """Size of the ONNX file plus every external-data file its initializers reference."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = _load_graph(path)
    except Exception:  # unreadable: the file alone
        return total
    seen: set[Path] = set()
    for init in _all_initializers(model.graph):
        if init.data_location == 1:  # EXTERNAL
            loc = next((e.value for e in init.external_data if e.key == "location"), None)
            if loc:
                f = (path.parent / loc).resolve()
                if f not in seen and f.is_file():
                    seen.add(f)
                    total += f.stat().st_size
    return total


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == 5:  # GRAPH
                yield from _all_initializers(attr.g)
            elif attr.type == 10:  # GRAPHS
                for g in attr.graphs:
                    yield from _all_initializers(g)


def _read_status() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":", 1)
                    out[key] = float(val.split()[0]) * 1024.0  # kB -> bytes
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    vals = [int(x) for x in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]), idle


def cpu_busy(seconds: float = 2.0) -> float | None:
    """Fraction of all CPU time used by anything during a ``seconds`` sample of /proc/stat,
    taken while this process sleeps: what other work takes *now*. (The load average lags by
    minutes: right after a heavy step of our own it still reads "busy".) None off Linux."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(seconds)
    b = _cpu_times()
    if b is None or b[0] <= a[0]:
        return None
    return max(0.0, 1.0 - (b[1] - a[1]) / (b[0] - a[0]))


def machine_info() -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    cpu, phys = platform.processor() or platform.machine(), None
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        if names:
            cpu = names[0]
        cores, pid, cid = set(), None, None
        for ln in text.splitlines():
            if ln.startswith("physical id"):
                pid = ln.split(":", 1)[1].strip()
            elif ln.startswith("core id"):
                cid = ln.split(":", 1)[1].strip()
                cores.add((pid, cid))
        phys = len(cores) or None
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    gpu = None
    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" in avail and shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:
            gpu = None
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": phys,
        "affinity_cores": affinity, "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": ort.__version__,
        "onnx": onnx.__version__, "numpy": np.__version__, "available_providers": avail,
        "gpu": gpu,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_busy": cpu_busy(),
    }


def resolve_ep(ep: str) -> str:
    """Short or full EP name -> ORT provider name; LrcError if this ORT build lacks it."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    full = EP_ALIASES.get(ep.lower(), ep)
    if full not in avail:
        known = ", ".join(sorted(set(EP_ALIASES)))
        if full not in EP_ALIASES.values():
            raise LrcError(f"unknown execution provider {ep!r} (known: {known}; available here: {', '.join(avail)})")
        raise LrcError(f"execution provider {ep!r} ({full}) is not available in this onnxruntime "
                       f"{ort.__version__} build{_INSTALL_HINT.get(full, '')}; available: {', '.join(avail)}")
    return full


def _config_for(path: Path) -> dict:
    for cand in (path.parent / "config.json",):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except (OSError, ValueError):
                return {}
    return {}


def _summary_for(path: Path) -> dict | None:
    for cand in (path.with_name(path.name + ".lrc.json"), path.parent / "lrc.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except (OSError, ValueError):
                return None
    return None


def _summary_flop_ratio(summary: dict | None) -> float | None:
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


# --------------------------------------------------------------------------------------------
# graph analysis: weight MatMuls
# --------------------------------------------------------------------------------------------

def _is_decoder_inputs(names: Iterable[str]) -> bool:
    return any(n.startswith(("past_key_values", "past.", "past_key", "past_value")) for n in names)


def _past_name_for(present: str, past_names: Sequence[str]) -> str | None:
    for cand in (present.replace("present", "past_key_values", 1),
                 present.replace("present", "past", 1),
                 present.replace("present_", "past_", 1)):
        if cand in past_names:
            return cand
    return None


# --------------------------------------------------------------------------------------------
# sessions, feeds and runners
# --------------------------------------------------------------------------------------------

def _session_options(threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def _create_session(path: Path, provider: str, threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(str(path), _session_options(threads, profile_prefix), providers=providers)
    except Exception as exc:  # noqa: BLE001
        raise LrcError(f"{path}: onnxruntime could not load it with {provider}: {str(exc).splitlines()[0][:300]}") from exc
    if provider not in sess.get_providers():
        raise LrcError(f"{path}: {provider} is listed as available but the session fell back to "
                       f"{sess.get_providers()} (missing CUDA/cuDNN libraries?)")
    return sess


class _Runner:
    """One model in one session: builds feeds, binds them on the device, times runs."""

    def __init__(self, name: str, path: Path, sess, provider: str, config: dict, seed: int = 0):
        self.name, self.path, self.sess, self.provider = name, path, sess, provider
        self.device = _DEVICE_OF.get(provider, "cpu")
        self.config = config
        self.inputs = {i.name: i for i in sess.get_inputs()}
        self.outputs = [o.name for o in sess.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith(("past_key_values", "past.", "past_key", "past_value"))]
        self.is_decoder = bool(self.past_names)
        self.present_to_past = {}
        if self.is_decoder:
            presents = [o for o in self.outputs if o.startswith("present")]
            for i, o in enumerate(presents):
                p = _past_name_for(o, self.past_names)
                if p is None and len(presents) == len(self.past_names):
                    p = self.past_names[i]
                if p is not None:
                    self.present_to_past[o] = p
            if len(self.present_to_past) != len(self.past_names):
                raise LrcError(f"{path}: cannot pair present.* outputs with past_key_values.* inputs")
        self.rng = np.random.default_rng(seed)
        self.vocab = self._vocab_size(path)

    # ---- feeds ------------------------------------------------------------------------------
    def _vocab_size(self, path: Path) -> int:
        v = self.config.get("vocab_size")
        if isinstance(v, int) and v > 0:
            return v
        try:
            m = _load_graph(path)
            inits = {i.name: i for i in m.graph.initializer}
            for node in m.graph.node:
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" \
                        and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
                    return int(inits[node.input[0]].dims[0])
        except Exception:  # noqa: BLE001
            pass
        return 100

    def _kv_dims(self, info) -> tuple[int, int]:
        shape = list(info.shape)
        heads = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
        hd = shape[3] if len(shape) > 3 and isinstance(shape[3], int) else None
        c = self.config
        if heads is None:
            heads = c.get("num_key_value_heads") or c.get("num_attention_heads") or c.get("n_head")
        if hd is None:
            nh = c.get("num_attention_heads") or c.get("n_head")
            hd = c.get("head_dim") or ((c.get("hidden_size") or c.get("n_embd") or 0) // nh if nh else None)
        if not heads or not hd:
            raise LrcError(f"{self.path}: cannot tell KV heads / head_dim of {info.name} {shape}; put config.json beside the model")
        return int(heads), int(hd)

    def feeds(self, batch: int, seq: int, past: int = 0, past_values: dict | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, info in self.inputs.items():
            dtype = _NP_OF.get(info.type)
            if dtype is None:
                raise LrcError(f"{self.path}: input {name} has unsupported type {info.type}")
            if name in self.past_names:
                if past_values is not None:
                    continue
                heads, hd = self._kv_dims(info)
                out[name] = np.zeros((batch, heads, past, hd), dtype=dtype)
            elif name == "input_ids":
                out[name] = self.rng.integers(1, max(2, self.vocab), size=(batch, seq)).astype(dtype)
            elif name == "attention_mask":
                out[name] = np.ones((batch, past + seq), dtype=dtype)
            elif name == "position_ids":
                out[name] = np.tile(np.arange(past, past + seq, dtype=dtype), (batch, 1))
            elif name == "token_type_ids":
                out[name] = np.zeros((batch, seq), dtype=dtype)
            else:
                shape = []
                for d in info.shape:
                    if isinstance(d, int):
                        shape.append(d)
                        continue
                    s = str(d or "").lower()
                    if "batch" in s:
                        shape.append(batch)
                    elif "past" in s and ("+" in s or "total" in s):
                        shape.append(past + seq)
                    elif "past" in s:
                        shape.append(past)
                    elif "total" in s:
                        shape.append(past + seq)
                    else:
                        shape.append(seq)
                if np.issubdtype(dtype, np.floating):
                    out[name] = self.rng.standard_normal(shape).astype(dtype)
                elif dtype == np.bool_:
                    out[name] = np.ones(shape, dtype=dtype)
                else:
                    out[name] = self.rng.integers(0, 2, size=shape).astype(dtype)
        return out

    # ---- execution --------------------------------------------------------------------------
    def to_device(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        import onnxruntime as ort

        return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self.device, 0) for k, v in feeds.items()}

    def run_bound(self, values: dict[str, Any]):
        """One timed run on device-bound inputs; returns (seconds, {output: OrtValue})."""
        io = self.sess.io_binding()
        for k, v in values.items():
            io.bind_ortvalue_input(k, v)
        for o in self.outputs:
            io.bind_output(o, self.device)
        t0 = time.perf_counter()
        self.sess.run_with_iobinding(io)
        io.synchronize_outputs()
        dt = time.perf_counter() - t0
        return dt, dict(zip(self.outputs, io.get_outputs()))

    def prepare(self, batch: int, seq: int, decode_tokens: int) -> None:
        """Build the (device-bound) inputs for one batch x seq configuration, untimed."""
        self.cur = (batch, seq)
        self.prefill_values = self.to_device(self.feeds(batch, seq))
        self.step_values = []
        if self.is_decoder:
            for t in range(decode_tokens):
                f = self.feeds(batch, 1, past=seq + t, past_values={})
                self.step_values.append(self.to_device(f))

    def one_round(self) -> tuple[float, float | None]:
        """Time the encoder / prefill once and, for decoders, the decode steps that follow."""
        dt, outs = self.run_bound(self.prefill_values)
        if not self.is_decoder or not self.step_values:
            return dt, None
        total = 0.0
        for vals in self.step_values:
            bound = dict(vals)
            for pres, past in self.present_to_past.items():
                bound[past] = outs[pres]
            st, outs = self.run_bound(bound)
            total += st
        return dt, total / len(self.step_values)


def _stats(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
        "std_ms": float(a.std()), "min_ms": float(a.min()),
    }


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------

_OPT_TYPES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
    "mpnet": "bert", "electra": "bert", "camembert": "bert", "deberta": "bert",
    "gpt2": "gpt2", "gpt_neox": "gpt_neox", "phi": "phi", "qwen3": "qwen3", "t5": "t5",
    "bart": "bart", "vit": "vit", "clip": "clip", "swin": "swin",
}


def _needs_external(path: Path) -> bool:
    return model_size_bytes(path) > 1_800_000_000


def build_baselines(first: Path, out_dir: Path, provider: str = "CPUExecutionProvider",
                    log: Callable[[str], None] | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """ORT INT8 dynamic (per-channel), 4-bit MatMulNBits (block 32) and ORT-optimized dense
    versions of ``first`` in ``out_dir``. Returns ([(baseline_kind, path)], notes)."""
    log = log or (lambda _m: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, Path]] = []
    notes: list[str] = []
    ext = _needs_external(first)
    cfg = _config_for(first)

    p = out_dir / "int8-dynamic.onnx"
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
            fallback = "gpt2" if _is_decoder_inputs(i.name for i in _load_graph(first).graph.input) else "bert"
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


# --------------------------------------------------------------------------------------------
# Amdahl: profile the dense model
# --------------------------------------------------------------------------------------------

def _matmul_fraction_from_trace(trace_file: str, weight_names: set[str]) -> tuple[float, bool]:
    """(fraction of node kernel time in weight MatMuls, matched_by_name)."""
    events = json.loads(Path(trace_file).read_text())
    total = mm = mm_any = 0.0
    cache: dict[str, bool] = {}
    have_names = any(weight_names)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        dur = float(e.get("dur", 0))
        total += dur
        op = (e.get("args") or {}).get("op_name", "")
        if op not in MATMUL_OPS:
            continue
        mm_any += dur
        node = e["name"][: -len("_kernel_time")]
        hit = cache.get(node)
        if hit is None:
            hit = node in weight_names or any(w and w in node for w in weight_names)
            cache[node] = hit
        if hit:
            mm += dur
    if total <= 0:
        return 0.0, have_names
    return (mm / total if have_names else mm_any / total), have_names


def profile_matmul_fraction(path: Path, provider: str, threads: int | None, batch: int, seq: int,
                            decode_tokens: int, runs: int, work: Path) -> dict[str, Any]:
    weights = set(weight_matmuls(_load_graph(path)))
    out: dict[str, float] = {}
    note = ""
    config = _config_for(path)
    sess = _create_session(path, provider, threads, profile_prefix=str(work / "prefill_profile"))
    r = _Runner("profile", path, sess, provider, config)
    phase = "prefill" if r.is_decoder else "encoder"
    r.prepare(batch, seq, 0)
    for _ in range(2 + runs):
        r.run_bound(r.prefill_values)
    f, named = _matmul_fraction_from_trace(sess.end_profiling(), weights)
    out[phase] = f
    del r, sess
    if not named:
        note = "node names missing: f counts all MatMul-like time (an over-estimate)"
    if phase == "prefill" and decode_tokens > 0:
        # the cache comes from an unprofiled session, copied to the host
        sess = _create_session(path, provider, threads)
        r = _Runner("profile", path, sess, provider, config)
        _, outs = r.run_bound(r.to_device(r.feeds(batch, seq)))
        past = {p: outs[o].numpy() for o, p in r.present_to_past.items()}
        del r, sess, outs
        sess = _create_session(path, provider, threads, profile_prefix=str(work / "decode_profile"))
        r = _Runner("profile", path, sess, provider, config)
        step = r.to_device({**r.feeds(batch, 1, past=seq, past_values={}), **past})
        for _ in range(2 + runs):
            r.run_bound(step)
        out["decode"], _ = _matmul_fraction_from_trace(sess.end_profiling(), weights)
        del r, sess
    gc.collect()
    return {"matmul_fraction": out, "note": note, "phase": phase}


def _memory_probe(path: str, provider: str, threads: int | None, batch: int, seq: int) -> dict[str, Any]:
    """Run in a fresh process: RSS deltas of creating one session and running it once."""
    import onnxruntime  # noqa: F401  (its libraries are not the session's memory)

    p = Path(path)
    config = _config_for(p)
    gc.collect()
    hwm_ok = _reset_hwm()
    before = _read_status()
    t0 = time.perf_counter()
    sess = _create_session(p, provider, threads)
    load_s = time.perf_counter() - t0
    after_load = _read_status()
    r = _Runner("probe", p, sess, provider, config)
    r.prepare(batch, seq, 1)
    r.one_round()
    after = _read_status()
    if "VmRSS" not in before:
        return {"load_s": load_s}
    return {
        "load_s": load_s,
        "rss_after_load_mb": (after_load["VmRSS"] - before["VmRSS"]) / _MB,
        "rss_after_first_run_mb": (after["VmRSS"] - before["VmRSS"]) / _MB,
        "peak_rss_mb": (after["VmHWM"] - before["VmRSS"]) / _MB if hwm_ok else None,
    }


def measure_memory(path: Path, provider: str, threads: int | None, batch: int, seq: int) -> dict[str, Any] | None:
    """``_memory_probe`` in a fresh Python subprocess (so memory freed by earlier work in this
    process cannot hide the session's own); None if the subprocess fails."""
    code = ("import json, sys; from lrc.measure.bench import _memory_probe; "
            "print('LRC_MEM ' + json.dumps(_memory_probe(*json.loads(sys.argv[1]))))")
    try:
        cp = subprocess.run([sys.executable, "-c", code, json.dumps([str(path), provider, threads, batch, seq])],
                            capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in cp.stdout.splitlines():
        if line.startswith("LRC_MEM "):
            return json.loads(line[len("LRC_MEM "):])
    return None


def amdahl_bound(f: float, rho: float) -> float:
    """Best speedup when a fraction ``f`` of time scales by ``rho`` and the rest is fixed."""
    return 1.0 / ((1.0 - f) + f * rho)


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def bench(models: list[str | Path], eps: Sequence[str] = ("cpu",), threads: int | None = None,
          batch_sizes: Sequence[int] = (1,), seq_lens: Sequence[int] = (128,), decode_tokens: int = 32,
          warmup: int = 3, runs: int = 30, baselines: bool = False,
          progress: Callable[[str], None] | None = None, workdir: str | Path | None = None,
          amdahl: bool = True, memory: bool = True) -> dict:
    """Benchmark ``models`` (``.onnx`` files or folders with model.onnx) interleaved; see module doc.

    ``progress``: optional callable receiving one-line status messages.
    ``workdir``: where baselines and profiles are written (default: a temp dir, deleted after).
    ``amdahl``: profile the first model and compute Amdahl bounds for the others.
    ``memory``: measure per-session memory in a subprocess per model (about 1 s each).
    """
    if not models:
        raise LrcError("bench: no models given")
    if runs < 1 or warmup < 0:
        raise LrcError("bench: runs must be >= 1 and warmup >= 0")
    log = progress or (lambda _m: None)
    providers = [resolve_ep(e) for e in eps]  # fail fast, before any work
    paths = [resolve_model(m) for m in models]

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
            entries.append({"name": _model_name(p, taken), "path": str(p), "baseline": None})
        if baselines:
            made, bnotes = build_baselines(paths[0], work / "baselines", providers[0], log)
            notes.extend(bnotes)
            for kind, p in made:
                entries.append({"name": f"{entries[0]['name']}+{kind}", "path": str(p), "baseline": kind})

        first_weights: int | None = None
        for i, e in enumerate(entries):
            p = Path(e["path"])
            e["size_bytes"] = model_size_bytes(p)
            e["notes"] = []
            e["sessions"] = {}
            try:
                g = _load_graph(p)
                e["kind"] = "decoder" if _is_decoder_inputs(x.name for x in g.graph.input) else "encoder"
                e["weight_matmul_params"] = int(sum(weight_matmuls(g).values()))
                del g
            except Exception as exc:  # noqa: BLE001
                e["kind"] = "unknown"
                e["weight_matmul_params"] = None
                e["notes"].append(f"graph not readable: {exc}")
            if i == 0:
                first_weights = e["weight_matmul_params"]
            e["flop_ratio"], e["flop_ratio_source"] = None, None
            if i > 0 and e["baseline"] is None:
                if first_weights and e["weight_matmul_params"]:
                    e["flop_ratio"] = e["weight_matmul_params"] / first_weights
                    e["flop_ratio_source"] = "graph"
                else:
                    r = _summary_flop_ratio(_summary_for(p))
                    if r is not None:
                        e["flop_ratio"], e["flop_ratio_source"] = r, "summary"
            summ = _summary_flop_ratio(_summary_for(p)) if i > 0 else None
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
        for provider in providers:
            ep_key = next((k for k, v in EP_ALIASES.items() if v == provider), provider)
            runners: list[_Runner] = []
            for e in entries:
                p = Path(e["path"])
                log(f"[{ep_key}] loading {e['name']}")
                t0 = time.perf_counter()
                sess = _create_session(p, provider, threads)
                load_s = time.perf_counter() - t0
                r = _Runner(e["name"], p, sess, provider, _config_for(p))
                sess_rec: dict[str, Any] = {"load_s": load_s}
                if memory:
                    mem = measure_memory(p, provider, threads, batch_sizes[0], seq_lens[0])
                    if mem is None:
                        e["notes"].append("memory probe subprocess failed")
                    else:
                        sess_rec.update({k: v for k, v in mem.items() if k != "load_s"})
                        sess_rec["load_s_fresh_process"] = mem.get("load_s")
                e["sessions"][ep_key] = sess_rec
                runners.append(r)

            for batch in batch_sizes:
                for seq in seq_lens:
                    log(f"[{ep_key}] batch {batch} seq {seq}: preparing inputs")
                    for r in runners:
                        r.prepare(batch, seq, decode_tokens)
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
                            log(f"[{ep_key}] batch {batch} seq {seq}: {k + 1}/{runs} rounds")
                    rows = []
                    for r in runners:
                        ph = "prefill" if r.is_decoder else "encoder"
                        rows.append({"model": r.name, "ep": ep_key, "phase": ph, "batch": batch, "seq": seq,
                                     "decode_tokens": None, **_stats(main[r.name]), "tokens_per_s": None})
                        if dec[r.name]:
                            s = _stats(dec[r.name])
                            rows.append({"model": r.name, "ep": ep_key, "phase": "decode", "batch": batch,
                                         "seq": seq, "decode_tokens": decode_tokens, **s,
                                         "tokens_per_s": batch * 1000.0 / s["p50_ms"]})
                    ref = {row["phase"]: row["p50_ms"] for row in rows if row["model"] == runners[0].name}
                    for row in rows:
                        base = ref.get(row["phase"])
                        row["speedup"] = (base / row["p50_ms"]) if base and row["p50_ms"] > 0 else None
                    run_rows.extend(rows)

            if amdahl and amdahl_info is None:
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
                "threads_note": "ORT default (one per physical core)" if not threads else "intra_op_num_threads",
                "batch_sizes": list(batch_sizes), "seq_lens": list(seq_lens), "decode_tokens": decode_tokens,
                "warmup": warmup, "runs": runs, "interleaved": True, "allow_spinning": False,
                "memory_method": mem_method, "timer": "time.perf_counter",
                "io_binding": {next((k for k, v in EP_ALIASES.items() if v == p), p): _DEVICE_OF.get(p, "cpu")
                               for p in providers},
            },
            "models": entries,
            "runs": run_rows,
            "amdahl": amdahl_info,
            "notes": notes,
        }
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# presentation
# --------------------------------------------------------------------------------------------

def _fmt(x, spec=".2f", none="-") -> str:
    return none if x is None else format(x, spec)


def format_tables(result: dict) -> list:
    """rich Tables: machine/settings, models (size, load, memory, rho, bound), latencies per EP."""
    from rich.table import Table

    tables = []
    m, s = result.get("machine", {}), result.get("settings", {})
    t = Table(title="Machine", show_header=False)
    t.add_column("key")
    t.add_column("value")
    t.add_row("CPU", f"{m.get('cpu')} ({m.get('physical_cores')} physical / {m.get('logical_cores')} logical cores)")
    if m.get("gpu"):
        t.add_row("GPU", str(m["gpu"]))
    t.add_row("onnxruntime", f"{m.get('onnxruntime')} ({', '.join(m.get('available_providers', []))})")
    t.add_row("EPs", ", ".join(s.get("eps", [])))
    t.add_row("threads", str(s.get("threads") or s.get("threads_note", "default")))
    t.add_row("protocol", f"{s.get('warmup')} warm-ups, {s.get('runs')} runs round-robin, spinning off")
    tables.append(t)

    t = Table(title="Models")
    for col in ("model", "kind", "size MB", "load s", "RSS MB", "peak MB", "weight params", "rho", "Amdahl bound"):
        t.add_column(col, justify="left" if col in ("model", "kind") else "right")
    for e in result.get("models", []):
        sess = next(iter(e.get("sessions", {}).values()), {})
        bound = e.get("amdahl_bound") or {}
        t.add_row(e["name"], e.get("kind", "?"), _fmt(e.get("size_bytes", 0) / _MB, ".1f"),
                  _fmt(sess.get("load_s"), ".2f"), _fmt(sess.get("rss_after_first_run_mb"), ".1f"),
                  _fmt(sess.get("peak_rss_mb"), ".1f"),
                  _fmt(e.get("weight_matmul_params"), ",d") if e.get("weight_matmul_params") is not None else "-",
                  _fmt(e.get("flop_ratio"), ".3f"),
                  " ".join(f"{k} {v:.2f}x" for k, v in bound.items()) or "-")
    tables.append(t)

    rows = result.get("runs", [])
    for ep in dict.fromkeys(r["ep"] for r in rows):
        t = Table(title=f"Latency ({ep})")
        for col in ("model", "phase", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "mean ms", "speedup", "tok/s"):
            t.add_column(col, justify="left" if col in ("model", "phase") else "right")
        for r in rows:
            if r["ep"] != ep:
                continue
            t.add_row(r["model"], r["phase"], str(r["batch"]), str(r["seq"]), _fmt(r["p50_ms"], ".3f"),
                      _fmt(r["p90_ms"], ".3f"), _fmt(r["p99_ms"], ".3f"), _fmt(r["mean_ms"], ".3f"),
                      _fmt(r.get("speedup"), ".2f"), _fmt(r.get("tokens_per_s"), ".1f"))
        tables.append(t)
    amd = result.get("amdahl")
    if amd:
        t = Table(title="Amdahl (time fraction in weight MatMuls of the first model)", show_header=False)
        t.add_column("phase")
        t.add_column("f")
        for ph, f in amd["matmul_fraction"].items():
            t.add_row(ph, f"{f:.3f}")
        tables.append(t)
    return tables


if __name__ == "__main__":  # pragma: no cover - quick manual use: python -m lrc.bench a.onnx b.onnx
    from rich.console import Console

    res = bench(sys.argv[1:], progress=print)
    for tab in format_tables(res):
        Console().print(tab)
