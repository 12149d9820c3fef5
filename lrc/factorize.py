"""Truncated factorisations of weight matrices — numpy only, nothing here knows about ONNX.

Layout follows ONNX: a projection computes ``Y = X · W`` with ``W`` of shape ``[in, out]``.
A rank-``r`` factorisation replaces it by ``Y ≈ (X · A) · B`` with ``A [in, r]`` and ``B [r, out]``:
``r * (in + out)`` parameters instead of ``in * out``, so it only shrinks the matrix when
``r < in*out / (in+out)`` (the *break-even rank*).

Methods
-------
* ``svd`` — plain truncated SVD, ``W = U Σ Vᵀ``, ``A = U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ``. Optimal in
  the Frobenius norm of the *weights* (Eckart–Young); blind to which input directions matter.
* ``asvd`` — activation-scaled SVD: with ``s_j = mean_t |X_tj|^α`` (α = ½), factor ``diag(s) W``
  and divide A's rows by ``s``.
* ``svd-llm`` — truncation-aware whitening: with ``G = Xᵀ X = S Sᵀ`` (Cholesky, damped when not
  positive definite), SVD of ``Sᵀ W = U Σ Vᵀ``, ``A = S⁻ᵀ U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ``. Each
  dropped ``σ_i`` adds exactly ``σ_i²`` to ``‖X W − X A B‖_F²``, so truncation is optimal for the
  *outputs* on the calibration data.

Full SVDs use LAPACK ``gesdd`` (``numpy.linalg.svd``); when ``r`` is much smaller than
``min(in, out)`` a randomized range finder (Halko et al. 2011, with power iterations) is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Factors",
    "break_even_rank",
    "energy_ranks",
    "factorize",
    "rank_for_energy",
    "rank_for_ratio",
    "randomized_svd",
    "singular_values",
    "truncated_svd",
    "whiten_factor",
    "asvd_factor",
    "cholesky_damped",
    "solve_lower_t",
]

RANDOMIZED_THRESHOLD = 0.25  # use the randomized SVD when r < this fraction of min(m, n)


@dataclass
class Factors:
    """``W ≈ A @ B``; ``energy`` is the fraction of ``‖W‖_F²`` (or of ``‖XW‖_F²`` when
    whitened) kept; ``rel_error`` is ``‖W − AB‖_F / ‖W‖_F`` measured on the weights."""

    a: np.ndarray
    b: np.ndarray
    rank: int
    energy: float
    rel_error: float
    method: str = "svd"
    output_energy: float | None = None  # fraction of ‖X W‖² kept (data-aware methods)


def break_even_rank(m: int, n: int) -> int:
    """Largest rank at which the factors are not larger than the dense matrix: r(m+n) <= mn."""
    return (m * n) // (m + n)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank whose factors hold ``ratio`` of the dense matrix's parameters (at least 1)."""
    return max(1, int(ratio * m * n / (m + n)))


def singular_values(w: np.ndarray) -> np.ndarray:
    """All singular values of ``w`` (descending), float64."""
    w = np.asarray(w, dtype=np.float32 if w.dtype != np.float64 else np.float64)
    return np.linalg.svd(w, compute_uv=False).astype(np.float64)


