"""What a benchmark records about the machine it ran on, and the per-session memory probe.

* ``machine_info``: CPU, cores (logical, physical, this process's affinity), versions, GPU name,
  load average and ``cpu_busy``: the share of CPU time other work takes right now.
* ``measure_memory``: host memory of one session, measured in a fresh Python subprocess
  (``memory_probe``) so memory freed by earlier work in the benchmarking process cannot hide the
  session's own: RSS before creating the session, after creating it and after one run (one
  decode step for decoders), peak from VmHWM after resetting it via /proc/self/clear_refs; all as
  deltas over the RSS before creation, in MB (1e6 bytes). Linux only (None elsewhere).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lrc.runtime.runner import Runner, timing_session

__all__ = ["cpu_busy", "machine_info", "measure_memory", "memory_probe"]

_MB = 1e6


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
    """The ``machine`` record of a bench result (see :mod:`lrc.measure.bench`)."""
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


def memory_probe(path: str, provider: str, threads: int | None, batch: int, seq: int) -> dict[str, Any]:
    """Run in a fresh process: RSS deltas of creating one session and running it once."""
    import onnxruntime  # noqa: F401  (its libraries are not the session's memory)

    gc.collect()
    hwm_ok = _reset_hwm()
    before = _read_status()
    t0 = time.perf_counter()
    sess = timing_session(path, provider, threads)
    load_s = time.perf_counter() - t0
    after_load = _read_status()
    r = Runner(sess, "probe", provider)
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
    """``memory_probe`` in a fresh Python subprocess (so memory freed by earlier work in this
    process cannot hide the session's own); None if the subprocess fails."""
    code = ("import json, sys; from lrc.measure.machine import memory_probe; "
            "print('LRC_MEM ' + json.dumps(memory_probe(*json.loads(sys.argv[1]))))")
    try:
        cp = subprocess.run([sys.executable, "-c", code, json.dumps([str(path), provider, threads, batch, seq])],
                            capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in cp.stdout.splitlines():
        if line.startswith("LRC_MEM "):
            return json.loads(line[len("LRC_MEM "):])
    return None
