"""Execution providers: the one table of what lrc knows about each ONNX Runtime EP.

A new execution provider is one entry in ``PROVIDERS`` (and its test): the alias users type
(``--ep cuda``), ORT's provider name, the device that IO binding places tensors on, the line that
says how to install it, the int8 factor form that runs on it without falling back to the CPU, and
the settings lrc gives ONNX Runtime's quantisers for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lrc.errors import LrcError


@dataclass(frozen=True)
class Provider:
    """One execution provider."""

    name: str                         # ORT's name, e.g. "CUDAExecutionProvider"
    aliases: tuple[str, ...]          # what users type; the first is the short name
    device: str = "cpu"               # OrtValue device for IO binding ("cuda", "dml", "cpu")
    install: str = ""                 # how to get a build that has it
    int8_form: str = "dynamic"        # int8 factor form that runs natively (lrc.graph.passes.int8)
    quantizer: dict = field(default_factory=dict)  # ORT quantiser settings (MatMulNBits etc.)

    @property
    def alias(self) -> str:
        return self.aliases[0]

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"


_CPU_4BIT = {"accuracy_level": 4}  # int8 compute in MatMulNBits on CPU (faster, BENCHMARKS.md)

PROVIDERS: tuple[Provider, ...] = (
    Provider("CPUExecutionProvider", ("cpu",), quantizer=_CPU_4BIT),
    # CUDA has no DynamicQuantizeLinear kernel (ORT issues #7745, #12229): weight-only QDQ there
    Provider("CUDAExecutionProvider", ("cuda",), "cuda",
             " (install onnxruntime-gpu instead of onnxruntime, with a matching CUDA/cuDNN)",
             int8_form="qdq"),
    Provider("TensorrtExecutionProvider", ("tensorrt", "trt"), "cuda",
             " (install onnxruntime-gpu with TensorRT libraries)", int8_form="qdq"),
    Provider("ROCMExecutionProvider", ("rocm",), install=" (install an onnxruntime build with ROCm)",
             int8_form="qdq"),
    Provider("MIGraphXExecutionProvider", ("migraphx",), int8_form="qdq"),
    Provider("DmlExecutionProvider", ("dml", "directml"), "dml",
             " (install onnxruntime-directml on Windows)", int8_form="qdq"),
    Provider("OpenVINOExecutionProvider", ("openvino",), install=" (install onnxruntime-openvino)"),
    Provider("CoreMLExecutionProvider", ("coreml",)),
    Provider("QNNExecutionProvider", ("qnn",), int8_form="qdq"),
    Provider("XnnpackExecutionProvider", ("xnnpack",)),
    Provider("WebGpuExecutionProvider", ("webgpu",), int8_form="qdq"),
    Provider("AzureExecutionProvider", ("azure",)),
)
_BY_KEY = {k: p for p in PROVIDERS for k in (p.name.lower(), *p.aliases)}


def lookup(ep: str) -> Provider:
    """Short or full EP name -> its Provider (whether or not this ORT build has it)."""
    p = _BY_KEY.get(str(ep).lower())
    if p is None:
        known = ", ".join(sorted(a for p in PROVIDERS for a in p.aliases))
        raise LrcError(f"unknown execution provider {ep!r} (known: {known}; available here: "
                       f"{', '.join(available())})")
    return p


def available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve(ep: str) -> Provider:
    """The Provider for ``ep``; LrcError (with how to install it) if this ORT build lacks it."""
    import onnxruntime as ort

    p = lookup(ep)
    avail = available()
    if p.name not in avail:
        raise LrcError(f"execution provider {ep!r} ({p.name}) is not available in this onnxruntime "
                       f"{ort.__version__} build{p.install}; available: {', '.join(avail)}")
    return p


def resolve_ep(ep: str) -> str:
    """Short or full EP name -> ORT provider name; LrcError if this ORT build lacks it."""
    return resolve(ep).name


def device_of(provider: str) -> str:
    """OrtValue device type for IO binding on ``provider`` (anything unknown binds on the host)."""
    p = _BY_KEY.get(provider.lower())
    return p.device if p else "cpu"
