"""Weight quantisation and its low-rank correction — numpy only, nothing here knows about ONNX.

Block-wise weight-only quantisation (what ONNX Runtime's ``MatMulNBits`` executes)
----------------------------------------------------------------------------------
``W [K, N]`` (``Y = X·W``) is cut along ``K`` into blocks of ``block_size`` rows per column;
each block gets one scale. Symmetric round-to-nearest, the convention of ONNX Runtime's own
quantiser (``MlasQuantizeBlockwise``, used by ``MatMulNBitsQuantizer``): the block's value of
largest magnitude ``m`` (sign kept) maps to the lowest code, ``scale = m / -2^(bits-1)``,
``q = clamp(round(w / scale) + 2^(bits-1), 0, 2^bits - 1)`` (round half away from zero), and
``deq(q) = (q - 2^(bits-1)) · scale``. Codes are packed as ``MatMulNBits`` reads them:
``[N, K/block, block·bits/8]`` uint8, low nibble first for 4 bits.

Per-column int8 (what ``DynamicQuantizeMatMul`` executes) is :func:`quantize_columns`.

Whitened low-rank correction of the quantisation error
------------------------------------------------------
``E = W - deq(Q(W))``. With ``G = XᵀX = S Sᵀ`` from calibration activations, the rank-``r``
``A·B`` minimising ``‖X·E - X·A·B‖_F`` is the truncated SVD of ``Sᵀ E`` mapped back by ``S⁻ᵀ``
(QERA, ICLR 2025; the same math as SVD-LLM applied to ``E`` instead of ``W``):
:func:`lrc.factorize.whiten_factor` on ``E``. Each dropped ``σ_i`` of ``SᵀE`` adds exactly ``σ_i²``
to the output error, so the whitened error left after the correction is the sum of the
dropped ``σ²`` (:func:`whitened_error`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lrc.factorize import Factors, cholesky_damped, solve_lower_t

COLUMNS = 4096  # wide matrices (an lm_head: 49152) are processed this many columns at a time

__all__ = ["AWQ_GRID", "BASE_QUANTIZERS", "BaseQuantizer", "BlockQuant", "COLUMNS", "awq_scales", "columns",
           "correction_factors", "whitened_spectrum", "dequantize", "quantize_blockwise",
           "quantize_columns", "whitened_error", "whitened_norm2", "valid_block_size"]


def valid_block_size(block_size: int) -> bool:
    """``MatMulNBits`` accepts a power of two >= 16."""
    return block_size >= 16 and not block_size & (block_size - 1)


@dataclass
class BlockQuant:
    """A ``[K, N]`` weight quantised block-wise: ``packed [N, K/block, block·bits/8]`` uint8,
    ``scales [N, K/block]`` float32 (symmetric: no zero points, the midpoint is implied)."""

    packed: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int
    k: int
    n: int

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales.nbytes)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    # = sign(x)·floor(|x| + 0.5), the same float sums, two passes instead of four
    return np.trunc(x + np.copysign(np.asarray(0.5, x.dtype), x))


def _codes(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpacked codes ``[N, blocks, block]`` (int32, 0..2^bits-1) and scales ``[N, blocks]``."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    pad = blocks * block_size - k
    wt = np.pad(w, ((0, pad), (0, 0))).T.reshape(n, blocks, block_size)
    mid = 1 << (bits - 1)
    hi, lo = wt.max(axis=2), wt.min(axis=2)
    m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    scale = (m / np.float32(-mid)).astype(np.float32)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    q = _round_half_away(wt * inv[..., None]).astype(np.int32) + mid
    return np.clip(q, 0, (1 << bits) - 1), scale


def quantize_blockwise(w: np.ndarray, bits: int = 4, block_size: int = 32) -> BlockQuant:
    """Symmetric block-wise quantisation of ``w [K, N]`` in ``MatMulNBits``' layout."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if not valid_block_size(block_size):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    k, n = np.shape(w)
    if n > COLUMNS:  # columns are independent: a block of them at a time (a head's
        # temporaries would otherwise be ten float copies of it)
        parts = [quantize_blockwise(w[:, j:j + COLUMNS], bits, block_size)
                 for j in range(0, n, COLUMNS)]
        return BlockQuant(np.concatenate([p.packed for p in parts]),
                          np.concatenate([p.scales for p in parts]), bits, block_size, k, n)
    q, scale = _codes(w, bits, block_size)
    return _pack(q, scale, bits, block_size, k, n)


