"""Activation statistics for data-aware low-rank factorisation.

A projection ``Y = X·W`` (W constant, [in, out]) is replaced by ``(X·A)·B``. Plain SVD of W
minimises ``||W - A B||``; what matters is the error on real inputs, ``||X W - X A B||``, so the
data-aware variants need statistics of X, the input of each target MatMul, over calibration text:

* **SVD-LLM (whitening)** needs the Gram matrix ``G = sum_t x_t x_t^T = X^T X`` ([in, in],
  float64). With ``S = chol(G)``, ``||X (W - A B)||_F = ||S^T (W - A B)||_F``, so truncating the
  SVD of ``S^T W`` is the best rank-k fit on the calibration inputs. Q/K/V (and gate/up) read the
  same X, so one G serves them all: tensors are deduplicated here.
* **ASVD** scales input channels by ``s_j = mean_t |x_tj| ** alpha`` before the SVD: it needs
  ``abs_mean`` (mean |x| per channel). ``sq_mean`` (mean x^2 = diag(G)/n) is kept as well.

How: the model (a file, or one in memory: compress may hold a model no file has) is taken as
protobuf without its weights (external data stays on disk), the
requested intermediate tensors become graph outputs, nodes that do not lead to them are pruned
(e.g. the lm_head and the KV-cache outputs of a decoder), and ONNX Runtime runs that graph once
per batch. Each X is reshaped to [rows, d]; rows whose attention mask is 0 are dropped (when the
mask can be mapped onto X's leading dimensions); ``X^T X`` is accumulated in float64 in one
streaming pass. That holds (number of distinct inputs) x d^2 x 8 bytes (SmolLM2-135M: 120
distinct inputs, 805 MB) and the model in ONNX Runtime, so the methods ask for statistics in
slices (:class:`SlicedStats`, at most ``GRAM_BUDGET`` of Grams each, in the order they are read)
gathered by walking the graph segment by segment
(:class:`lrc.calibration.sequential.SegmentStats`: one segment's weights at a time); this
one-session collector is what a slice falls back to when the graph cannot be cut.
The per-batch products X^T X (not the ORT forward pass) dominate the time; they run in a small
ORT graph, in float64 by default (``precision="float32"``: faster, ~1e-6 relative per batch).

``cached_stats`` wraps tokenisation (:mod:`lrc.calibration.tokens`) + collection and stores the
result under a key made of the model bytes (and its external-data files), the tensor names, the texts, the tokenizer,
``n_tokens``, ``seq_len``, the BOS convention and the precision (folder: ``cache_dir``, else
``$LRC_CACHE_DIR/calib``, else ``~/.cache/lrc/calib``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lrc.calibration.tokens import token_batches, tokenizer_path
from lrc.errors import LrcError
from lrc.graph.expose import expose
from lrc.graph.model import external_files, external_locations
from lrc.modelref import ModelRef, resolve
from lrc.runtime.feeds import text_feeds
from lrc.runtime.session import open_session

log = logging.getLogger(__name__)

__all__ = [
    "ActStats",
    "GRAM_BUDGET",
    "Gram",
    "SlicedStats",
    "cache_dir_default",
    "cached_stats",
    "collect_stats",
    "load_stats",
    "model_fingerprint",
    "row_mask",
    "save_stats",
    "slices",
    "stats_cache_key",
]

CACHE_VERSION = 1  # bump when what is collected (or how) changes: old cache files then miss

# --------------------------------------------------------------------------------------------
# Statistics container
# --------------------------------------------------------------------------------------------


@dataclass
class ActStats:
    """Statistics of one MatMul input tensor X, seen as ``n`` rows of ``d`` channels.

    xtx: float64 [d, d], sum over rows of x^T x (the SVD-LLM Gram matrix, not divided by n).
    abs_mean: float64 [d], mean |x| per channel (ASVD). sq_mean: float64 [d], mean x^2.
    """

    name: str
    xtx: np.ndarray
    abs_mean: np.ndarray
    sq_mean: np.ndarray
    n: int

    @property
    def d(self) -> int:
        return int(self.xtx.shape[0])

    def merged(self, other: ActStats) -> ActStats:
        """Statistics over the rows of both (e.g. two calibration sets)."""
        if other.d != self.d:
            raise LrcError(f"cannot merge statistics of width {self.d} and {other.d}")
        n = self.n + other.n
        return ActStats(
            name=self.name,
            xtx=self.xtx + other.xtx,
            abs_mean=(self.abs_mean * self.n + other.abs_mean * other.n) / n,
            sq_mean=(self.sq_mean * self.n + other.sq_mean * other.n) / n,
            n=n,
        )

    def save(self, path: str | os.PathLike) -> None:
        np.savez(
            path,
            name=np.array(self.name),
            xtx=self.xtx,
            abs_mean=self.abs_mean,
            sq_mean=self.sq_mean,
            n=np.array(self.n, dtype=np.int64),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                name=str(z["name"]),
                xtx=z["xtx"],
                abs_mean=z["abs_mean"],
                sq_mean=z["sq_mean"],
                n=int(z["n"]),
            )


def save_stats(stats: dict[str, ActStats], path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write several ActStats (and optional JSON metadata) to one .npz file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    names = list(stats)
    for i, name in enumerate(names):
        s = stats[name]
        arrays[f"xtx_{i}"] = s.xtx
        arrays[f"abs_mean_{i}"] = s.abs_mean
        arrays[f"sq_mean_{i}"] = s.sq_mean
    arrays["n"] = np.array([stats[k].n for k in names], dtype=np.int64)
    arrays["names"] = np.array(json.dumps(names))
    arrays["meta"] = np.array(json.dumps(meta or {}))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_stats(path: str | os.PathLike) -> dict[str, ActStats]:
    """Read what ``save_stats`` wrote."""
    with np.load(path, allow_pickle=False) as z:
        names = json.loads(str(z["names"]))
        ns = z["n"]
        return {
            name: ActStats(
                name=name,
                xtx=z[f"xtx_{i}"],
                abs_mean=z[f"abs_mean_{i}"],
                sq_mean=z[f"sq_mean_{i}"],
                n=int(ns[i]),
            )
            for i, name in enumerate(names)
        }


class Gram:
    """X^T X for [n, d] row blocks, returned as float64 [d, d].

    ``precision="float64"`` forms the product in float64 (exact to rounding); ``"float32"`` in
    float32 (about twice as fast, ~1e-6 relative error per block). The product runs in a tiny
    ONNX Runtime graph (Cast -> Transpose -> MatMul), which measured 1.5x faster than numpy's
    BLAS in float64 on the 2-core CI machine and shares ORT's thread pool settings; numpy is the
    fallback.
    """

    def __init__(self, precision: str = "float64", threads: int | None = None, engine: str = "ort"):
        if precision not in ("float64", "float32"):
            raise LrcError(f"precision must be 'float64' or 'float32', not {precision!r}")
        self.precision = precision
        self.threads = threads
        self.engine = engine
        self._sessions: dict[str, object] = {}

    def _ort(self, dtype: np.dtype):
        key = dtype.name
        if key not in self._sessions:
            from onnx import TensorProto, helper

            elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
            want = TensorProto.DOUBLE if self.precision == "float64" else TensorProto.FLOAT
            nodes, src = [], "X"
            if elem != want:
                nodes.append(helper.make_node("Cast", ["X"], ["Xc"], to=want))
                src = "Xc"
            nodes.append(helper.make_node("Transpose", [src], ["Xt"], perm=[1, 0]))
            prod = "G" if want == TensorProto.DOUBLE else "G32"
            nodes.append(helper.make_node("MatMul", ["Xt", src], [prod]))
            if prod != "G":
                nodes.append(helper.make_node("Cast", [prod], ["G"], to=TensorProto.DOUBLE))
            graph = helper.make_graph(
                nodes,
                "gram",
                [helper.make_tensor_value_info("X", elem, ["n", "d"])],
                [helper.make_tensor_value_info("G", TensorProto.DOUBLE, ["d", "d"])],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            self._sessions[key] = open_session(model.SerializeToString(), threads=self.threads)
        return self._sessions[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        x = np.ascontiguousarray(x)
        if self.engine == "ort":
            try:
                return self._ort(x.dtype).run(None, {"X": x})[0]
            except Exception as e:  # any ORT problem: numpy gives the same numbers
                log.debug("ORT Gram product failed (%s); using numpy", e)
                self.engine = "numpy"
        x = x.astype(np.dtype(self.precision), copy=False)
        # A contiguous transposed copy measured faster than the strided view.
        return (np.ascontiguousarray(x.T) @ x).astype(np.float64, copy=False)


class _Accumulator:
    """Streaming sums for one tensor, kept in float64."""

    __slots__ = ("name", "xtx", "abs_sum", "sq_sum", "n", "gram")

    def __init__(self, name: str, gram: Gram | None = None):
        self.name = name
        self.gram = gram or Gram()
        self.xtx: np.ndarray | None = None
        self.abs_sum: np.ndarray | None = None
        self.sq_sum: np.ndarray | None = None
        self.n = 0

    def add(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        d = rows.shape[1]
        if self.xtx is None:
            self.xtx = np.zeros((d, d), dtype=np.float64)
            self.abs_sum = np.zeros(d, dtype=np.float64)
            self.sq_sum = np.zeros(d, dtype=np.float64)
        elif self.xtx.shape[0] != d:
            raise LrcError(f"tensor {self.name!r} changed width between batches ({self.xtx.shape[0]} -> {d})")
        self.xtx += self.gram(rows)
        self.abs_sum += np.abs(rows).sum(axis=0, dtype=np.float64)
        self.sq_sum += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        self.n += rows.shape[0]

    def result(self) -> ActStats:
        if self.xtx is None:
            raise LrcError(f"no rows seen for tensor {self.name!r} (empty batches, or every row masked)")
        return ActStats(
            name=self.name,
            xtx=self.xtx,
            abs_mean=self.abs_sum / self.n,
            sq_mean=self.sq_sum / self.n,
            n=self.n,
        )


def row_mask(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """A boolean [rows] selector for X reshaped to [-1, d], or None (keep every row): the rows
    of tokens whose attention mask is 0 are dropped, when the mask ([batch, length]) can be
    mapped onto X's leading dimensions."""
    if mask is None or mask.ndim != 2 or x.ndim < 2:
        return None
    m = mask != 0
    if m.all():
        return None
    b, length = m.shape
    if x.ndim == 3 and x.shape[0] == b and x.shape[1] <= length:
        return m[:, length - x.shape[1]:].reshape(-1)  # current tokens are the last ones
    if x.ndim == 2 and x.shape[0] == b * length:
        return m.reshape(-1)
    return None  # cannot map (e.g. per-head layouts): keep everything


