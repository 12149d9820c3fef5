"""Runtimes: the one registry of the engines lrc runs ONNX files on, beside ORT's providers.

ONNX Runtime (``ort``, its execution providers in :mod:`lrc.runtime.providers`) is one runtime;
OpenVINO and tract read the same .onnx files. Every runtime loads a model into a ``Loaded`` with
one interface, so bench, verify and the benchmarks treat them alike:

* ``get_inputs()`` / ``get_outputs()`` describe the graph as ONNX Runtime does (name, type string,
  shape of ints and symbol names), read from the ONNX file for the other runtimes, so
  :mod:`lrc.runtime.feeds` (the one feed builder) builds their feeds unchanged;
* ``run(feeds)`` takes inputs by name and returns numpy outputs in graph-output order (tract
  renames outputs after the nodes that make them: they are mapped by index);
* ``timer(name, config)`` returns the :class:`lrc.runtime.runner.Runner` that bench times:
  ORT's binds inputs and outputs with IO binding; the others convert inputs to the runtime's own
  tensors before timing and feed a decode step the previous step's cache as those tensors.

Precision is pinned and stated: ``f32`` unless asked. ONNX Runtime runs the graph's own types
(no lower-precision rewrite); OpenVINO gets ``hints.inference_precision: f32`` (without it, a CPU
with bf16 support runs bf16, relative error ~3e-3) and the thread count, and the compiled model's
precision is checked (``bf16`` / ``f16`` only where the CPU plugin offers them); tract computes in
f32.

tract needs concrete input shapes on exported graphs (``Flatten`` of a symbolic batch fails to
analyse): each input gets a fact whose dims are those of the feeds, except the KV-cache length,
which stays symbolic, so one compiled model serves every decode step; a model is compiled once per
shape of its other inputs.

A runtime that is not installed is one line naming its pip extra (``pip install
'lrc[openvino]'``); a model a runtime cannot load or run is one line naming the runtime, the model,
the runtime's reason and the ONNX Runtime-only (``com.microsoft``) operators the graph uses. ORT
sessions are strict: a GPU provider that fell back to the CPU is an error (timing sessions).

A new runtime is one ``Runtime`` in ``RUNTIMES`` (its loader and a ``Loaded`` subclass) and its
test in tests/test_runtimes.py.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lrc.errors import LrcError, opt
from lrc.modelref import is_past
from lrc.runtime.providers import lookup
from lrc.runtime.runner import Runner, timing_session
from lrc.runtime.session import open_session

__all__ = ["ANY", "RUNTIMES", "Runtime", "Loaded", "get_runtime", "resolve_runtime",
           "runtime_names", "target_forms", "target_names",
           "load", "contrib_ops", "runtime_error"]

PRECISIONS = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class Runtime:
    """One runtime: its name (what users type), title, the module it imports, the pip extra that
    installs it, the precisions it can be pinned to and its loader."""

    name: str
    title: str
    module: str                       # import name
    dist: str                         # distribution on PyPI (for its version)
    extra: str                        # lrc's pip extra
    precisions: tuple[str, ...]
    loader: Callable[..., "Loaded"]   # loader(path, *, threads, precision, provider, timing)
    device: str = "CPU"
    # the quantised node forms it runs (lrc.graph.passes.qforms), per scheme (int4,
    # int8-weight, int8) and for embedding tables, the one lrc writes for it first
    forms: dict = field(default_factory=dict)

    @property
    def install(self) -> str:
        return f"pip install 'lrc[{self.extra}]'" if self.extra else f"pip install {self.dist}"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def check(self, precision: str = "f32") -> "Runtime":
        """Self, or LrcError: not installed (with the pip line), or a precision it lacks."""
        if not self.installed():
            raise LrcError(f"runtime {self.name!r} ({self.title}) is not installed: {self.install}")
        if precision not in self.precisions:
            raise LrcError(f"runtime {self.name!r} runs at {', '.join(self.precisions)}, not "
                           f"{precision!r}")
        return self


def runtime_error(exc: BaseException) -> str:
    """A runtime's exception as one line: Rust backtraces and C++ source locations dropped."""
    text = str(exc).split("Stack backtrace:")[0]
    lines = []
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s == "Caused by:":
            continue
        s = re.sub(r"^Exception from \S+:\s*", "", s)
        s = re.sub(r"Check '[^']*' failed at \S+?:\d+:*\s*", "", s)  # OpenVINO's C++ location
        s = s.replace("FrontEnd API failed with ", "").replace("::", ":").strip(" :")
        s = re.sub(r"^\d+:\s*", "", s)
        if s and s not in lines:
            lines.append(s)
    line = ": ".join(lines) if lines else type(exc).__name__
    return line[:400]