def _pack(q: np.ndarray, scale: np.ndarray, bits: int, block_size: int, k: int,
          n: int) -> BlockQuant:
    """Unpacked codes ``[N, blocks, block]`` (0..2^bits-1) in ``MatMulNBits``' packing."""
    if bits == 4:
        q = q.reshape(n, q.shape[1], block_size // 2, 2)
        packed = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)
    else:
        packed = q.astype(np.uint8)
    return BlockQuant(packed, np.ascontiguousarray(scale, dtype=np.float32), bits, block_size,
                      k, n)


@dataclass(frozen=True)
class BaseQuantizer:
    """How the block-wise codes of a weight are chosen — what the low-rank correction then
    corrects. ``quantize(w [K, N] float32, bits, block_size, gram)`` returns the
    :class:`BlockQuant` (``dequantize`` reads any of them: symmetric codes, one scale per
    block); ``gram`` is the input's ``XᵀX`` ([K, K], float64, from the calibration the
    correction uses) when ``needs_gram``, else None. A new base quantiser (data-aware scaling,
    scale search against the whitened error, error-feedback rounding) is one entry in
    :data:`BASE_QUANTIZERS` and its test; the ``base_quant`` option lists the registry."""

    name: str
    help: str
    quantize: Callable[..., BlockQuant]
    needs_gram: bool = False


def _rtn(w: np.ndarray, bits: int, block_size: int, gram=None) -> BlockQuant:
    return quantize_blockwise(w, bits, block_size)


# Scale search: each block's scale is ONNX Runtime's (signed largest magnitude -> the lowest
# code) times the one of these factors whose codes give the least input-weighted error.
SCALE_GRID = np.linspace(1.0, 0.70, 13, dtype=np.float32)


def _rows_padded(x: np.ndarray, rows: int) -> np.ndarray:
    return x if x.shape[0] == rows else np.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _searched_scales(blk: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """Scales ``[N]`` of one block ``blk [block, N]`` whose codes minimise
    ``Σ_r d_r (w_rn - ŵ_rn)²`` (``d``: the diagonal of the input's Gram over the block's rows,
    the output error of each row's weight error if the inputs were uncorrelated)."""
    mid = 1 << (bits - 1)
    hi, lo = blk.max(axis=0), blk.min(axis=0)
    base = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-mid)
    best, best_err = base, None
    for a in SCALE_GRID:
        s = base * a
        inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s != 0)
        q = np.clip(_round_half_away(blk * inv), -mid, mid - 1)
        err = (d[:, None] * (blk - q * s) ** 2).sum(axis=0)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = np.where(better, s, best)
        best_err = np.where(better, err, best_err)
    return best.astype(np.float32)


