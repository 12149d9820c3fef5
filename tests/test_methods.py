"""The methods registry: what --method offers, how auto and --update resolve, and that a new
method is one registration (accepted by lrc.compress and the CLI without touching them)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import lrc
from graphs import matmul_chain
from lrc import methods
from lrc.cli import app
from lrc.errors import LrcError
from lrc.factorize import factorize


def test_registry_holds_the_four_methods():
    assert list(methods.METHODS) == ["svd", "asvd", "svd-llm", "svd-llm+update"]
    assert {m.name: m.statistics for m in methods.METHODS.values()} == {
        "svd": "none", "asvd": "abs_mean", "svd-llm": "gram", "svd-llm+update": "sequential"}
    assert methods.choices() == ["auto", "svd", "asvd", "svd-llm"]
    assert methods.method_help() == (
        "auto (svd-llm when a tokenizer is at hand, else svd), svd (plain), asvd "
        "(activation-scaled) or svd-llm (whitened by calibration activations).")


def test_update_and_validation():
    assert methods.with_update("svd-llm") == "svd-llm+update"
    with pytest.raises(LrcError, match="update needs method=svd-llm"):
        methods.with_update("asvd")
    with pytest.raises(LrcError, match="update needs method=svd-llm"):
        lrc.compress(matmul_chain(), rank=3, method="svd", update=True)
    with pytest.raises(LrcError, match="method must be one of auto, svd, asvd, svd-llm, got 'nope'"):
        lrc.compress(matmul_chain(), rank=3, method="nope")
    methods.check("auto", update=True)  # auto is resolved per model, later
    with pytest.raises(LrcError, match="method must be one of"):
        methods.check("nope")


@pytest.fixture
def halved():
    """A toy method: plain SVD of W/2, then B doubled (the same product, its own name)."""

    def make(model, plan, calibration):
        def factoriser(t, w, rank):
            f = factorize(w / 2, rank)
            f.b = f.b * 2
            return f

        return factoriser, {"method": "halved"}

    m = methods.register(methods.Method("halved", "SVD of W/2", "none", make))
    yield m
    del methods.METHODS["halved"]


def test_a_registered_method_is_accepted_everywhere(halved, tmp_path):
    assert "halved" in methods.choices()
    assert methods.method_help().endswith("or halved (SVD of W/2).")
    _, rep = lrc.compress(matmul_chain(), rank=3, method="halved")
    assert rep["method"] == "halved" and rep["totals"]["rewritten"] == 3
    src = tmp_path / "m.onnx"
    onnx.save(matmul_chain(), src)
    r = CliRunner().invoke(app, ["compress", str(src), "--rank", "3", "--method", "halved",
                                 "-o", str(tmp_path / "o.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o.onnx.lrc.json").read_text())
    assert rep["method"] == "halved"
    ref = json.loads((tmp_path / "o.onnx.lrc.json").read_text())["totals"]
    assert ref["params_after"] < ref["params_before"]
    r = CliRunner().invoke(app, ["compress", str(src), "--method", "nope"])
    assert r.exit_code != 0 and "method must be one of auto, svd, asvd, svd-llm, halved" in str(
        r.exception)


def test_asvd_and_svd_llm_factorisers_use_their_statistics(tmp_path, monkeypatch):
    """Each method makes its own factoriser from the statistics it declares."""
    import lrc.calibration.stats as S
    from lrc.calibration.stats import ActStats
    from lrc.graph.model import as_model
    from lrc.graph.plan import build_policy, make_plan

    model = as_model(matmul_chain())
    plan = make_plan(model, build_policy(rank=3))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16))

    def fake(source, names, texts, *a, **kw):
        return {n: ActStats(n, x.T @ x, np.abs(x).mean(0), (x ** 2).mean(0), 64) for n in names
                if n == "x"}

    monkeypatch.setattr(S, "cached_stats", fake)
    f = tmp_path / "t.txt"
    f.write_text("text")
    import onnx

    onnx.save(matmul_chain(), tmp_path / "m.onnx")
    for name in ("asvd", "svd-llm"):
        fac, info = methods.make_factoriser(name, model, plan, tmp_path / "m.onnx", calib=[f],
                                            use_default=False)
        assert info["method"] == name and info["inputs"] == len(plan.calibration_inputs())
        t = plan.items[0][0]
        w = t.weight.const_value.numpy()
        assert fac(t, w, 3).method != factorize(w, 3).method