# --------------------------------------------------------------------------------------------
# Slices: statistics of many inputs in bounded memory
# --------------------------------------------------------------------------------------------

GRAM_BUDGET = 64 * 1024**2  # float64 Gram bytes held at once (LRC_GRAM_MB overrides)


def gram_budget() -> int:
    env = os.environ.get("LRC_GRAM_MB")
    try:
        return int(float(env) * 1024**2) if env else GRAM_BUDGET
    except ValueError:
        raise LrcError(f"LRC_GRAM_MB must be a number of megabytes, not {env!r}") from None


def slices(names: Sequence[str], widths: dict[str, int], budget: int) -> list[list[str]]:
    """``names`` (in the order they will be used) cut into consecutive runs whose float64
    Grams (``d² x 8`` bytes each) fit ``budget``; a run holds one name at least."""
    out: list[list[str]] = []
    used = 0
    for n in dict.fromkeys(names):
        size = widths.get(n, 0) ** 2 * 8
        if not out or used + size > budget:
            out.append([])
            used = 0
        out[-1].append(n)
        used += size
    return out


class SlicedStats(Mapping):
    """``{name: ActStats}`` computed a slice at a time: asking for a name of another slice
    drops the statistics held and computes (or loads from the cache) that slice's —
    ``compute(names)`` is one ONNX Runtime pass over the calibration data, pruned after the
    slice's last input. Read in the order of ``slices`` (graph order), every slice is computed
    once and memory holds one slice's Grams: SmolLM2's 805 MB of float64 Grams become 14
    slices of at most ``GRAM_BUDGET`` each (gathered by segments, the graph is walked once). ``passes`` counts the computations."""

    def __init__(self, compute: Callable[[list[str]], dict], parts: list[list[str]]):
        self._compute = compute
        self._parts = parts
        self._where = {n: i for i, p in enumerate(parts) for n in p}
        self._cur = -1
        self._held: dict = {}
        self.passes = 0

    def __getitem__(self, name: str) -> ActStats:
        i = self._where[name]  # KeyError: not calibrated (the caller's .get gives None)
        if i != self._cur:
            self._held, self._cur = {}, -1  # release before computing the next
            from lrc.sysmem import trim

            trim()
            try:
                self._held = self._compute(self._parts[i])
            except KeyError as e:  # not "no statistics" (Mapping.get would hide it): a bug
                raise LrcError(f"calibration slice {i} failed: missing {e}") from e
            self._cur = i
            self.passes += 1
            if self.passes > len(self._parts):
                log.info("calibration slice %d computed again (statistics read out of order)", i)
        return self._held[name]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def release(self) -> None:
        self._held, self._cur = {}, -1


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------