def _search(w: np.ndarray, bits: int, block_size: int, gram=None) -> BlockQuant:
    """Round to nearest, each block's scale searched against the input-weighted error."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    if n > COLUMNS:
        return _concat_columns([_search(w[:, j:j + COLUMNS], bits, block_size, gram)
                                for j in range(0, n, COLUMNS)])
    blocks, mid = -(-k // block_size), 1 << (bits - 1)
    d = np.maximum(np.diag(np.asarray(gram, dtype=np.float64)), 0).astype(np.float32)
    d = np.pad(d, (0, blocks * block_size - k))
    wp = _rows_padded(w, blocks * block_size)
    q = np.empty((n, blocks, block_size), dtype=np.int32)
    scale = np.empty((n, blocks), dtype=np.float32)
    for g in range(blocks):
        rows = slice(g * block_size, (g + 1) * block_size)
        s = _searched_scales(wp[rows], d[rows], bits)
        inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s != 0)
        q[:, g] = (np.clip(_round_half_away(wp[rows] * inv), -mid, mid - 1) + mid).T
        scale[:, g] = s
    return _pack(q, scale, bits, block_size, k, n)


def _concat_columns(parts: list[BlockQuant]) -> BlockQuant:
    p0 = parts[0]
    return BlockQuant(np.concatenate([p.packed for p in parts]),
                      np.concatenate([p.scales for p in parts]), p0.bits, p0.block_size, p0.k,
                      sum(p.n for p in parts))


# GPTQ's damping, a fraction of the Gram's mean diagonal. GPTQ's paper uses 0.01; on SmolLM2
# (the builder's graph, 2048 calibration tokens, rank-32 correction on top) 0.01 overfits the
# calibration's Gram — lowest in-sample whitened error, worst perplexity (news x1.148 against
# x1.096 for round to nearest) — and 0.1 gives x1.088 / x1.092.
GPTQ_DAMP = 0.1


#: the factors of the last few Grams: a group's Gram (one array, never changed in place) is
#: factored once, not once per choice target-size measures (``[(weak ref, kind, factor)]``)
_FACTORED: list = []


def factored(kind: str, gram: np.ndarray, make: Callable):
    """``make(gram)``, remembered for the same ``gram`` object (held weakly: an array that
    died never matches; a new array is a new entry) among the last four."""
    for ref, k, out in _FACTORED:
        if k == kind and ref() is gram:
            return out
    out = make(gram)
    try:
        ref = weakref.ref(gram)
    except TypeError:  # not an ndarray
        return out
    _FACTORED.insert(0, (ref, kind, out))
    del _FACTORED[4:]
    return out


def _inverse_cholesky(gram: np.ndarray, damp: float = GPTQ_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """``U`` upper triangular with ``(G + λI)⁻¹ = UᵀU`` (``λ``: ``damp`` of the mean diagonal,
    raised tenfold until the factorisation holds), and the rows with no input (zero diagonal);
    factored once per Gram (:func:`factored`)."""
    return factored(f"gptq-{damp}", gram, lambda g: _inverse_cholesky_of(g, damp))


def _inverse_cholesky_of(gram: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    for _ in range(6):
        try:
            # H = R·Rᵀ with R upper triangular (the Cholesky factor of H with its rows and
            # columns reversed), so H⁻¹ = R⁻ᵀ·R⁻¹ and U = R⁻¹: one factorisation and a
            # triangular inverse (the same U as the Cholesky of H⁻¹, a fifth of the work)
            hd = h[::-1, ::-1].copy()
            hd.flat[::len(hd) + 1] += lam
            r = np.linalg.cholesky(hd)[::-1, ::-1]
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        return _upper_inverse(r), dead
    raise np.linalg.LinAlgError("the Gram matrix is not positive definite, even damped")


def _upper_inverse(r: np.ndarray) -> np.ndarray:
    """``R⁻¹`` of an upper triangular ``R``: LAPACK's triangular inverse (a third of the work
    of solving ``R·U = I`` column by column: 0.10 s against 0.23 s at 1536, one thread), else
    that solve."""
    try:
        from scipy.linalg.lapack import dtrtri
    except ImportError:
        return np.triu(solve_lower_t(r.T, np.eye(len(r))))  # Rᵀ is lower: R·U = I
    u, info = dtrtri(np.asarray(r, dtype=np.float64), lower=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK info {info})")
    return np.triu(u)


#: AWQ's grid: the exponents α of ``s = a^α`` tried per input (α = 0: no scaling)
AWQ_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def _rtn_error(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``Q(w) - w`` of round-to-nearest block codes (``w [K, N]``, blocks along K)."""
    k, n = w.shape
    q, scale = _codes(w, bits, block_size)
    deq = ((q - (1 << (bits - 1))).astype(np.float32) * scale[..., None]).reshape(n, -1).T[:k]
    return deq - w


def awq_scales(act: np.ndarray, w: np.ndarray, gram: np.ndarray, bits: int = 4,
               block_size: int = 32, grid=AWQ_GRID) -> tuple[np.ndarray, float, float, float]:
    """Activation-aware scaling (AWQ, Lin et al., MLSys 2024) of the input channels of ``w
    [K, N]`` (the readers of one input, side by side): ``s = a^α`` (``a``: the channels'
    activation scale; geometric mean 1, clipped to 100 either side), the input divided by ``s``
    and ``w``'s rows multiplied by it, so the product is unchanged and the codes spend their
    levels where the activations are large. ``α`` is searched on AWQ's own objective, the
    output error of round-to-nearest codes, measured with the input's Gram ``XᵀX``:
    ``tr(Dᵀ G D)`` with ``D = Q(diag(s)·w)/s - w``. Returns ``(s, α, error at α = 0,
    error at α)``; ``α = 0`` (``s = 1``) when no scaling lowers it."""
    a = np.maximum(np.asarray(act, np.float64), 1e-8)
    w = np.asarray(w, np.float32)
    g = np.asarray(gram, np.float32)
    best = None
    base = None
    for alpha in grid:
        s = a ** float(alpha)
        s = np.clip(s / np.exp(np.mean(np.log(s))), 1e-2, 1e2).astype(np.float32)
        d = _rtn_error(w * s[:, None], bits, block_size) / s[:, None]
        err = float(np.sum(d * (g @ d)))
        if base is None and alpha == 0:
            base = err
        if best is None or err < best[2]:
            best = (s, float(alpha), err)
    s, alpha, err = best
    if alpha == 0:
        s = np.ones_like(s)
    return s, alpha, base if base is not None else err, err


