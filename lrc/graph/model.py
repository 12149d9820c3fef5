"""Load and save ONNX models safely, in memory near one copy of the weights a pass touches.

* ``load`` accepts a ``.onnx`` file or an exported folder (``DIR/model.onnx``), refuses
  anything that is not a readable ONNX protobuf with one clear line, and refuses external-data
  locations that are absolute, contain ``..`` or resolve (through symlinks) outside the model's
  folder — a known attack on ONNX loaders that would read arbitrary files — and, as onnx-ir
  does at the first read, data files with several hard links. Weights in external
  data stay on disk until used, and are read afresh at each use instead of staying mapped
  (:class:`DiskTensor`): memory holds the weights a pass is working on, not all it has read.
* A single-file model above ``SPILL_THRESHOLD`` is never parsed whole (protobuf would hold the
  file's bytes and the parsed message together, twice the model): ``spill`` walks its wire format
  field by field, copies every main-graph initializer's ``raw_data`` straight from the file into a
  data file in a temporary folder (page-aligned, in chunks) and keeps the rest — the graph without
  its weights — as a small protobuf whose initializers point at that file. The model then loads
  like one with external data; the folder lives as long as a model or session uses it and is
  deleted after (``external_folder(path)`` tells a session where the data of ``path`` lies).
  ``load_proto(path)`` (the graph, for validating and inspecting) reads the same skeleton
  without copying anything.
* ``save`` writes atomically: everything goes to a temporary folder beside the output, is
  checked there, and is renamed into place only when complete. Models over 2 GB (protobuf's limit)
  or on request are written with external data (``OUT.onnx.data``); single files are written one
  initializer at a time. Either way a memory-mapped weight is unmapped once written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from lrc.errors import LrcError, opt

PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # stay clear of the 2 GiB protobuf limit
ONNX_NAMES = ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx")
SOURCE_META = "lrc.source_path"  # the file load() read a model from (lrc.modelref reads it)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The .onnx file behind ``path`` (a file, or a folder holding one model)."""
    p = Path(path)
    if not p.exists():
        raise LrcError(f"{p}: no such file or folder")
    if p.is_dir():
        for name in ONNX_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise LrcError(f"{p}: folder holds no .onnx model")
        raise LrcError(f"{p}: folder holds several models ({', '.join(f.name for f in found)}); "
                       "name the .onnx file")
    if p.stat().st_size == 0:
        raise LrcError(f"{p}: file is empty, not an ONNX model")
    return p


def _check_external_locations(proto: onnx.ModelProto, base: Path) -> None:
    base_real = base.resolve()
    for tensor in all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        bad = (not loc or "\0" in loc or os.path.isabs(loc) or loc.startswith(("/", "\\"))
               or ".." in Path(loc).parts or ":" in loc)
        target = (base / loc).resolve() if not bad else None
        if target is not None and base_real not in target.parents:
            bad = True
        if bad:
            raise LrcError(f"refusing external data location {loc!r} of tensor {tensor.name!r}: "
                           "it points outside the model's folder")
        if not target.is_file():
            raise LrcError(f"external data file {loc!r} of tensor {tensor.name!r} is missing")
        st = target.stat()
        if st.st_nlink > 1:  # onnx-ir refuses it at the first read (a hard-link attack guard)
            raise LrcError(f"refusing external data file {loc!r}: it has {st.st_nlink} hard "
                           "links (the guard against hard-linked files ONNX IR keeps); give "
                           "the model a copy of its own (cp without -l)")
        size = st.st_size
        try:
            off, length = int(info.get("offset") or 0), info.get("length")
            length = int(length) if length not in (None, "") else None
        except ValueError:
            raise LrcError(f"external data of tensor {tensor.name!r}: offset and length must be "
                           f"integers, got {info.get('offset')!r} and {info.get('length')!r}")
        need = _data_bytes(tensor)
        if length is not None and need is not None and length != need:
            raise LrcError(f"external data of tensor {tensor.name!r}: length {length} does not "
                           f"match its shape {list(tensor.dims)} ({need} bytes)")
        end = off + (length if length is not None else need or 0)
        if off < 0 or (length or 0) < 0 or end > size:
            raise LrcError(f"external data of tensor {tensor.name!r} lies past the end of "
                           f"{loc!r} (truncated file?)")


_PACKED = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}  # two values per byte
for _name in ("FLOAT4E2M1", "INT2", "UINT2"):
    if hasattr(onnx.TensorProto, _name):
        _PACKED.add(getattr(onnx.TensorProto, _name))