def contrib_ops(path: str | os.PathLike) -> list[str]:
    """ONNX Runtime-only operators (domain ``com.microsoft``) the graph at ``path`` uses."""
    try:
        import onnx

        g = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return []
    return sorted({n.op_type for n in g.node if n.domain == "com.microsoft"})


def _failure(rt: "Runtime", path, what: str, exc: BaseException) -> LrcError:
    ops = contrib_ops(path)
    hint = (f" (the graph uses ONNX Runtime-only com.microsoft ops: {', '.join(ops)})"
            if ops else "")
    return LrcError(f"{rt.title} cannot {what} {path}: {runtime_error(exc)}{hint}")


# --------------------------------------------------------------------------------------------
# the graph's inputs and outputs, described as ONNX Runtime describes them (for feeds.py)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValueInfo:
    """name / type ("tensor(float)") / shape (ints, symbol names, None), as ORT's NodeArg."""

    name: str
    type: str
    shape: list


def _graph_io(path: Path) -> tuple[list[ValueInfo], list[ValueInfo]]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}

    def info(v) -> ValueInfo:
        tt = v.type.tensor_type
        typ = f"tensor({onnx.TensorProto.DataType.Name(tt.elem_type).lower()})"
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim]
        return ValueInfo(v.name, typ, dims)

    return [info(v) for v in g.input if v.name not in inits], [info(v) for v in g.output]


# --------------------------------------------------------------------------------------------
# a model loaded on a runtime
# --------------------------------------------------------------------------------------------