# What collect_stats / cached_stats take as a model: a ModelRef, a file, or one in memory
# (serialized bytes too: cached_stats serializes an in-memory model once).
ModelSource = ModelRef | str | os.PathLike | onnx.ModelProto | ir.Model | bytes


def _source(model, path) -> tuple[object, ModelRef | None]:
    """``(what ONNX Runtime runs: a file or a model in memory, its reference)``: the model
    resolved once (:func:`lrc.modelref.resolve`; ``path`` is an in-memory model's origin);
    serialized bytes keep their bytes, with the reference of ``path`` when given."""
    if isinstance(model, (bytes, bytearray, onnx.ModelProto)):  # run (and hashed) as they are
        data = bytes(model) if isinstance(model, (bytes, bytearray)) else model
        return data, (resolve(path) if path is not None else None)
    ref = resolve(model, origin=path)
    if ref.in_memory:
        return ref.model, ref
    if not ref.file.is_file():
        raise LrcError(f"model file not found: {ref.file}")
    return ref.file, ref


def _in_memory(model) -> bool:
    return isinstance(model, (onnx.ModelProto, ir.Model, bytes, bytearray))


def _origin(ref: ModelRef | None) -> Path | None:
    """The file beside which external data and configs are found."""
    return ref.file if ref is not None else None