def _data_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes a tensor of this type and shape holds in ``raw_data``, or None when that is not
    fixed (strings, unknown types, negative dims: refused by ``_check_model_fields``)."""
    if t.data_type == onnx.TensorProto.STRING or any(d < 0 for d in t.dims):
        return None
    n = 1
    for d in t.dims:
        n *= d
    if t.data_type in _PACKED:
        bits = 2 if "INT2" in onnx.TensorProto.DataType.Name(t.data_type) else 4
        return (n * bits + 7) // 8
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # UNDEFINED, a type this onnx does not know
        return None


def _check_model_fields(proto: onnx.ModelProto) -> None:
    """What protobuf's parser lets through and onnx-ir or ONNX Runtime fail on later: text
    fields that are not UTF-8, tensors whose bytes do not match their shape, node inputs no
    node, initializer or graph input defines, a graph without outputs."""
    if not proto.graph.output:
        raise LrcError("the graph declares no outputs")
    defined = set()
    nodes = []

    def walk(g: onnx.GraphProto) -> None:
        for v in (*g.input, *g.output, *g.value_info):
            if not isinstance(v.name, str):
                raise LrcError(f"a value name is not valid UTF-8 ({v.name[:40]!r})")
        defined.update(v.name for v in g.input)
        defined.update(t.name for t in g.initializer)
        defined.update(t.values.name for t in g.sparse_initializer)
        for node in g.node:
            nodes.append(node)
            defined.update(node.output)
            for a in node.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(proto.graph)
    for node in nodes:
        for field in (node.op_type, node.domain, node.name, *node.input, *node.output,
                      *(a.name for a in node.attribute)):
            if not isinstance(field, str):
                raise LrcError(f"a node's name, op type or value name is not valid UTF-8 "
                               f"({field[:40]!r})")
        for x in node.input:
            if x and x not in defined:
                raise LrcError(f"input {x!r} of node {node.name or node.op_type!r} is not "
                               "defined by any node, initializer or graph input")
    for t in all_tensors(proto.graph):
        if not isinstance(t.name, str):
            raise LrcError(f"a tensor name is not valid UTF-8 ({t.name[:40]!r})")
        if any(d < 0 for d in t.dims):
            raise LrcError(f"tensor {t.name!r} has a negative dimension {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data"):
            continue
        need = _data_bytes(t)
        if need is not None and len(t.raw_data) != need:
            raise LrcError(f"tensor {t.name!r} holds {len(t.raw_data)} bytes, its shape "
                           f"{list(t.dims)} needs {need}")


def all_tensors(graph: onnx.GraphProto):
    """Every tensor of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


def external_locations(proto: onnx.ModelProto) -> set[str]:
    """Locations (relative to the model's folder) of the external data files a model uses."""
    out = set()
    for t in all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc:
                out.add(loc)
    return out


# ------------------------------------------------------------------------------------------
# Spilling a single-file model's weights into a data file, one field at a time
# ------------------------------------------------------------------------------------------

SPILL_THRESHOLD = int(float(os.environ.get("LRC_SPILL_MB", 256)) * 1024**2)
SCAN_MIN_BYTES = 1 << 25  # the graph of a larger file is read without its weights


def _scanned(p: Path) -> bool:
    """Is ``p`` large enough to be read without its weights (field by field) when only its
    graph is wanted? Parsing it whole holds its bytes and the parsed message together."""
    return p.stat().st_size > min(SPILL_THRESHOLD, SCAN_MIN_BYTES)
SPILL_DATA = "model.onnx.data"  # the data file's name inside a spill folder
_INLINE = 1024  # tensors of at most this many bytes stay inside the protobuf
_ALIGN = 4096  # data offsets are page-aligned, so runtimes can map them
_CHUNK = 16 * 1024**2
# field numbers of onnx.proto3 (ModelProto.graph, GraphProto.initializer, TensorProto.*)
_MODEL_GRAPH, _GRAPH_INIT, _T_RAW = 7, 5, 9