def rank_for_energy(sigma: np.ndarray, energy: float) -> int:
    """Smallest ``r`` with ``sum(σ[:r]²) >= energy * sum(σ²)``."""
    e = np.cumsum(np.asarray(sigma, dtype=np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(len(e), np.searchsorted(e / e[-1], energy - 1e-12) + 1))


def energy_ranks(sigma: np.ndarray, levels=(0.90, 0.95, 0.99)) -> dict[float, int]:
    return {lv: rank_for_energy(sigma, lv) for lv in levels}


def randomized_svd(w: np.ndarray, rank: int, oversample: int = 10, power_iters: int = 4,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD of ``w`` by a randomized range finder with normalised power iterations."""
    rng = np.random.default_rng(seed)
    m, n = w.shape
    k = min(rank + oversample, min(m, n))
    transpose = m < n  # sketch the smaller side
    a = w.T if transpose else w
    omega = rng.standard_normal((a.shape[1], k)).astype(a.dtype)
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ ub
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    if transpose:
        u, vt = vt.T, u.T
    return u, s, vt


def truncated_svd(w: np.ndarray, rank: int, randomized: bool | None = None, seed: int = 0):
    """``(U_r, σ_r, V_rᵀ, all_sigma_or_None)``. ``all_sigma`` is None for the randomized path."""
    m, n = w.shape
    rank = min(rank, m, n)
    if randomized is None:
        randomized = rank < RANDOMIZED_THRESHOLD * min(m, n) and min(m, n) > 256
    if randomized:
        u, s, vt = randomized_svd(w, rank, seed=seed)
        return u, s, vt, None
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank], s


def _split(u, s, vt, dtype):
    root = np.sqrt(s).astype(u.dtype)
    return (u * root).astype(dtype), (root[:, None] * vt).astype(dtype)


def factorize(w: np.ndarray, rank: int, *, sigma: np.ndarray | None = None,
              randomized: bool | None = None, out_dtype=None) -> Factors:
    """Plain truncated SVD: ``A = U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ``.

    Computation is float32 for float16/float32 weights (float64 stays float64); the factors are
    returned in ``out_dtype`` (default: the weight's dtype)."""
    out_dtype = out_dtype or w.dtype
    work = np.asarray(w, dtype=np.float64 if w.dtype == np.float64 else np.float32)
    u, s, vt, all_s = truncated_svd(work, rank, randomized=randomized)
    a, b = _split(u, s, vt, out_dtype)
    total = float(np.sum(work.astype(np.float64) ** 2))
    kept = float(np.sum(s.astype(np.float64) ** 2))
    energy = kept / total if total > 0 else 1.0
    # Measured, not inferred from σ: catches fp16 rounding of the factors too.
    diff = work - a.astype(work.dtype) @ b.astype(work.dtype)
    rel = float(np.linalg.norm(diff) / np.sqrt(total)) if total > 0 else 0.0
    return Factors(a, b, a.shape[1], min(energy, 1.0), rel, "svd")


def cholesky_damped(g: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a symmetric PSD matrix, damped until positive definite."""
    g = np.asarray(g, dtype=np.float64)
    g = 0.5 * (g + g.T)
    try:
        return np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        lam_min = float(np.linalg.eigvalsh(g)[0])
        scale = max(float(np.mean(np.diag(g))), 1e-12)
        damp = -lam_min + 1e-6 * scale
        for _ in range(8):
            try:
                return np.linalg.cholesky(g + damp * np.eye(len(g)))
            except np.linalg.LinAlgError:
                damp *= 10
        raise


def solve_lower_t(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Solve ``Sᵀ Z = Y`` for Z with S lower triangular (i.e. Z = S⁻ᵀ Y), no explicit inverse."""
    try:
        from scipy.linalg import solve_triangular

        return solve_triangular(s, y, lower=True, trans="T")
    except ImportError:  # numpy fallback: generic solve on the (upper-triangular) transpose
        return np.linalg.solve(s.T, y)


def whiten_factor(w: np.ndarray, xtx: np.ndarray, rank: int, out_dtype=None,
                  w_target: np.ndarray | None = None, chol: np.ndarray | None = None) -> Factors:
    """SVD-LLM truncation-aware whitening.

    ``G = XᵀX = S Sᵀ``; SVD of ``Sᵀ W* = U Σ Vᵀ``; ``A = S⁻ᵀ U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ``.
    ``W*`` is ``W`` unless ``w_target`` is given (the joint-update form passes ``C⁻¹ M W`` there).
    ``output_energy`` is the fraction of ``‖X W*‖²`` kept on the calibration data. ``chol``:
    ``S`` when the caller has it already (``G`` is then not factored again)."""
    out_dtype = out_dtype or w.dtype
    w64 = np.asarray(w, dtype=np.float64)
    target = w64 if w_target is None else np.asarray(w_target, dtype=np.float64)
    s = chol if chol is not None else cholesky_damped(xtx)
    m = s.T @ target
    u, sig, vt = np.linalg.svd(m, full_matrices=False)
    r = min(rank, len(sig))
    root = np.sqrt(sig[:r])
    a = solve_lower_t(s, u[:, :r] * root)
    b = root[:, None] * vt[:r]
    total_w = float(np.sum(w64 ** 2))
    ab = a @ b
    rel = float(np.linalg.norm(w64 - ab) / np.sqrt(total_w)) if total_w > 0 else 0.0
    e_all = float(np.sum(sig ** 2))
    out_energy = float(np.sum(sig[:r] ** 2) / e_all) if e_all > 0 else 1.0
    # Weight energy of the factors relative to W (informative only for whitened methods).
    energy = float(min(1.0, np.sum(ab * w64) / total_w)) if total_w > 0 else 1.0
    return Factors(a.astype(out_dtype), b.astype(out_dtype), r, energy, rel, "svd-llm",
                   output_energy=out_energy)


def asvd_factor(w: np.ndarray, abs_mean: np.ndarray, rank: int, alpha: float = 0.5,
                out_dtype=None) -> Factors:
    """ASVD: factor ``diag(s) W`` with ``s_j = mean|x_j|^α``, then divide A's rows by ``s``."""
    out_dtype = out_dtype or w.dtype
    w64 = np.asarray(w, dtype=np.float64)
    s = np.maximum(np.asarray(abs_mean, dtype=np.float64), 1e-8) ** alpha
    s = s / np.exp(np.mean(np.log(s)))  # scale-free: geometric mean 1
    u, sig, vt = np.linalg.svd(s[:, None] * w64, full_matrices=False)
    r = min(rank, len(sig))
    root = np.sqrt(sig[:r])
    a = (u[:, :r] * root) / s[:, None]
    b = root[:, None] * vt[:r]
    total = float(np.sum(w64 ** 2))
    rel = float(np.linalg.norm(w64 - a @ b) / np.sqrt(total)) if total > 0 else 0.0
    e_all = float(np.sum(sig ** 2))
    return Factors(a.astype(out_dtype), b.astype(out_dtype), r,
                   float(max(0.0, 1 - rel ** 2)), rel, "asvd",
                   output_energy=float(np.sum(sig[:r] ** 2) / e_all) if e_all > 0 else 1.0)
