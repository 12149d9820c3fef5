"""The sensitivity probe: one ONNX Runtime session whose weights a run may replace."""

from __future__ import annotations

import numpy as np

from lrc.calibration.sensitivity import Probe
from test_evaluate import _weights, write_lm


def test_probe_measures_the_output_kl_of_replaced_weights(tmp_path):
    """The unchanged weights give KL 0; a larger change of a weight gives a larger KL; the
    session's own weights are untouched between runs (a run's values do not stick)."""
    w = _weights()
    folder = write_lm(tmp_path / "lm", w)
    batches = [np.array([1, 5, 9, 3, 7, 2, 11, 4]), np.array([1, 6, 6, 8, 12, 30])]
    p = Probe(folder / "model.onnx", ["W1", "W2"], batches)
    assert p({}) == 0.0 or abs(p({})) < 1e-7
    assert abs(p({"W1": w["W1"]})) < 1e-7
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(w["W1"].shape).astype(np.float32)
    small, big = p({"W1": w["W1"] + 0.05 * noise}), p({"W1": w["W1"] + 0.5 * noise})
    assert 0 < small < big
    assert abs(p({})) < 1e-7  # the replaced values did not stay in the session
    both = p({"W1": w["W1"] + 0.05 * noise, "W2": w["W2"] * 1.2})
    assert both > small