class Loaded:
    """A model on one runtime: ORT-like ``get_inputs`` / ``get_outputs``, ``run(feeds)`` by name
    in graph-output order, native values for timing, and ``describe`` (runtime, version, device,
    precision, threads) for results."""

    runtime: Runtime

    def __init__(self, runtime: Runtime, path: Path, precision: str, threads: int | None):
        self.runtime, self.lrc_path = runtime, str(path)
        self.precision, self.threads = precision, threads
        self._inputs, self._outputs = _graph_io(path)
        self.output_names = [o.name for o in self._outputs]

    def get_inputs(self) -> list[ValueInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[ValueInfo]:
        return list(self._outputs)

    def describe(self) -> dict:
        return {"runtime": self.runtime.name, "title": self.runtime.title,
                "version": self.runtime.version(), "device": self.runtime.device,
                "precision": self.precision, "threads": self.threads}

    # native values: what the runtime's own run call takes and returns
    def to_native(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: np.ascontiguousarray(v) for k, v in feeds.items()}

    def run_native(self, values: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def to_numpy(self, value) -> np.ndarray:
        return np.asarray(value)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs (numpy, graph-output order) for ``feeds`` (inputs by name); LrcError with the
        runtime's reason when it cannot run them."""
        try:
            return [self.to_numpy(v) for v in self.run_native(self.to_native(feeds))]
        except LrcError:
            raise
        except Exception as exc:  # noqa: BLE001 - every runtime has its own exception types
            raise _failure(self.runtime, self.lrc_path, "run", exc) from exc

    def timer(self, name: str, config: dict | None = None) -> Runner:
        return _NativeRunner(self, name, config)


class _NativeRunner(Runner):
    """bench's Runner on a non-ORT runtime: inputs converted to the runtime's tensors before the
    clock starts, outputs left as the runtime returns them (a decode step is fed the previous
    step's cache tensors as they are)."""

    def __init__(self, model: Loaded, name: str, config: dict | None):
        self.model = model
        super().__init__(model, name, provider="cpu", config=config)

    def to_device(self, feeds):
        return self.model.to_native(feeds)

    def run_bound(self, values):
        t0 = time.perf_counter()
        outs = self.model.run_native(values)
        dt = time.perf_counter() - t0
        return dt, dict(zip(self.outputs, outs))


class _Ort(Loaded):
    """ONNX Runtime through lrc's one session factory (:mod:`lrc.runtime.session`)."""

    def __init__(self, runtime, path, precision, threads, provider="cpu", timing=False):
        self.runtime, self.lrc_path = runtime, str(path)
        self.precision, self.threads = precision, threads
        self.provider = lookup(provider).name
        self.sess = (timing_session(path, self.provider, threads) if timing
                     else open_session(path, threads=threads, provider=self.provider,
                                       strict=True))
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def get_inputs(self):
        return self.sess.get_inputs()

    def get_outputs(self):
        return self.sess.get_outputs()

    def describe(self) -> dict:
        return {**super().describe(), "device": lookup(self.provider).alias,
                "provider": self.provider, "providers": self.sess.get_providers()}

    def run_native(self, values):
        return self.sess.run(None, values)

    def timer(self, name, config=None) -> Runner:
        return Runner(self.sess, name, self.provider, config)


class _OpenVINO(Loaded):
    """OpenVINO on its CPU plugin, pinned to ``precision`` (``hints.inference_precision``) and
    ``threads``; two infer requests alternate so a decode step can read the cache tensors the
    step before wrote without a copy."""

    def __init__(self, runtime, path, precision, threads, **_):
        super().__init__(runtime, path, precision, threads)
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        self._ov = ov
        want = {"f32": ov.Type.f32, "f16": ov.Type.f16, "bf16": ov.Type.bf16}[precision]
        cfg = {hints.inference_precision: want,
               hints.performance_mode: hints.PerformanceMode.LATENCY}
        if threads:
            cfg[props.inference_num_threads] = int(threads)
        core = ov.Core()
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        need = {"f16": "FP16", "bf16": "BF16"}.get(precision)
        if need and need not in caps:
            raise LrcError(f"OpenVINO's CPU plugin cannot compute in {precision} on this machine "
                           f"(it offers {', '.join(caps)})")
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
        except Exception as exc:  # noqa: BLE001
            raise _failure(runtime, path, "load", exc) from exc
        got = self.compiled.get_property(hints.inference_precision)
        if got != want:
            raise LrcError(f"OpenVINO compiled {path} at {got}, not the {precision} asked for: "
                           "numbers at another precision are not reported")
        self.threads = int(self.compiled.get_property(props.inference_num_threads)) or threads
        names = [o.get_names() for o in self.compiled.outputs]
        # graph outputs in graph order; OpenVINO keeps the ONNX names, checked here
        if [n for n, o in zip(self.output_names, names) if n not in o]:
            raise LrcError(f"OpenVINO renamed the outputs of {path}: {names}")
        self._requests = [self.compiled.create_infer_request() for _ in range(2)]
        self._k = 0

    def to_native(self, feeds):
        return {k: self._ov.Tensor(np.ascontiguousarray(v)) for k, v in feeds.items()}

    def run_native(self, values):
        req = self._requests[self._k]
        self._k ^= 1
        for k, v in values.items():
            req.set_tensor(k, v)
        req.infer()
        return [req.get_output_tensor(i) for i in range(len(self.output_names))]

    def to_numpy(self, value):
        return np.array(value.data, copy=True)


_TRACT_TYPES = {"tensor(float)": "f32", "tensor(float16)": "f16", "tensor(double)": "f64",
                "tensor(int64)": "i64", "tensor(int32)": "i32", "tensor(int16)": "i16",
                "tensor(int8)": "i8", "tensor(uint8)": "u8", "tensor(bool)": "bool"}


class _Tract(Loaded):
    """tract: one compiled model per shape of the non-cache inputs (facts from the feeds, the
    KV-cache length left symbolic); outputs mapped to the graph's names by index."""

    def __init__(self, runtime, path, precision, threads, **_):
        super().__init__(runtime, path, precision, threads)
        import tract

        self._tract = tract
        self.threads = 1  # tract's Python binding runs a model on the calling thread
        self._compiled: dict[tuple, Any] = {}
        try:
            model = tract.onnx().load(str(path))
            self._order = [model.input_name(i) for i in range(model.input_count())]
        except Exception as exc:  # noqa: BLE001
            raise _failure(runtime, path, "load", exc) from exc
        self._cache_syms = {str(d) for v in self._inputs if is_past(v.name) and len(v.shape) == 4
                            for d in v.shape[2:3] if isinstance(d, str)}

    def _facts(self, shapes: dict[str, tuple]) -> list[str]:
        """Facts ("1,16,i64") of every input: feed dims, cache-length symbols kept."""
        env: dict[str, int] = {}
        for v in self._inputs:
            for d, n in zip(v.shape, shapes.get(v.name, ())):
                if isinstance(d, str) and d.isidentifier() and d not in self._cache_syms:
                    env[d] = int(n)
        facts = []
        for v in self._inputs:
            dims = []
            for ax, (d, n) in enumerate(zip(v.shape, shapes[v.name])):
                if isinstance(d, str) and set(re.findall(r"[A-Za-z_]\w*", d)) & self._cache_syms:
                    dims.append(re.sub(r"[A-Za-z_]\w*",
                                       lambda m: str(env.get(m.group(0), m.group(0))), d)
                                .replace(" ", ""))
                elif is_past(v.name) and ax == 2 and not isinstance(d, int):
                    dims.append("past_len")
                else:
                    dims.append(str(int(n)))
            facts.append(",".join(dims + [_TRACT_TYPES.get(v.type, "f32")]))
        return facts

    def _runnable(self, shapes: dict[str, tuple]):
        facts = self._facts(shapes)
        key = tuple(facts)
        if key not in self._compiled:
            try:
                model = self._tract.onnx().load(self.lrc_path)
                index = {n: i for i, n in enumerate(self._order)}
                for v, f in zip(self._inputs, facts):
                    model.set_input_fact(index[v.name], f)
                self._compiled[key] = model.into_model().into_runnable().spawn_state()
            except Exception as exc:  # noqa: BLE001
                raise _failure(self.runtime, self.lrc_path, "load", exc) from exc
        return self._compiled[key]

    def to_native(self, feeds):
        return {k: self._tract.Tensor.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}

    def _shape(self, value) -> tuple:
        return tuple(value._parts()[1]) if isinstance(value, self._tract.Tensor) else np.shape(value)

    def run_native(self, values):
        missing = [n for n in self._order if n not in values]
        if missing:
            raise LrcError(f"tract: inputs lack {missing}")
        state = self._runnable({k: self._shape(v) for k, v in values.items()})
        return state.run([values[n] for n in self._order])

    def to_numpy(self, value):
        return value.to_numpy()


def _loader(cls) -> Callable[..., Loaded]:
    def load_on(runtime, path, **kw):
        return cls(runtime, path, kw.pop("precision"), kw.pop("threads"), **kw)
    return load_on


# The quantised forms each runtime runs (lrc.graph.passes.qforms), the one lrc writes for it
# first. Measured (benchmarks/runtimes.py, OpenVINO 2026.4, tract 0.23): OpenVINO runs
# block-wise DequantizeLinear int4/int8 at opset 21 (and ORT's own ops, rounding differently);
# tract runs per-axis int8 DequantizeLinear and MatMulInteger but neither int4 nor block-wise
# DequantizeLinear, nor GatherBlockQuantized at 8 bits.
RUNTIMES: tuple[Runtime, ...] = (
    Runtime("ort", "ONNX Runtime", "onnxruntime", "onnxruntime", "", ("f32",),
            _loader(_Ort), forms={"int4": ("nbits", "dq-block"),
                                  "int8-weight": ("nbits", "dq-block", "dq-column"),
                                  "int8": ("dqmatmul", "dynamic"),
                                  "embedding": ("gbq", "dq-row")}),
    Runtime("openvino", "OpenVINO", "openvino", "openvino", "openvino", ("f32", "bf16", "f16"),
            _loader(_OpenVINO), forms={"int4": ("dq-block",),
                                       "int8-weight": ("dq-block", "dq-column"),
                                       "int8": ("dynamic",), "embedding": ("dq-row",)}),
    Runtime("tract", "tract", "tract", "tract", "tract", ("f32",), _loader(_Tract),
            forms={"int4": (), "int8-weight": ("dq-column",), "int8": ("dynamic",),
                   "embedding": ("dq-row",)}),
)
_BY_NAME = {r.name: r for r in RUNTIMES}
ANY = "any"  # a target: what every runtime lrc knows runs


def target_names() -> list[str]:
    """What the target-runtime option takes: every runtime, and ``any``."""
    return [*runtime_names(), ANY]


def target_forms(name: str) -> dict[str, str | None]:
    """The form lrc writes for each scheme (and embedding tables) on target ``name``: the
    runtime's first; for ``any``, the first form (in :data:`lrc.graph.passes.qforms.FORMS`'
    order) every runtime runs. None: no form of that scheme runs there."""
    from lrc.graph.passes.qforms import EMBEDDING_FORMS
    from lrc.graph.passes.qforms import FORMS as QFORMS

    if name != ANY:
        rt = get_runtime(name)
        return {k: (v[0] if v else None) for k, v in rt.forms.items()}
    out: dict[str, str | None] = {}
    for key in RUNTIMES[0].forms:
        order = EMBEDDING_FORMS if key == "embedding" else QFORMS
        common = [f for f in order if all(f in rt.forms.get(key, ()) for rt in RUNTIMES)]
        out[key] = common[0] if common else None
    return out


def runtime_names() -> list[str]:
    return [r.name for r in RUNTIMES]


def get_runtime(name: str) -> Runtime:
    """The Runtime called ``name`` (installed or not); LrcError for an unknown name."""
    rt = _BY_NAME.get(str(name).strip().lower())
    if rt is None:
        raise LrcError(f"unknown runtime {name!r} (known: {', '.join(runtime_names())})")
    return rt


def resolve_runtime(name: str, precision: str = "f32") -> Runtime:
    """The installed Runtime called ``name``; LrcError (one line, the pip command) otherwise."""
    if precision not in PRECISIONS:
        raise LrcError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    return get_runtime(name).check(precision)


def load(model, runtime: str = "ort", *, threads: int | None = None, precision: str = "f32",
         provider: str = "cpu", timing: bool = False) -> Loaded:
    """``model`` (a .onnx file or an exported folder) loaded on ``runtime``. ``provider`` is the
    ORT execution provider (``ort`` only); ``timing`` opens ORT's timing session (one inter-op
    thread, warnings off)."""
    from lrc.modelref import resolve

    rt = resolve_runtime(runtime, precision)
    if rt.name != "ort" and str(provider).lower() not in ("cpu", "cpuexecutionprovider"):
        raise LrcError(f"{opt('ep', provider)} is an ONNX Runtime provider; runtime {rt.name!r} runs "
                       f"on its own {rt.device} device")
    path = resolve(model).need_file("a runtime")
    return rt.loader(rt, path, threads=threads, precision=precision, provider=provider,
                     timing=timing)
