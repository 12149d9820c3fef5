"""lrc.tune: candidate plan, Pareto frontier, choice rule, shared factorisations, and quick tunes
end to end (a tiny LLaMA always; the real MiniLM export when slow tests run)."""

import json
import math

import numpy as np
import pytest

from lrc.errors import LrcError
from lrc.present.tune import format_tables
from lrc.tune import CORRECTED, TruncatingFactorizer, choose, pareto, plan_candidates, tune


def _c(name, family, speedup, loss, size=100):
    return {"name": name, "family": family, "speedup": speedup, "loss": loss, "size_bytes": size}


DENSE = _c("dense", "dense", 1.0, 0.0, 500)


# ----------------------------------------------------------------------------- pure parts


def test_plan_full_and_quick():
    full = plan_candidates(False, (0.9, 0.8, 0.7), ("mlp", "all"))
    names = [p.name for p in full]
    assert names[:2] == ["int8", "int4"]
    assert len(names) == len(set(names)) == 2 + len(CORRECTED) + 6 * 4
    assert "int4+corr" in names  # quantisation with a whitened low-rank correction
    assert "lr-all-0.7+i8f+rest8" in names and "lr-mlp-0.9+i8f" in names
    # every variant comes after its float parent
    for i, p in enumerate(full):
        if p.parent:
            assert p.parent in names[:i]
    # candidates are compositions of techniques; their family is read off them
    by = {p.name: p for p in full}
    assert by["int8"].family == "quantized" and by["int4+corr"].family == "corrected"
    assert by["lr-all-0.7+i8f+rest8"].then == ("int8-factors", "quantize-rest")
    assert by["lr-all-0.7+i8f+rest8"].options == {"ratio": 0.7, "include": ["attn", "ffn"],
                                                  "method": "svd-llm"}
    quick = plan_candidates(True, (0.9,), ("mlp",))
    assert 2 <= len(quick) <= 4


def test_pareto_keeps_only_non_dominated():
    pts = [DENSE, _c("a", "quantized", 2.0, 0.01), _c("b", "low-rank", 1.5, 0.02),
           _c("c", "low-rank", 2.2, 0.05), _c("d", "low-rank", 1.1, -0.01)]
    assert [p["name"] for p in pareto(pts, "speedup")] == ["d", "a", "c"]
    sized = [DENSE, _c("a", "q", None, 0.01, 200), _c("b", "q", None, 0.02, 150),
             _c("c", "q", None, 0.03, 180)]
    assert [p["name"] for p in pareto(sized, "size_bytes")] == ["dense", "a", "b"]


def test_choice_prefers_plain_quantization_when_low_rank_is_within_noise():
    int8 = _c("int8", "quantized", 1.80, 0.02)
    lr = _c("lr-mlp-0.8+i8f+rest8", "low-rank", 1.84, 0.05)
    best, why = choose(DENSE, [int8, lr], "latency", 0.05, 0.1, "causal-lm")
    assert best is int8 and "low rank does not pay" in why
    lr_fast = _c("lr-all-0.7+i8f+rest8", "low-rank", 2.3, 0.05)
    best, why = choose(DENSE, [int8, lr_fast], "latency", 0.05, 0.1, "causal-lm")
    assert best is lr_fast and "low rank pays" in why and "int8" in why
    # nothing measurably faster than dense: nothing chosen
    best, why = choose(DENSE, [_c("x", "quantized", 1.03, 0.0)], "latency", 0.05, 0.1, "encoder")
    assert best is None and "dense" in why
    best, why = choose(DENSE, [], "latency", 0.05, 0.1, "encoder")
    assert best is None and "budget" in why
    small = _c("int4", "quantized", 0.9, 0.01, 60)
    best, _ = choose(DENSE, [int8, small], "size", 0.05, 0.1, "encoder")
    assert best is small


def test_pruning_only_below_a_clearly_failing_measured_parent():
    from lrc.tune import pruned_reason

    plan = {p.name: p for p in plan_candidates(False, (0.9, 0.8, 0.7), ("mlp", "all"))}
    built = {"lr-mlp-0.9": {"name": "lr-mlp-0.9", "loss": 0.5},
             "lr-all-0.9": {"name": "lr-all-0.9", "loss": 0.12}}
    assert pruned_reason(plan["int8"], built, 0.1) is None
    assert "float parent" in pruned_reason(plan["lr-mlp-0.9+i8f"], built, 0.1)
    assert "keeps more" in pruned_reason(plan["lr-mlp-0.7"], built, 0.1)
    assert "keeps more" in pruned_reason(plan["lr-mlp-0.8+i8f+rest8"], built, 0.1)
    # 0.12 is over a 0.1 budget but not clearly: its variants are still measured
    assert pruned_reason(plan["lr-all-0.9+rest8"], built, 0.1) is None
    assert pruned_reason(plan["lr-all-0.8"], built, 0.1) is None


def test_truncating_factorizer_equals_direct_factorization():
    from lrc.factorize import factorize

    class T:  # the two attributes the factoriser reads
        weight_key = ("w", False)

    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    calls = []

    def direct(t, w, rank):
        calls.append(rank)
        return factorize(w, rank, randomized=False)

    tf = TruncatingFactorizer(direct, 0.9)
    for r in (20, 12, 5):
        got, want = tf(T(), w, r), factorize(w, r, randomized=False)
        assert got.rank == r
        np.testing.assert_allclose(got.a @ got.b, want.a @ want.b, rtol=1e-4, atol=1e-4)
        assert math.isclose(got.rel_error, want.rel_error, rel_tol=1e-4)
    assert calls == [28]  # one SVD at the largest ratio's rank (0.9 * 48 * 96 / 144)
    tf(T(), w, 40)  # a larger rank than cached: recomputed once
    assert calls == [28, 40]


