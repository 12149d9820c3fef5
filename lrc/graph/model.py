"""Load and save ONNX models safely.

* ``load`` accepts a ``.onnx`` file or an exported folder (``DIR/model.onnx``), refuses
  anything that is not a readable ONNX protobuf with one clear line, and refuses external-data
  locations that are absolute, contain ``..`` or resolve (through symlinks) outside the model's
  folder — a known attack on ONNX loaders that would read arbitrary files. Weights in external
  data stay on disk until used (onnx-ir lazy tensors).
* ``save`` writes atomically: everything goes to a temporary folder beside the output, is
  checked there, and is renamed into place only when complete. Models over 2 GB (protobuf's limit)
  or on request are written with external data (``OUT.onnx.data``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir

from lrc.errors import LrcError

PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # stay clear of the 2 GiB protobuf limit
ONNX_NAMES = ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx")


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
        bad = (not loc or os.path.isabs(loc) or loc.startswith(("/", "\\"))
               or ".." in Path(loc).parts or ":" in loc)
        target = (base / loc).resolve() if not bad else None
        if target is not None and base_real not in target.parents:
            bad = True
        if bad:
            raise LrcError(f"refusing external data location {loc!r} of tensor {tensor.name!r}: "
                           "it points outside the model's folder")
        if not target.is_file():
            raise LrcError(f"external data file {loc!r} of tensor {tensor.name!r} is missing")
        size = target.stat().st_size
        off, length = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)
        if off < 0 or length < 0 or off + length > size:
            raise LrcError(f"external data of tensor {tensor.name!r} lies past the end of "
                           f"{loc!r} (truncated file?)")


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


def load_proto(path: str | os.PathLike) -> tuple[onnx.ModelProto, Path]:
    """The ModelProto (external data not loaded, locations checked) and its file path."""
    p = resolve_model_path(path)
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except Exception as e:  # DecodeError, RuntimeWarning-ish errors from protobuf
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LrcError(f"{p}: not a valid ONNX model (protobuf parse failed: {msg})")
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise LrcError(f"{p}: not an ONNX model (no graph in the protobuf)")
    if proto.ir_version <= 0 or not proto.opset_import:
        raise LrcError(f"{p}: not a valid ONNX model (missing ir_version/opset_import)")
    _check_external_locations(proto, p.parent)
    return proto, p


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (file or folder) into onnx-ir, weights in external data left lazy."""
    proto, p = load_proto(path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise LrcError(f"{p}: could not read the ONNX graph ({type(e).__name__}: {e})")
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    model.meta["lrc.source_path"] = str(p)
    return model


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
    """Locations (relative to the model's folder) of the external data files a model file uses."""
    return external_locations(onnx.load_model(str(path), load_external_data=False))


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
        raise LrcError(f"{out} exists; pass --force to overwrite")
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


def stage(model: ir.Model, out: str | os.PathLike, *, external_data: bool | None = None,
          force: bool = False) -> Staged:
    """Write ``model`` into a temporary folder beside ``out``; ``commit()`` moves it into place.

    ``external_data``: True forces ``OUT.data`` beside the model, None keeps the source's layout
    (external if it had external data, or if the weights exceed protobuf's 2 GB)."""
    out = Path(out)
    check_output(out, force)
    has_external = any(isinstance(v.const_value, ir.ExternalTensor)
                       for v in model.graph.initializers.values())
    if external_data is None:
        external_data = has_external or tensor_bytes(model) > PROTOBUF_LIMIT
    data_name = out.name + ".data" if external_data else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp_model = tmp / out.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
        else:
            if has_external:  # read the source's external tensors in before writing one file
                ir.external_data.load_to_model(model)
            _write_streaming(model, tmp_model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Staged(tmp, tmp_model, out, data_name)


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
    of all the weights (``serialize_model`` + ``SerializeToString`` would hold two)."""
    graph = model.graph
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
            tp = ir.serde.serialize_tensor(v.const_value)
            tp.name = v.name
            chunk = onnx.ModelProto(graph=onnx.GraphProto(initializer=[tp]))
            f.write(chunk.SerializeToString())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def structural_check(path: Path) -> dict:
    """Full onnx checker and strict shape inference (whether a runtime loads the file is
    :func:`lrc.runtime.session.check_loads`)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise LrcError(f"onnx checker rejected the model: {str(e).strip().splitlines()[0]}")
    return {"checker": "ok", "shape_inference": "ok"}
