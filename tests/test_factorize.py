"""Each factorisation method's defining property, on synthetic data."""

import numpy as np
import pytest

from lrc.factorize import (asvd_factor, factorize, randomized_svd, singular_values,
                           whiten_factor)


def _data(n=400, d=48, out=40, seed=0):
    r = np.random.default_rng(seed)
    # correlated, anisotropic activations: what makes whitening matter
    mix = r.standard_normal((d, d)) * np.linspace(3, 0.05, d)
    x = r.standard_normal((n, d)) @ mix
    w = r.standard_normal((d, out))
    return x, w


def test_plain_svd_is_eckart_young():
    _, w = _data()
    f = factorize(w, 10)
    s = np.linalg.svd(w, compute_uv=False)
    assert np.linalg.norm(w - f.a @ f.b) == pytest.approx(np.sqrt((s[10:] ** 2).sum()), rel=1e-6)
    assert f.rel_error == pytest.approx(np.sqrt((s[10:] ** 2).sum() / (s ** 2).sum()), rel=1e-6)


def test_whitened_error_is_sum_of_dropped_singular_values():
    x, w = _data()
    g = x.T @ x
    s_chol = np.linalg.cholesky(g)
    sig = np.linalg.svd(s_chol.T @ w, compute_uv=False)
    for r in (5, 12, 30):
        f = whiten_factor(w, g, r)
        err2 = np.linalg.norm(x @ w - x @ f.a @ f.b) ** 2
        assert err2 == pytest.approx((sig[r:] ** 2).sum(), rel=1e-6)
        # and it beats plain SVD on the outputs at the same rank
        p = factorize(w, r)
        assert err2 < np.linalg.norm(x @ w - x @ p.a @ p.b) ** 2


def test_whitening_survives_singular_gram():
    x, w = _data(n=20, d=48)  # rank-deficient X^T X
    f = whiten_factor(w, x.T @ x, 8)
    assert np.all(np.isfinite(f.a)) and np.all(np.isfinite(f.b))


def test_whitened_joint_target():
    # w_target replaces W inside the whitened SVD (the joint-update form)
    x, w = _data()
    f = whiten_factor(w, x.T @ x, 48, w_target=2 * w)
    assert np.allclose(x @ f.a @ f.b, 2 * x @ w, rtol=1e-6, atol=1e-6)


def test_asvd_full_rank_exact_and_better_on_scaled_channels():
    x, w = _data()
    am = np.abs(x).mean(axis=0)
    f = asvd_factor(w, am, 48)
    assert np.allclose(f.a @ f.b, w, atol=1e-8)
    r = 10
    e_asvd = np.linalg.norm(x @ w - x @ asvd_factor(w, am, r).a @ asvd_factor(w, am, r).b)
    p = factorize(w, r)
    assert e_asvd < np.linalg.norm(x @ w - x @ p.a @ p.b)


def test_randomized_svd_matches_exact_top_values():
    r = np.random.default_rng(1)
    w = (r.standard_normal((300, 20)) @ r.standard_normal((20, 500))
         + 0.01 * r.standard_normal((300, 500))).astype(np.float32)
    u, s, vt = randomized_svd(w, 10)
    exact = singular_values(w)[:10]
    assert np.allclose(s, exact, rtol=1e-3)
    assert u.shape == (300, 10) and vt.shape == (10, 500)


def test_fp16_factors_keep_dtype():
    _, w = _data()
    f = factorize(w.astype(np.float16), 8)
    assert f.a.dtype == np.float16 and f.b.dtype == np.float16