def test_bad_arguments(tmp_path):
    with pytest.raises(LrcError, match="objective"):
        tune(tmp_path, objective="speed")
    with pytest.raises(LrcError):
        tune(tmp_path / "missing")
    from graphs import matmul_chain

    import onnx

    bare = tmp_path / "bare.onnx"
    onnx.save(matmul_chain(), bare)
    with pytest.raises(LrcError, match="pass tokenizer"):
        tune(bare)
    with pytest.raises(LrcError, match="nowhere.*no tokenizer.json"):
        tune(bare, tokenizer=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    from fixtures_export import save_tiny

    from lrc.exporters import export

    root = tmp_path_factory.mktemp("tune_llama")
    save_tiny("llama", root / "hf", seed=3, tokenizer=True)
    export(root / "hf", root / "onnx", exporter="optimum")
    return root / "onnx"


def _check_result(r, out):
    assert r["candidates"] and r["frontier"]
    by_name = {c["name"]: c for c in [r["dense"]] + r["candidates"]}
    for c in r["candidates"]:
        if c.get("skipped"):
            assert not c["within_budget"] and "loss" not in c and "speedup" not in c
            continue
        assert c["size_bytes"] > 0 and "loss" in c and c["quality"]
        if c["within_budget"]:  # everything within budget was timed in the interleaved bench
            assert c["speedup"] > 0 and c["latency"]
    for name in r["frontier"]:  # the frontier holds only measured points
        assert by_name[name]["speedup"] is not None and by_name[name]["loss"] is not None
    if r["chosen"] is None:
        assert r["output"] is None and not out.exists()
    else:
        assert r["output"] == str(out) and (out / "model.onnx").is_file()
        assert (out / "tokenizer.json").is_file() and (out / "tune.json").is_file()
        saved = json.loads((out / "tune.json").read_text())
        assert saved["chosen"] == r["chosen"] and saved["reason"] == r["reason"]
        import onnxruntime as ort

        ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert not list(out.parent.glob(".lrc-tune-*"))  # the work folder is gone
    assert format_tables(r)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_quick_tune_causal_lm(tiny_llama_dir, tmp_path):
    out = tmp_path / "tuned"
    msgs = []
    r = tune(tiny_llama_dir, quick=True, out=out, progress=msgs.append)
    assert r["kind"] == "causal-lm" and r["budget"]["max_quality_loss"] == 0.10
    for c in r["candidates"]:
        assert {"news", "docs"} <= set(c["quality"])
        ratio = max(c["quality"][t] / r["dense"]["quality"][t] for t in ("news", "docs"))
        assert math.isclose(c["loss"], ratio - 1, rel_tol=1e-9, abs_tol=1e-12)
        assert c["within_budget"] == (c["loss"] <= 0.10 + 1e-12)
    assert [c["name"] for c in r["candidates"]] == ["int8", "int4+corr", "lr-mlp-0.8",
                                                    "lr-mlp-0.8+i8f+rest8"]
    corr = r["candidates"][1]
    assert corr["family"] == "corrected" and "correction" in corr["recipe"]
    _check_result(r, out)
    assert any("benchmarking" in m for m in msgs)
    # low rank is built the measured-best way by default: grouped inputs + sequential update
    assert r["update"] is True and r["calibration"]["method"].startswith("svd-llm")
    assert all("group + update" in c["recipe"] for c in r["candidates"]
               if c["family"] == "low-rank")
    assert any("grouped + update" in m for m in msgs)
    out.mkdir(exist_ok=True)
    with pytest.raises(LrcError, match="exists"):  # refused before any work
        tune(tiny_llama_dir, quick=True, out=out)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_quick_tune_without_update_shares_one_factorisation(tiny_llama_dir, tmp_path,
                                                            monkeypatch):
    import lrc.tune as T

    calls = []
    real = T.make_factoriser
    monkeypatch.setattr(T, "make_factoriser", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    r = tune(tiny_llama_dir, quick=True, update=False, out=None)
    assert r["update"] is False and calls == ["svd-llm"]  # one calibration for all ratios
    lr = [c for c in r["candidates"] if c["family"] == "low-rank"]
    assert lr and all("update" not in c["recipe"] and "error" not in c for c in lr)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_nothing_within_budget_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    import lrc.tune as T

    monkeypatch.setattr(T.Quality, "loss", lambda self, q: 1.0)
    out = tmp_path / "none"
    r = tune(tiny_llama_dir, quick=True, out=out)
    assert r["chosen"] is None and r["output"] is None and not out.exists()
    assert "no candidate stays within the quality budget" in r["reason"]
    assert all(not c["within_budget"] and "speedup" not in c for c in r["candidates"])
    assert r["frontier"] == ["dense"] and r["bench"] is None


@pytest.mark.slow
def test_quick_tune_minilm(minilm_dir, tmp_path):
    out = tmp_path / "tuned"
    r = tune(minilm_dir, quick=True, out=out)
    assert r["kind"] == "encoder" and r["budget"]["max_quality_loss"] == 0.01
    assert 0.6 < r["dense"]["quality"]["lee_pearson"] < 0.7
    for c in r["candidates"]:
        assert math.isclose(c["loss"], r["dense"]["quality"]["lee_pearson"]
                            - c["quality"]["lee_pearson"], abs_tol=1e-12)
    _check_result(r, out)