def _gptq(w: np.ndarray, bits: int, block_size: int, gram=None, search: bool = True,
          lazy: int = 128) -> BlockQuant:
    """Error-feedback rounding (GPTQ, Frantar et al. 2023): rows of ``W [K, N]`` (the inputs)
    rounded in order, each one's error, weighted by the inverse Gram's Cholesky factor, pushed
    onto the rows not rounded yet; a block's scale is chosen when its first row comes up, from
    the weights as updated so far (searched like :func:`_search` when ``search``). Columns are
    independent: a wide matrix (a head) goes :data:`COLUMNS` at a time."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    u, dead = _inverse_cholesky(gram)
    if n > COLUMNS:
        return _concat_columns([_gptq_columns(w[:, j:j + COLUMNS], bits, block_size, gram, u,
                                              dead, search, lazy)
                                for j in range(0, n, COLUMNS)])
    return _gptq_columns(w, bits, block_size, gram, u, dead, search, lazy)


def _gptq_columns(w, bits, block_size, gram, u, dead, search, lazy) -> BlockQuant:
    k, n = w.shape
    blocks, mid = -(-k // block_size), 1 << (bits - 1)
    lazy = max(lazy // block_size, 1) * block_size  # whole blocks per lazy batch
    w = _rows_padded(w, blocks * block_size).copy()
    w[:k][dead] = 0
    d = np.pad(np.maximum(np.diag(np.asarray(gram, dtype=np.float64)), 0),
               (0, blocks * block_size - k)).astype(np.float32)
    u = np.pad(u, ((0, blocks * block_size - k), (0, blocks * block_size - k)))
    u[np.arange(k, blocks * block_size), np.arange(k, blocks * block_size)] = 1.0
    u = u.astype(np.float32)
    q = np.empty((blocks * block_size, n), dtype=np.int32)
    scale = np.empty((n, blocks), dtype=np.float32)
    inv = None
    for i1 in range(0, blocks * block_size, lazy):
        i2 = min(i1 + lazy, blocks * block_size)
        w1, err = w[i1:i2], np.empty((i2 - i1, n), dtype=np.float32)
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:
                blk = w[row:row + block_size]
                if search:
                    s = _searched_scales(blk, d[row:row + block_size], bits)
                else:
                    hi, lo = blk.max(axis=0), blk.min(axis=0)
                    s = (np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-mid))
                scale[:, row // block_size] = s
                inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s != 0)
            c = np.clip(_round_half_away(w1[i] * inv), -mid, mid - 1)
            q[row] = c
            e = (w1[i] - c * scale[:, row // block_size]) / u[row, row]
            w1[i + 1:] -= np.outer(u[row, row + 1:i2], e)
            err[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    codes = (q + mid).T.reshape(n, blocks, block_size)
    return _pack(codes, scale, bits, block_size, k, n)


def _gptq_rtn_scales(w, bits, block_size, gram=None) -> BlockQuant:
    return _gptq(w, bits, block_size, gram, search=False)


BASE_QUANTIZERS: dict[str, BaseQuantizer] = {q.name: q for q in (
    BaseQuantizer("rtn", "round to nearest per block (ONNX Runtime's own codes)", _rtn),
    BaseQuantizer("search", "round to nearest, each block's scale searched against the "
                  "input-weighted error (the Gram's diagonal)", _search, needs_gram=True),
    BaseQuantizer("gptq", "error-feedback rounding with the input's Gram (GPTQ), each block's "
                  "scale searched", _gptq, needs_gram=True),
    BaseQuantizer("gptq-rtn", "error-feedback rounding with the input's Gram (GPTQ), "
                  "ONNX Runtime's scales", _gptq_rtn_scales, needs_gram=True),
)}


def columns(bq: BlockQuant, sl: slice) -> BlockQuant:
    """The columns ``sl`` of ``bq`` (its blocks run along K, so columns are independent)."""
    packed, scales = bq.packed[sl], bq.scales[sl]
    return BlockQuant(packed, scales, bq.bits, bq.block_size, bq.k, packed.shape[0])


def _unpacked(bq: BlockQuant) -> np.ndarray:
    """The codes of ``bq`` as signed ``[N, blocks, block]`` int16 (midpoint subtracted)."""
    p = bq.packed
    if bq.bits == 4:
        q = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(bq.n, p.shape[1], -1)
    else:
        q = p
    return q.astype(np.int16) - (1 << (bq.bits - 1))


def dequantize(bq: BlockQuant) -> np.ndarray:
    """``deq(Q(W))`` as ``[K, N]`` float32: what ``MatMulNBits`` multiplies by."""
    if bq.n > COLUMNS:  # a block of columns at a time: one float copy, not four
        out = np.empty((bq.k, bq.n), dtype=np.float32)
        for j in range(0, bq.n, COLUMNS):
            sl = slice(j, min(bq.n, j + COLUMNS))
            out[:, sl] = dequantize(columns(bq, sl))
        return out
    w = _unpacked(bq).astype(np.float32) * bq.scales[..., None]
    return np.ascontiguousarray(w.reshape(bq.n, -1)[:, :bq.k].T)


def signed_codes(bq: BlockQuant) -> np.ndarray:
    """The codes of ``bq`` as signed ``[K, N]`` values (``ml_dtypes.int4`` for 4 bits, int8
    for 8): what ``DequantizeLinear(codes, bq.scales.T, axis=0, block_size)`` multiplies by its
    scales (symmetric, zero point 0) to give :func:`dequantize`."""
    import ml_dtypes

    c = _unpacked(bq).reshape(bq.n, -1)[:, :bq.k].T
    return np.ascontiguousarray(c.astype(ml_dtypes.int4 if bq.bits == 4 else np.int8))


def quantize_columns(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8 in ``[-qmax, qmax]``: (int8 matrix, float32 scales) with
    ``w ≈ q * scales``."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / float(qmax), 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale




def _blocks(n: int):
    for j in range(0, n, COLUMNS):
        yield slice(j, min(n, j + COLUMNS))


def whitened_norm2(m: np.ndarray, xtx: np.ndarray, minus=None) -> float:
    """``‖X·M‖_F² = tr(Mᵀ G M)`` from the Gram matrix ``G = XᵀX`` (never below 0: a Gram
    summed in float32 may be a hair indefinite). ``minus=(A, B)``: of ``M - A·B``. Computed
    ``COLUMNS`` columns at a time, so no float64 copy of a wide matrix is made. Without
    ``minus`` (what target-size asks of every choice) the product ``G·M`` is float32 (the Gram
    was summed in float32; half the time of float64, the same value to ~1e-9) and the sums
    float64; a residual ``M - A·B`` (small next to ``M``) is all float64."""
    g = np.asarray(xtx, dtype=np.float32 if minus is None else np.float64)
    total = 0.0
    for sl in _blocks(m.shape[1]):
        if minus is not None:
            mm = np.asarray(m[:, sl], np.float64) - np.asarray(minus[0], np.float64) @ \
                np.asarray(minus[1][:, sl], np.float64)
        else:
            mm = np.asarray(m[:, sl], dtype=np.float32)
        total += float(np.sum((g @ mm) * mm, dtype=np.float64))
    return max(total, 0.0)


def whitened_error(w: np.ndarray, w_hat, xtx: np.ndarray) -> float:
    """Relative output error ``‖X(W - Ŵ)‖_F / ‖X W‖_F`` on the calibration activations.
    ``w_hat``: the matrix, or ``w_hat(columns)`` giving a block of its columns (made one block
    at a time, never whole)."""
    total = whitened_norm2(w, xtx)
    if total <= 0:
        return 0.0
    g = np.asarray(xtx, dtype=np.float64)
    err = 0.0
    for sl in _blocks(w.shape[1]):
        hat = w_hat(sl) if callable(w_hat) else w_hat[:, sl]
        diff = np.asarray(w[:, sl], dtype=np.float64) - np.asarray(hat, dtype=np.float64)
        err += float(np.sum((g @ diff) * diff))
    return float(np.sqrt(max(err, 0.0) / total))


def correction_factors(e: np.ndarray, xtx: np.ndarray, rank: int) -> Factors:
    """The rank-``r`` ``A·B`` minimising ``‖X·E − X·A·B‖_F`` (QERA's closed form): with
    ``G = XᵀX = SSᵀ`` and ``M = SᵀE = UΣVᵀ``, ``A = S⁻ᵀU_rΣ_r^½``, ``B = Σ_r^½V_rᵀ``.

    The same math as :func:`lrc.factorize.whiten_factor`, computed through the eigenvectors
    of the smaller of ``MMᵀ`` / ``MᵀM`` (one BLAS-3 product and a small symmetric
    eigenproblem) instead of a full SVD: an lm_head's error is 576 x 49152 and only the top
    ``r`` directions are kept, whose accuracy squaring the matrix does not hurt."""
    s = factored("chol", xtx, cholesky_damped)
    k, n = e.shape
    r = max(1, min(rank, k, n))
    if k <= n:  # wide (a head): M's columns a block at a time, never all of it in float64
        mmt = np.zeros((k, k))
        total = e_tot = 0.0
        for sl in _blocks(n):
            e64 = np.asarray(e[:, sl], dtype=np.float64)
            m = s.T @ e64
            mmt += m @ m.T
            total += float(np.sum(m * m))
            e_tot += float(np.sum(e64 * e64))
        lam, u = np.linalg.eigh(mmt)
        lam, u = lam[::-1][:r], u[:, ::-1][:, :r]
        sig = np.sqrt(np.maximum(lam, 0.0))
        vt = np.empty((r, n))
        for sl in _blocks(n):
            vt[:, sl] = (u.T @ (s.T @ np.asarray(e[:, sl], dtype=np.float64))) \
                / np.where(sig > 0, sig, 1.0)[:, None]
        root = np.sqrt(sig)
        a = solve_lower_t(s, u * root)
        b = root[:, None] * vt
        del vt
        left = 0.0
        for sl in _blocks(n):
            d = np.asarray(e[:, sl], dtype=np.float64) - a @ b[:, sl]
            left += float(np.sum(d * d))
        kept = float(np.sum(sig ** 2))
        rel = float(np.sqrt(left / e_tot)) if e_tot > 0 else 0.0
        return Factors(a.astype(np.float32), b.astype(np.float32), r,
                       min(1.0, kept / total) if total > 0 else 1.0, rel, "whitened-correction",
                       output_energy=min(1.0, kept / total) if total > 0 else 1.0)
    e64 = np.asarray(e, dtype=np.float64)  # tall: n < k, small
    m = s.T @ e64
    lam, v = np.linalg.eigh(m.T @ m)
    lam, v = lam[::-1][:r], v[:, ::-1][:, :r]
    sig = np.sqrt(np.maximum(lam, 0.0))
    u = (m @ v) / np.where(sig > 0, sig, 1.0)[None, :]
    vt = v.T
    root = np.sqrt(sig)
    a = solve_lower_t(s, u * root)
    b = root[:, None] * vt
    total = float(np.sum(m * m))
    kept = float(np.sum(sig ** 2))
    e_tot = float(np.sum(e64 ** 2))
    rel = float(np.linalg.norm(e64 - a @ b) / np.sqrt(e_tot)) if e_tot > 0 else 0.0
    return Factors(a.astype(np.float32), b.astype(np.float32), r,
                   min(1.0, kept / total) if total > 0 else 1.0, rel, "whitened-correction",
                   output_energy=min(1.0, kept / total) if total > 0 else 1.0)


def whitened_spectrum(e: np.ndarray, xtx: np.ndarray) -> np.ndarray:
    """All ``σ²`` of ``SᵀE`` (``G = SSᵀ``), descending: what each rank of the correction
    removes from ``‖X·E‖²`` (their sum is ``‖X·E‖²``)."""
    s = factored("chol", xtx, cholesky_damped)
    m = s.T @ np.asarray(e, dtype=np.float64)
    small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return np.maximum(np.linalg.eigvalsh(small)[::-1], 0.0)