def _serialized(model) -> bytes:
    """The bytes of an in-memory model (external data stays referenced, not inlined)."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, ir.Model):
        from lrc.graph.model import inline_stored

        proto = ir.serde.serialize_model(model)
        inline_stored(proto, model)  # new weights a pass kept in a temporary file
        return proto.SerializeToString()
    return model.SerializeToString()


def _graph_proto(model, path: Path | None) -> tuple[onnx.ModelProto, object]:
    """A ModelProto of ``model`` that ``expose`` may edit, weights left out of it where they can
    be: a file's initializers stay in its external data, or — a large single file — are spilled
    to a temporary folder once (:func:`lrc.graph.model.spill`) instead of being parsed with the
    graph and copied again into the session's bytes. Returns ``(proto, what keeps the spill
    folder alive)``."""
    from lrc.graph import model as M

    if _in_memory(model):
        return onnx.ModelProto.FromString(_serialized(model)), None  # a copy: expose edits it
    spilled = M.spilled_proto(Path(path))
    if spilled is not None:
        return spilled
    return onnx.load(str(path), load_external_data=False), None


def collect_stats(
    model: ModelSource,
    tensor_names: Sequence[str],
    batches: Iterable[dict[str, np.ndarray] | np.ndarray],
    threads: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    *,
    mask_name: str = "attention_mask",
    prune: bool = True,
    precision: str = "float64",
    path: str | os.PathLike | None = None,
) -> dict[str, ActStats]:
    """Run the model on ``batches`` and return ActStats for each distinct name in ``tensor_names``.

    ``model``: a .onnx file, or an in-memory model (``onnx.ModelProto``, ``onnx_ir.Model`` or
    serialized bytes; not modified) whose external data and config.json are found beside
    ``path`` (default: the file an ``onnx_ir.Model`` was loaded from).
    A batch is either a feeds dict for the model, or an int array of token ids ([S] or [B, S]),
    from which feeds are built (``lrc.runtime.feeds.text_feeds``: attention mask, positions,
    empty KV cache). One ONNX Runtime run per batch exposes all requested tensors at once.
    ``progress(done, total)`` is called after each batch (total is None for a plain iterator).
    ``prune`` drops nodes that do not lead to the requested tensors (the original outputs are
    not computed). ``precision="float32"`` forms each batch's X^T X in float32 (see ``Gram``);
    the sums over batches are float64 either way.
    """
    model, ref = _source(model, path)
    path = _origin(ref)
    names = list(dict.fromkeys(tensor_names))  # Q/K/V share one input: deduplicate, keep order
    if not names:
        return {}
    gram = Gram(precision, threads)
    accs = {t: _Accumulator(t, gram) for t in names}
    proto, _keep = _graph_proto(model, path)  # _keep: the spill folder, alive until the end
    fetch = expose(proto, names, prune=prune)
    # The model goes to ONNX Runtime as bytes; its external data (left on disk, never loaded
    # into the proto) is found beside ``path``, or in the folder its weights were spilled to.
    data = proto.SerializeToString()
    del proto
    sess = open_session(data, threads=threads, inter_op=1 if threads else None,
                        optimization="all", path=path, arena=False, ref=ref,
                        what=" for calibration") if fetch else None
    del data
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            feeds = batch
        else:
            if sess is None:
                raise LrcError("token-id batches need a model to build feeds; pass feeds dicts")
            feeds = text_feeds(sess, np.asarray(batch))
        try:
            outs = sess.run(fetch, feeds) if fetch else []
        except Exception as e:
            raise LrcError(f"calibration batch {i} failed in onnxruntime: {str(e).splitlines()[0]}") from e
        values = dict(zip(fetch, outs))
        mask = feeds.get(mask_name)
        mask = np.asarray(mask) if mask is not None else None
        for t in names:
            x = values[t] if t in values else np.asarray(feeds[t])
            if x.ndim == 0:
                raise LrcError(f"tensor {t!r} is a scalar")
            sel = row_mask(x, mask)
            rows = x.reshape(-1, x.shape[-1])
            if sel is not None:
                rows = rows[sel]
            accs[t].add(rows)
        del outs, values
        if progress is not None:
            progress(i + 1, total)
    return {t: a.result() for t, a in accs.items()}


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


_EXTERNAL: dict[tuple[str, int, int], list[Path]] = {}


def _external_files(model_path: Path) -> list[Path]:
    st = model_path.stat()
    key = (str(model_path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _EXTERNAL:  # the graph read without the weights of a large single file
        locs = external_files(model_path)
        _EXTERNAL[key] = [model_path.resolve().parent / loc for loc in sorted(locs)]
    return _EXTERNAL[key]


def _scan_external(model: onnx.ModelProto, model_path: Path | None) -> list[Path]:
    locs = external_locations(model)
    if locs and model_path is None:
        raise LrcError("an in-memory model with external data needs path= (the file it came "
                       "from) to find that data")
    base = model_path.resolve().parent if locs else Path()
    return [base / loc for loc in sorted(locs)]


def model_fingerprint(model: ModelSource, *, path: str | os.PathLike | None = None) -> str:
    """sha256 over the model file and its external-data files (read in 4 MB chunks). An
    in-memory model is hashed as its serialized bytes (the same fingerprint as a file holding
    those bytes), its external data found beside ``path`` (or the file it came from)."""
    model, ref = _source(model, path)
    if _in_memory(model):
        data = _serialized(model)
        h = hashlib.sha256(hashlib.sha256(data).hexdigest().encode())
        files = _scan_external(onnx.ModelProto.FromString(data), _origin(ref))
    else:
        h = hashlib.sha256(_file_sha256(model).encode())
        files = _external_files(model)
    for f in files:
        if not f.is_file():
            raise LrcError(f"external data file missing: {f}")
        h.update(f.name.encode() + b"\0" + _file_sha256(f).encode())
    return h.hexdigest()


def _texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_dir_default() -> Path:
    env = os.environ.get("LRC_CACHE_DIR")
    return Path(env).expanduser() / "calib" if env else Path.home() / ".cache" / "lrc" / "calib"


def stats_cache_key(
    model: ModelSource,
    tensor_names: Sequence[str],
    texts: Sequence[str],
    n_tokens: int,
    seq_len: int,
    tokenizer: str | os.PathLike | None = None,
    bos: bool | str = True,
    precision: str = "float64",
    *,
    path: str | os.PathLike | None = None,
) -> str:
    """The hex key ``cached_stats`` files its result under (``model`` and ``path`` as for
    ``collect_stats``; the tokenizer defaults to tokenizer.json beside the model's file)."""
    model, ref = _source(model, path)
    tok = tokenizer_path(ref, tokenizer)
    parts = {
        "version": CACHE_VERSION,
        "model": model_fingerprint(model, path=path),
        "tensors": sorted(set(tensor_names)),
        "texts": _texts_sha256(texts),
        "tokenizer": _file_sha256(tok),
        "n_tokens": int(n_tokens),
        "seq_len": int(seq_len),
        "bos": bos,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def cached_stats(
    model: ModelSource,
    tensor_names: Sequence[str],
    texts: Sequence[str],
    n_tokens: int = 16384,
    seq_len: int = 256,
    cache_dir: str | os.PathLike | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    bos: bool | str = True,
    threads: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    precision: str = "float64",
    path: str | os.PathLike | None = None,
    collector: Callable | None = None,
) -> dict[str, ActStats]:
    """``token_batches`` + ``collect_stats`` (or ``collector(names, batches)``: the same
    statistics gathered another way, e.g. :class:`lrc.calibration.sequential.SegmentStats`),
    cached on disk.

    ``model`` and ``path`` as for ``collect_stats`` (an in-memory model is serialized once: its
    bytes are both hashed for the key and run). ``tokenizer`` defaults to tokenizer.json beside
    the model's file (an in-memory model without ``path`` needs it). The cache file is
    ``<cache_dir>/<key>.npz`` (key: see ``stats_cache_key``); a second call with the same
    arguments loads it instead of running the model.
    """
    model, ref = _source(model, path)
    path = _origin(ref)
    if _in_memory(model):
        model = _serialized(model)
    names = list(dict.fromkeys(tensor_names))
    tok = tokenizer_path(ref, tokenizer)
    key = stats_cache_key(model, names, texts, n_tokens, seq_len, tok, bos, precision, path=path)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_default()
    cache = folder / f"{key}.npz"
    if cache.is_file():
        try:
            stats = load_stats(cache)
        except (OSError, ValueError, KeyError) as e:
            log.warning("unreadable calibration cache %s (%s): recomputing", cache, e)
        else:
            if set(names) <= set(stats):
                log.info("calibration statistics from cache %s", cache)
                return {t: stats[t] for t in names}
    t0 = time.perf_counter()
    batches = token_batches(tok, texts, n_tokens=n_tokens, seq_len=seq_len, bos=bos)
    if collector is not None:
        stats = collector(names, batches)
    else:
        stats = collect_stats(model, names, batches, threads=threads, progress=progress,
                              precision=precision, path=path)
    source = model if not _in_memory(model) else path
    meta = {
        "model": str(Path(source).resolve()) if source is not None else "in memory",
        "n_tokens": int(sum(b.size for b in batches)),
        "seq_len": seq_len,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    try:
        save_stats(stats, cache, meta)
    except OSError as e:
        log.warning("could not write calibration cache %s: %s", cache, e)
    return stats