class _Wire:
    """Reads protobuf wire format from a file without holding more than one field."""

    def __init__(self, f):
        self.f = f
        self.size = os.fstat(f.fileno()).st_size

    def length(self) -> tuple[int, bytes]:
        """A length prefix, refused when it runs past the end of the file (a corrupt file
        would otherwise make ``read(n)`` allocate ``n`` bytes)."""
        n, raw = self.varint()
        if n > self.size - self.tell():
            raise ValueError("a field runs past the end of the file")
        return n, raw

    def tell(self) -> int:
        return self.f.tell()

    def varint(self) -> tuple[int, bytes]:
        value, shift, raw = 0, 0, bytearray()
        while True:
            b = self.f.read(1)
            if not b or shift > 63:
                raise ValueError("truncated or malformed varint")
            raw += b
            value |= (b[0] & 0x7F) << shift
            shift += 7
            if b[0] < 0x80:
                return value, bytes(raw)

    def payload(self, wire_type: int) -> bytes:
        """The bytes of a field's value (with its length prefix for length-delimited fields)."""
        if wire_type == 0:
            return self.varint()[1]
        if wire_type in (1, 5):
            n = 8 if wire_type == 1 else 4
            b = self.f.read(n)
            if len(b) != n:
                raise ValueError("truncated fixed-width field")
            return b
        if wire_type == 2:
            n, raw = self.length()
            b = self.f.read(n)
            if len(b) != n:
                raise ValueError("truncated length-delimited field")
            return raw + b
        raise ValueError(f"unsupported wire type {wire_type}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _scan(src: Path, data=None) -> onnx.ModelProto:
    """The ModelProto of ``src`` without its main-graph initializers' bytes: written to the open
    file ``data`` (page-aligned; the tensors then point at it as ``SPILL_DATA``), or, with
    ``data=None``, skipped (the tensors keep name, type and shape only). Repeated ``graph``
    fields are merged as protobuf merges them (``_write_streaming`` writes such files)."""
    skeleton = bytearray()
    inits: list[onnx.TensorProto] = []
    size = src.stat().st_size
    with open(src, "rb", buffering=1 << 20) as f:
        w = _Wire(f)
        while w.tell() < size:
            tag, tag_raw = w.varint()
            if tag >> 3 == _MODEL_GRAPH and tag & 7 == 2:
                n, _ = w.length()
                end = w.tell() + n
                graph = bytearray()
                while w.tell() < end:
                    gtag, gtag_raw = w.varint()
                    if gtag >> 3 == _GRAPH_INIT and gtag & 7 == 2:
                        tn, _ = w.length()
                        inits.append(_scan_tensor(w, w.tell() + tn, data))
                    else:
                        graph += gtag_raw + w.payload(gtag & 7)
                if w.tell() != end:
                    raise ValueError("graph field overruns its length")
                skeleton += _field(_MODEL_GRAPH, bytes(graph))
            else:
                skeleton += tag_raw + w.payload(tag & 7)
    proto = _parse(onnx.ModelProto, bytes(skeleton))
    proto.graph.initializer.extend(inits)
    return proto


def _parse(cls, data: bytes):
    """``cls.FromString(data)``, protobuf's DecodeError (not a ValueError) as ValueError."""
    from google.protobuf.message import DecodeError

    try:
        return cls.FromString(data)
    except DecodeError as e:
        raise ValueError(f"protobuf parse failed: {e}") from None


def _scan_tensor(w: _Wire, end: int, data) -> onnx.TensorProto:
    """One initializer: its ``raw_data`` copied to ``data`` (or skipped), the rest parsed."""
    rest, raw_at = bytearray(), None
    while w.tell() < end:
        tag, tag_raw = w.varint()
        if tag >> 3 == _T_RAW and tag & 7 == 2:
            n, n_raw = w.length()
            if n <= _INLINE:
                rest += tag_raw + n_raw + w.f.read(n)
                continue
            if data is None:
                w.f.seek(n, os.SEEK_CUR)
                raw_at = (0, n)
                continue
            pad = (-data.tell()) % _ALIGN
            data.write(b"\0" * pad)
            raw_at = (data.tell(), n)
            left = n
            while left:
                chunk = w.f.read(min(left, _CHUNK))
                if not chunk:
                    raise ValueError("truncated raw_data")
                data.write(chunk)
                left -= len(chunk)
        else:
            rest += tag_raw + w.payload(tag & 7)
    if w.tell() != end:
        raise ValueError("initializer overruns its length")
    t = _parse(onnx.TensorProto, bytes(rest))
    if raw_at is not None and data is not None:
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", SPILL_DATA), ("offset", str(raw_at[0])),
                     ("length", str(raw_at[1]))):
            t.external_data.add(key=k, value=v)
    return t


