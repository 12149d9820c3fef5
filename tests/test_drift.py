"""lrc.measure.drift: the metrics of ``lrc verify`` and ``lrc eval --layers`` (one
implementation) and per-layer drift on the tiny LM of test_evaluate."""

from __future__ import annotations

import numpy as np
import pytest
from test_evaluate import lm, write_lm  # noqa: F401 (lm: fixture)

from lrc.errors import LrcError
from lrc.measure.drift import default_drift_tensors, layer_drift
from lrc.measure.metrics import compare_tensors as compare_arrays
from lrc.present.quality import format_table


def test_compare_arrays_metrics():
    a = np.array([[3.0, 4.0]], np.float32)
    m = compare_arrays(a, np.array([[3.0, 4.5]], np.float32))
    assert m["max_abs"] == 0.5 and m["mean_abs"] == 0.25
    assert m["rel_error"] == pytest.approx(0.1)
    assert m["cosine"] == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))
    assert compare_arrays(a, a) == {"max_abs": 0.0, "mean_abs": 0.0, "rel_error": 0.0, "cosine": 1.0}
    # a zero reference: relative error 0 when both are zero, else 1
    z = np.zeros(3)
    assert compare_arrays(z, z)["rel_error"] == 0.0 and compare_arrays(z, z)["cosine"] == 1.0
    assert compare_arrays(z, np.ones(3))["rel_error"] == 1.0
    assert compare_arrays(a, a.reshape(2, 1))["rel_error"] == 0.0  # element by element
    assert compare_arrays(a, np.zeros(3)) == {"shape_mismatch": [[1, 2], [3]]}


def test_layer_drift_finds_perturbed_tensor(lm, tmp_path):  # noqa: F811
    w, folder = lm
    w2 = dict(w, W2=w["W2"] + np.random.default_rng(5).normal(0, 0.5, w["W2"].shape).astype(np.float32))
    bad = write_lm(tmp_path / "bad", w2)
    names = ["h", "a", "l1_out", "t", "logits"]
    rows = layer_drift(folder, bad, names)
    assert rows[0]["tensor"] == "logits" and rows[0]["rel_error"] > 0.1
    for r in rows[1:]:
        assert r["rel_error"] == pytest.approx(0.0, abs=1e-6) and r["cosine"] == pytest.approx(1.0)
    assert set(rows[0]) == {"tensor", "cosine", "rel_error", "max_abs", "shape"}
    # a graph input is compared too (from the feeds)
    assert layer_drift(folder, bad, ["input_ids"])[0]["rel_error"] == 0.0


def test_layer_drift_default_tensors_on_low_rank(lm, tmp_path):  # noqa: F811
    w, folder = lm
    u, s, vt = np.linalg.svd(w["W1"], full_matrices=False)
    new = write_lm(tmp_path / "lr", w, low_rank_w1=(u[:, :3] * s[:3], vt[:3]))
    assert set(default_drift_tensors(folder, new)) == {"l1_out", "logits", "k"}
    rows = layer_drift(folder, new)  # default: MatMul outputs in both, default feeds
    names = [r["tensor"] for r in rows]
    assert set(names) == {"l1_out", "logits", "k"}
    assert names[-1] == "k" and rows[-1]["rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["rel_error"] > 0.01
    table = format_table(rows)
    assert table.row_count == 3


def test_layer_drift_missing_tensor_is_user_error(lm):  # noqa: F811
    _, folder = lm
    with pytest.raises(LrcError, match="model.onnx: tensor 'nope' is not produced"):
        layer_drift(folder, folder, ["nope"])
    with pytest.raises(LrcError, match="initializer"):
        layer_drift(folder, folder, ["W1"])