class Spill:
    """A temporary folder holding a single-file model's weights as external data; deleted when
    the last model or session using it lets it go (or at exit)."""

    def __init__(self, src: Path):
        import weakref

        self.src = src
        _sweep_stale()
        self.dir = Path(tempfile.mkdtemp(prefix=f"lrc-weights-{os.getpid()}-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        try:
            with open(self.dir / SPILL_DATA, "wb") as data:
                self.proto = _scan(src, data)
        except BaseException:
            self.remove()
            raise
        self.stamp = _stamp(src)
        # a file that also has external data of its own keeps it beside the source
        self.mixed = any(loc != SPILL_DATA for loc in external_locations(self.proto))

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def __copy__(self):  # a copied model shares the folder (and keeps it alive)
        return self

    def __deepcopy__(self, memo):
        return self

    def remove(self) -> None:
        self._finalizer()


def _sweep_stale() -> None:
    """Remove the spill folders of processes that no longer run (killed before they could
    clean up: ``lrc-weights-PID-*``)."""
    for d in Path(tempfile.gettempdir()).glob("lrc-weights-*-*"):
        try:
            pid = int(d.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _stamp(p: Path) -> tuple:
    st = p.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


_SPILLS: dict[str, object] = {}  # resolved source path -> weakref to its live Spill


def spill(path: str | os.PathLike) -> Spill:
    """The live :class:`Spill` of the single-file model ``path`` (made now, or reused while the
    file is unchanged and a model or session still holds the previous one). Its ``proto`` is a
    fresh copy each call's caller may edit."""
    import weakref

    p = Path(path)
    key = str(p.resolve())
    ref = _SPILLS.get(key)
    sp = ref() if ref is not None else None
    if sp is not None and sp.alive and sp.stamp == _stamp(p):
        return sp
    try:
        sp = Spill(p)
    except OSError as e:
        raise LrcError(f"{p}: could not write its weights to a temporary folder ({e.strerror or e}); "
                       "set TMPDIR to a folder with room for the model")
    _SPILLS[key] = weakref.ref(sp)
    return sp


def external_folder(path: str | os.PathLike) -> Path:
    """Where the external data of the model file ``path`` lies: its folder, or the live spill
    folder of ``path`` when it was spilled (a session built from the spilled protobuf's bytes
    reads its weights there)."""
    p = Path(path)
    ref = _SPILLS.get(str(p.resolve())) if p.exists() else None
    sp = ref() if ref is not None else None
    return sp.dir if sp is not None and sp.alive else p.parent


def _parse_error(p: Path, e: Exception) -> LrcError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return LrcError(f"{p}: not a valid ONNX model (protobuf parse failed: {msg})")


def _validate(proto: onnx.ModelProto, p: Path, base: Path) -> None:
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise LrcError(f"{p}: not an ONNX model (no graph in the protobuf)")
    if proto.ir_version <= 0 or not proto.opset_import:
        raise LrcError(f"{p}: not a valid ONNX model (missing ir_version/opset_import)")
    try:
        _check_model_fields(proto)
    except LrcError as e:
        raise LrcError(f"{p}: not a valid ONNX model ({e})") from None
    _check_external_locations(proto, base)


def load_proto(path: str | os.PathLike, *, weights: bool = False) -> tuple[onnx.ModelProto, Path]:
    """The ModelProto (external data not loaded, locations checked) and its file path: the
    graph, for validating and inspecting a model (names, shapes, inputs, outputs).

    A single-file model above ``SCAN_MIN_BYTES`` (or ``SPILL_THRESHOLD`` when lower) is read
    without the bytes of its main-graph initializers (they keep name, type and shape) instead
    of holding the file's bytes and the parsed message together (a 231 MB float16 output read
    for its inputs and outputs held 460 MB); ``weights=True`` reads them too (the weights in memory are
    :func:`load`'s job: lazily, one at a time)."""
    p = resolve_model_path(path)
    try:
        if not weights and _scanned(p):
            try:
                proto = _scan(p, None)
            except (ValueError, OSError):  # not our format: the full parse says why
                proto = onnx.load_model(str(p), load_external_data=False)
        else:
            proto = onnx.load_model(str(p), load_external_data=False)
    except Exception as e:  # DecodeError, RuntimeWarning-ish errors from protobuf
        raise _parse_error(p, e)
    _validate(proto, p, p.parent)
    return proto, p


def spilled_proto(p: Path) -> tuple[onnx.ModelProto, Spill] | None:
    """A copy of the spilled skeleton of ``p`` and its Spill, or None when ``p`` is not spilled
    (small, already with external data, or not parseable field by field)."""
    if p.stat().st_size <= SPILL_THRESHOLD:
        return None
    try:
        sp = spill(p)
    except LrcError:
        raise
    except (ValueError, OSError):
        return None  # the full parse gives the error
    if sp.mixed:
        return None
    proto = onnx.ModelProto()
    proto.CopyFrom(sp.proto)
    try:
        _validate(proto, p, sp.dir)
    except LrcError as e:  # locations are checked against the source's folder
        raise LrcError(str(e).replace(str(sp.dir), str(p.parent))) from None
    return proto, sp


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (file or folder) into onnx-ir, weights in external data left lazy; a
    single file above ``SPILL_THRESHOLD`` is spilled first, so that its weights are lazy too."""
    p = resolve_model_path(path)
    spilled = spilled_proto(p)
    if spilled is not None:
        proto, sp = spilled
        base = sp.dir
    else:
        proto, p = load_proto(p, weights=True)
        sp, base = None, p.parent
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # "... cannot be found in any scope" on stderr: no
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LrcError(f"{p}: could not read the ONNX graph ({type(e).__name__}: {msg})")
    finally:
        serde_log.setLevel(level)
    del proto
    if not _is_sorted(model.graph):  # ONNX Runtime runs graphs whose nodes are out of order
        try:  # (ONNX Runtime's fp16 converter writes them with keep_io_types=True); the
            model.graph.sort()  # onnx checker, and so lrc's output check, does not
        except Exception as e:
            raise LrcError(f"{p}: the ONNX graph has a cycle or an undefined input ({e})")
    ir.external_data.set_base_dir(model.graph, str(base))
    _read_on_use(model)
    model.meta[SOURCE_META] = str(p)
    model.graph.meta["lrc.store"] = Store()  # new weights of passes go to disk (new_tensor)
    if sp is not None:
        model.meta["lrc.spill"] = sp  # keeps the folder alive as long as the model
    return model


class DiskTensor(ir.ExternalTensor):
    """An external tensor read from its file each time it is used, never kept mapped.

    onnx-ir's ``ExternalTensor`` maps its file and keeps the mapping (and every page read
    through it, resident) for as long as the tensor lives — and a pass's plan keeps the tensors
    of every weight it rewrote alive, so a pass over all the weights ends holding them all.
    Here ``numpy()`` and ``tobytes()`` return a copy and unmap at once: a weight occupies memory
    only while its reader holds the array."""

    __slots__ = ()

    @classmethod
    def of(cls, t: ir.ExternalTensor) -> DiskTensor:
        return cls(t.location, t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                   doc_string=t.doc_string, metadata_props=dict(t.metadata_props),
                   base_dir=t.base_dir)

    def numpy(self) -> np.ndarray:
        if self._array is not None:  # mapped by someone else: keep onnx-ir's behaviour
            return self._array
        self._load()
        try:
            return np.array(self._array, copy=True)
        finally:
            self.release()

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def tobytes(self) -> bytes:
        self._check_validity()
        offset, n = self._offset or 0, self._length or self.nbytes
        if self.raw is not None:  # mapped by someone else
            return bytes(self.raw[offset:offset + n])
        # read, not mapped: a mapping would keep a second copy's pages resident while the
        # bytes are in use (a writer holding a 671 MB embedding's bytes held 1.3 GB)
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(n)
        if len(data) != n:
            raise LrcError(f"tensor {self.name!r}: {self.path} ends before its {n} bytes")
        return data

    def write_to(self, out, chunk: int = 1 << 24) -> int:
        """Copy this tensor's bytes from its file into the open file ``out``, ``chunk`` bytes
        at a time (never the whole tensor in memory); the number of bytes written."""
        self._check_validity()
        offset, n = self._offset or 0, self._length or self.nbytes
        buf = bytearray(min(chunk, max(n, 1)))
        view = memoryview(buf)
        done = 0
        with open(self.path, "rb") as f:
            f.seek(offset)
            while done < n:
                got = f.readinto(view[:min(len(buf), n - done)])
                if not got:
                    raise LrcError(f"tensor {self.name!r}: {self.path} ends before its "
                                   f"{n} bytes")
                out.write(view[:got])
                done += got
        return done


STORE_DATA = "lrc-store.data"  # the data file's name inside a store folder
STORE_MIN_BYTES = 1 << 18  # smaller new tensors stay in memory


class Store:
    """Where the new tensors of a model lrc loaded from a file live until it is written: the
    factors, codes and corrections a pass makes are appended (page-aligned) to one data file in
    a temporary folder and handed back as :class:`DiskTensor` s, read at each use. So a pass
    over every projection of a model holds one unit's arrays at a time, not the new weights of
    the whole model. The folder is made on the first tensor and removed with the model (at the
    latest at exit; a killed run's by the next run, like a spill folder)."""

    def __init__(self):
        self.dir: Path | None = None
        self.size = 0
        self._finalizer = None

    def put(self, arr: np.ndarray, name: str) -> DiskTensor:
        import weakref

        arr = np.ascontiguousarray(arr)
        if self.dir is None:
            _sweep_stale()
            try:
                self.dir = Path(tempfile.mkdtemp(prefix=f"lrc-weights-{os.getpid()}-"))
            except OSError as e:
                raise LrcError(f"could not make a temporary folder for the new weights "
                               f"({e.strerror or e}); set TMPDIR to a folder with room")
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        offset, n = self.size, arr.nbytes
        pad = (-(offset + n)) % _ALIGN
        try:
            with open(self.dir / STORE_DATA, "ab") as f:
                f.write(arr.reshape(-1).view(np.uint8).data if n else b"")
                f.write(b"\0" * pad)
        except OSError as e:
            raise LrcError(f"could not write new weights to {self.dir} ({e.strerror or e}); "
                           "set TMPDIR to a folder with room")
        self.size = offset + n + pad
        return DiskTensor(STORE_DATA, offset, n, ir.DataType.from_numpy(arr.dtype),
                          shape=ir.Shape(arr.shape), name=name, base_dir=str(self.dir))

    def holds(self, t) -> bool:
        """Is ``t`` a tensor of this store?"""
        return (self.dir is not None and isinstance(t, ir.ExternalTensor)
                and Path(t.base_dir) == self.dir)

    def remove(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def new_tensor(graph: ir.Graph, arr: np.ndarray, name: str):
    """A tensor of ``arr`` for a new initializer of ``graph``: kept in the :class:`Store` of a
    model lrc loaded from a file (``load``), when it is not small; in memory otherwise."""
    store = graph.meta.get("lrc.store")
    if isinstance(store, Store) and np.asarray(arr).nbytes >= STORE_MIN_BYTES:
        return store.put(arr, name)
    return ir.tensor(np.ascontiguousarray(arr), name=name)


def is_stored(t) -> bool:
    """Is ``t`` a tensor kept in some model's :class:`Store` (a temporary file no session built
    from the model's own folder can see: inline it when a graph is handed to a runtime)?"""
    return (isinstance(t, ir.ExternalTensor) and t.location == STORE_DATA
            and Path(t.base_dir or ".").name.startswith("lrc-weights-"))


def inline_stored(proto: onnx.ModelProto, model: ir.Model) -> None:
    """Replace, in ``proto`` (serialized from ``model``), the references to ``model``'s stored
    tensors by their bytes."""
    stored = {n: v.const_value for g in model.graphs() for n, v in g.initializers.items()
              if is_stored(v.const_value)}
    if not stored:
        return
    for t in all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name in stored:
            src = stored[t.name]
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            t.raw_data = src.tobytes()


def _read_on_use(model: ir.Model) -> None:
    """Every external initializer (subgraphs too) becomes a :class:`DiskTensor`."""
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor) and not isinstance(t, DiskTensor):
                v.const_value = DiskTensor.of(t)


def spilled(model: ir.Model) -> Spill | None:
    """The :class:`Spill` whose folder holds ``model``'s weights, if it was loaded by spilling."""
    sp = model.meta.get("lrc.spill") if hasattr(model, "meta") else None
    return sp if isinstance(sp, Spill) else None


def _is_sorted(graph: ir.Graph) -> bool:
    """Does every node of the main graph come after the nodes producing its inputs?"""
    seen = set()
    for node in graph:
        for v in node.inputs:
            if v is not None and v.producer() is not None and v.producer() not in seen:
                return False
        seen.add(node)
    return True


def as_model(model_or_path) -> ir.Model:
    if isinstance(model_or_path, ir.Model):
        return model_or_path
    if isinstance(model_or_path, onnx.ModelProto):
        return ir.serde.deserialize_model(model_or_path)
    return load(model_or_path)


def tensor_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None:
            total += t.nbytes
    return total


def external_files(path: str | os.PathLike) -> set[str]:
    """Locations (relative to the model's folder) of the external data files a model file uses
    (read without the bytes of a large single file's weights)."""
    p = Path(path)
    if _scanned(p):
        try:
            return external_locations(_scan(p, None))
        except ValueError:
            pass
    return external_locations(onnx.load_model(str(p), load_external_data=False))


def file_size(path: str | os.PathLike) -> int:
    """Size of an ONNX file plus the external data files it references."""
    p = Path(path)
    total = p.stat().st_size
    try:
        locs = external_files(p)
    except Exception:
        return total
    return total + sum((p.parent / loc).stat().st_size for loc in locs
                       if (p.parent / loc).is_file())


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise LrcError(f"{out} exists; pass {opt('force')} to overwrite")
    if not out.parent.exists():
        raise LrcError(f"output folder {out.parent} does not exist")


@dataclass
class Staged:
    """A model written completely into a temporary folder beside its destination."""

    tmp: Path
    path: Path
    out: Path
    data_name: str | None

    def commit(self, force: bool = False) -> Path:
        """Move the staged files into place (data file first, then the model)."""
        try:
            check_output(self.out, force)
            if self.data_name:
                os.replace(self.tmp / self.data_name, self.out.parent / self.data_name)
            elif (self.out.parent / (self.out.name + ".data")).exists() and force:
                os.remove(self.out.parent / (self.out.name + ".data"))  # stale data we overwrite
            os.replace(self.path, self.out)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _own_external(model: ir.Model) -> bool:
    """Whether the model has weights in external data of its own (not in a spill folder: a
    spilled single file is written back as a single file)."""
    sp = spilled(model)
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and not is_stored(t):
            if sp is None or Path(t.base_dir).resolve() != sp.dir.resolve():
                return True
    return False


def staging_dir(out: Path) -> Path:
    """A new temporary folder beside ``out`` (``.OUT.tmp-PID-*``) to build it in; first removes
    the ones runs that no longer exist left there (a SIGKILL cannot be cleaned up after)."""
    clean_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would become the output folder's mode
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the ``.OUT.tmp-PID-*`` folders and files beside ``out`` whose process is gone;
    those of live processes (another lrc writing the same output) and unnamed ones stay."""
    removed = []
    prefix = f".{out.name}.tmp-"
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        pid = p.name[len(prefix):].split("-", 1)[0] if p.name.startswith(prefix) else ""
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def stage(model: ir.Model, out: str | os.PathLike, *, external_data: bool | None = None,
          force: bool = False) -> Staged:
    """Write ``model`` into a temporary folder beside ``out``; ``commit()`` moves it into place.

    ``external_data``: True forces ``OUT.data`` beside the model, None keeps the source's layout
    (external if it had external data, or if the weights exceed protobuf's 2 GB). Weights are
    written one at a time, and a memory-mapped weight is unmapped once written (it maps again
    if the model is used after)."""
    out = Path(out)
    check_output(out, force)
    if external_data is None:
        external_data = _own_external(model) or tensor_bytes(model) > PROTOBUF_LIMIT
    data_name = out.name + ".data" if external_data else None
    tmp = staging_dir(out)
    try:
        tmp_model = tmp / out.name
        if external_data:
            _save_external(model, tmp_model, data_name)
        else:
            _write_streaming(model, tmp_model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Staged(tmp, tmp_model, out, data_name)


def _save_external(model: ir.Model, path: Path, data_name: str) -> None:
    """``ir.save`` with external data, unmapping each memory-mapped source weight as soon as
    the next one is written (onnx-ir's writer otherwise keeps every page it read resident)."""
    last: list = []
    _inline_attribute_external(model)

    def release(tensor, info) -> None:  # called before each tensor is written
        while last:
            t = last.pop()
            if isinstance(t, ir.ExternalTensor):
                t.release()
        last.append(tensor)

    try:
        ir.save(model, path, external_data=data_name, size_threshold_bytes=1024,
                callback=release, alignment=_ALIGN)  # page-aligned: runtimes map the weights
    finally:
        for t in last:
            if isinstance(t, ir.ExternalTensor):
                t.release()


def save(model: ir.Model, out: str | os.PathLike, *, external_data: bool | None = None,
         force: bool = False, check: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` to ``out`` atomically: staged in a temporary folder, ``check(path)`` run
    on the complete staged file, then renamed into place. Nothing is left behind on failure."""
    staged = stage(model, out, external_data=external_data, force=force)
    try:
        if check is not None:
            check(staged.path)
    except BaseException:
        staged.discard()
        raise
    return staged.commit(force)


def _write_streaming(model: ir.Model, path: Path) -> None:
    """Write a single-file model one initializer at a time.

    Protobuf merges concatenated messages and appends repeated fields, so the bytes of the model
    without its main-graph initializers followed by ``ModelProto(graph=GraphProto(initializer=[t]))``
    for each tensor parse as the complete model — without ever holding a second serialized copy
    of all the weights (``serialize_model`` + ``SerializeToString`` would hold two). Each chunk is
    framed by hand around the tensor's bytes, so one tensor is held once (its ``tobytes``); a
    memory-mapped (external) weight is unmapped after it is written."""
    graph = model.graph
    _inline_subgraph_external(model)
    _inline_attribute_external(model)
    saved = list(graph.initializers.values())
    graph.initializers.clear()
    try:
        skeleton = ir.serde.serialize_model(model)
    finally:
        for v in saved:
            graph.register_initializer(v)
    names = {v.name for v in saved}
    keep = [vi for vi in skeleton.graph.value_info if vi.name not in names]
    del skeleton.graph.value_info[:]
    skeleton.graph.value_info.extend(keep)
    with open(path, "wb") as f:
        f.write(skeleton.SerializeToString())
        del skeleton
        for v in saved:
            _write_initializer(f, v.name, v.const_value)


def _write_initializer(f, name: str, t) -> None:
    """``ModelProto(graph=GraphProto(initializer=[t]))`` in wire format, its raw bytes written
    from the tensor's own buffer."""
    if t.dtype == ir.DataType.STRING or isinstance(t, ir.StringTensor):
        tp = ir.serde.serialize_tensor(t)
        tp.name = name
        f.write(onnx.ModelProto(graph=onnx.GraphProto(initializer=[tp])).SerializeToString())
        return
    # a weight on disk is copied from its file a chunk at a time, never held whole
    streamed = isinstance(t, DiskTensor) and t.raw is None
    raw = None if streamed else t.tobytes()
    n = (t.length or t.nbytes) if streamed else len(raw)
    head = onnx.TensorProto(name=name, data_type=int(t.dtype),
                            dims=[int(d) for d in t.shape]).SerializeToString()
    if t.doc_string:
        head += onnx.TensorProto(doc_string=t.doc_string).SerializeToString()
    tensor_len = len(head) + 1 + len(_varint(n)) + n
    init_field = _varint(_GRAPH_INIT << 3 | 2) + _varint(tensor_len)
    graph_len = len(init_field) + tensor_len
    f.write(_varint(_MODEL_GRAPH << 3 | 2) + _varint(graph_len) + init_field + head
            + _varint(_T_RAW << 3 | 2) + _varint(n))
    if streamed:
        t.write_to(f)
    else:
        f.write(raw)
    del raw
    if isinstance(t, ir.ExternalTensor):
        t.release()


def _inline_subgraph_external(model: ir.Model) -> None:
    """Read the external weights of subgraphs (``If`` branches) into memory: only the main
    graph's initializers are streamed by ``_write_streaming``."""
    for sub in model.graphs():
        if sub is model.graph:
            continue
        for v in sub.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                v.const_value = ir.Tensor(t.numpy().copy(), name=t.name)
                t.release()


def _inline_attribute_external(model: ir.Model) -> int:
    """Read tensors held by node attributes (a ``Constant``'s value, ``ConstantOfShape``'s)
    that live in the input's external data into memory: the writers stream initializers, and an
    attribute left pointing at the input's data file would name a file the output does not
    have (a 0.5B model's output was refused by the checker for it, after an hour of work).
    Returns how many were read."""
    n = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                t = attr.value
                node.attributes[attr.name] = ir.AttrTensor(
                    attr.name, ir.Tensor(t.numpy().copy(), name=t.name))
                t.release()
                n += 1
    return n


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # a plain file's mode, not mkstemp's 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def graph_file(path: str | os.PathLike,
               patch: Callable[[onnx.ModelProto], bool] | None = None) -> Iterator[Path]:
    """``path``, or — a single file above 32 MB (:func:`_scanned`) — its graph written into the
    spill folder of its weights (external data there): what the onnx checker reads without holding
    the weights (protobuf would parse the whole file, and shape inference copy it). ``patch``
    edits the graph in place first (True: it changed something; the edited copy is then what
    is read, written beside the weights it refers to)."""
    p = Path(path)
    sp = None
    if _scanned(p):
        try:
            sp = spill(p)
        except (ValueError, OSError):
            sp = None  # not parseable field by field: the full check says why
    if sp is None or sp.mixed:
        proto = None
        if patch is not None:
            proto = onnx.load_model(str(p), load_external_data=False)
        if proto is None or not patch(proto):
            yield p
            return
        where = p.parent
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(sp.proto)
        if patch is not None:
            patch(proto)
        where = sp.dir
    fd, name = tempfile.mkstemp(prefix=".graph-", suffix=".onnx", dir=where)
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


RUNTIME_DOMAIN = "lrc.runtime-registered"  # where the checker's copy puts a runtime's own ops


def _unknown_onnx_ops(proto: onnx.ModelProto, runtime_ops: set[str]) -> set[str]:
    """Move the nodes of ``runtime_ops`` that onnx has no schema for at the model's opset out
    of the ONNX domain (the checker skips domains it does not know); their names."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    moved = set()

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            if n.domain in ("", "ai.onnx") and n.op_type in runtime_ops:
                try:
                    onnx.defs.get_schema(n.op_type, opset, "")
                except Exception:  # SchemaError: onnx does not know it there
                    n.domain = RUNTIME_DOMAIN
                    moved.add(n.op_type)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(proto.graph)
    if moved and not any(o.domain == RUNTIME_DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=RUNTIME_DOMAIN, version=1)
    return moved


CHECK_LEVELS = ("full", "checker", "none")  # strongest first


def structural_check(path: Path, runtime_ops: set[str] | frozenset = frozenset(),
                     level: str = "full") -> dict:
    """The onnx checker on the file (whether a runtime loads it is
    :func:`lrc.runtime.session.check_loads`): ``level`` "full" with strict shape inference,
    "checker" without it, "none" (nothing: a runtime's load is the check); a large single file
    is checked as its graph with the weights in external data (:func:`graph_file`), the same
    checks without two copies. ``runtime_ops``: operators the runtime that will run the file
    registers in the ONNX domain although onnx has no schema for them (ONNX Runtime's
    ``SimplifiedLayerNormalization``, in the graphs of ONNX Runtime GenAI's model builder):
    the checker checks everything else and leaves those to the runtime's load."""
    if level == "none":
        return {"checker": "skipped"}
    moved: set[str] = set()

    def patch(proto: onnx.ModelProto) -> bool:
        moved.update(_unknown_onnx_ops(proto, set(runtime_ops)))
        return bool(moved)

    try:
        with graph_file(path, patch if runtime_ops else None) as g:
            onnx.checker.check_model(str(g), full_check=level == "full")
    except Exception as e:
        raise LrcError(f"onnx checker rejected the model: {str(e).strip().splitlines()[0]}")
    out = {"checker": "ok", "shape_inference": "ok" if level == "full" else "skipped"}
    if moved:
        out["runtime_ops"] = (f"{', '.join(sorted(moved))}: the runtime's own, in the ONNX "
                              f"domain; checked by loading the file in it")
    return out


def check_level(path: Path, runtime_ops: set[str] | frozenset = frozenset()) -> tuple[str, str]:
    """``(level, why)``: the strongest :data:`CHECK_LEVELS` the input file itself passes, so an
    output is held to what its input can meet (a model builder's graph fails strict shape
    inference on its own: lrc's rewrite is not to blame), with the input's failure as the
    reason ("" at full)."""
    why = ""
    for level in CHECK_LEVELS[:-1]:
        try:
            structural_check(path, runtime_ops, level)
            return level, why
        except LrcError as e:
            why = why or str(e).replace("onnx checker rejected the model: ", "")
    return "none", why
