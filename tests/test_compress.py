"""The compress pipeline (lrc.pipeline), its passes under onnx-ir's pass manager, and folder in /
folder out (lrc.graph.folder) as compress and quantize use it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

import lrc
import lrc.pipeline
from graphs import matmul_chain, run, to_proto
from lrc.cli import app
from lrc.graph.passes.run import run_passes
from lrc.pipeline import CompressConfig, compress_model
from lrc.errors import LrcError
from lrc.graph import folder
from lrc.graph.model import as_model, load
from lrc.graph.passes.int8 import FORMS, Int8FactorsPass, get_form
from lrc.graph.passes.lowrank import LowRankPass
from lrc.graph.plan import build_policy, make_plan


def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r


def test_config_pipeline_equals_the_api_wrapper():
    m1, r1 = compress_model(matmul_chain(), CompressConfig.of(rank=3, method="svd"))
    m2, r2 = lrc.compress(matmul_chain(), rank=3, method="svd")
    x = np.random.default_rng(0).standard_normal((2, 4, 16)).astype(np.float32)
    assert np.array_equal(run(to_proto(m1), {"x": x})[0], run(to_proto(m2), {"x": x})[0])
    assert r1["summary"] == r2["summary"] and r1["method"] == "svd"
    assert lrc.compress is lrc.pipeline.compress


def test_plan_is_what_the_pass_rewrites():
    model = as_model(matmul_chain())
    pol = build_policy(rank=3, exclude=["ffn.down"])
    plan = make_plan(model, pol)
    lr = LowRankPass(pol, plan=plan)
    run_passes([lr], model)
    assert [r.name for r in lr.record.rewritten] == [t.name for t, *_ in plan.items]
    assert [s.name for s in lr.record.skipped] == [t.name for t, *_ in plan.skipped]


def test_int8_pass_requires_factors_and_forms_registry():
    with pytest.raises(ir.passes.PreconditionError, match="LowRankPass first"):
        Int8FactorsPass("dynamic")(as_model(matmul_chain()))
    with pytest.raises(LrcError, match="int8 form must be dynamic or qdq"):
        get_form("int4")
    assert list(FORMS) == ["dynamic", "qdq"]
    with pytest.raises(LrcError, match="int8 must be true or false"):
        lrc.compress(matmul_chain(), rank=3, int8="int4")
    with pytest.raises(LrcError, match="int8_form must be one of dynamic, qdq"):
        lrc.compress(matmul_chain(), rank=3, int8=True, int8_form="int4")
    # nothing rewritten: the int8 pass is not composed (no precondition error)
    _, rep = lrc.compress(matmul_chain(), rank=3, int8=True, exclude=["ffn", "attn"])
    assert "int8" not in rep and rep["totals"]["rewritten"] == 0


def test_user_errors_inside_passes_are_not_wrapped():
    def bad(t, w, rank):
        raise LrcError("no factors for you")

    with pytest.raises(LrcError, match="no factors for you"):
        lrc.compress(matmul_chain(), rank=3, factorizer=bad)


def test_in_memory_model_never_falls_back_silently(tmp_path):
    # explicit data-aware method, nothing to find a tokenizer by: one clear error
    with pytest.raises(LrcError, match="in-memory model needs tokenizer"):
        lrc.compress(matmul_chain(), rank=3, method="svd-llm")
    with pytest.raises(LrcError, match="in-memory model needs tokenizer"):
        lrc.compress(matmul_chain(), rank=3, method="svd-llm", update=True)
    # auto says why it chose plain SVD
    _, rep = lrc.compress(matmul_chain(), rank=3)
    assert rep["method"] == "svd" and "in-memory" in rep["method_note"]


def test_in_memory_model_is_calibrated_as_it_is(tmp_path, monkeypatch):
    """Statistics come from the model object handed in (not from a file it was once read
    from): a model changed after loading is calibrated with its change."""
    import lrc.calibration.stats as S

    p = tmp_path / "m.onnx"
    onnx.save(matmul_chain(), p)
    (tmp_path / "tokenizer.json").write_text("{}")
    m = load(p)
    seen = {}

    def fake(ref, names, texts, *a, **kw):  # the model reference calibration runs
        seen["model"], seen["path"] = ref.source, ref.file
        return {}

    monkeypatch.setattr(S, "cached_stats", fake)
    _, rep = lrc.compress(m, rank=3, method="svd-llm", update=False, calib_only=True,
                          calib=[_text(tmp_path)])
    assert seen["model"] is m and str(seen["path"]) == str(p)
    assert rep["method"] == "svd-llm"
    # given a path, calibration runs the file
    lrc.compress(p, rank=3, method="asvd", calib_only=True, calib=[_text(tmp_path)])
    assert seen["model"] == p


def _text(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("some calibration text " * 20)
    return f


def test_folder_api(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(matmul_chain(), src / "a.onnx")
    (src / "tokenizer.json").write_text("{}")
    (src / "lrc.json").write_text("{}")
    (src / "sub").mkdir()
    (src / "sub" / "x.txt").write_text("x")
    out = tmp_path / "out"

    def transform(f, dst):
        dst.write_bytes(f.read_bytes())
        return {"output": str(dst)}

    seen = {}
    reps = folder.transform_folder(src, out, transform, skip=("lrc.json",),
                                   finish=lambda tmp, r: seen.update(tmp=tmp, reports=r))
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "sub", "tokenizer.json"]
    assert reps["a.onnx"]["output"] == str(out / "a.onnx") and not seen["tmp"].exists()
    with pytest.raises(LrcError, match="exists"):
        folder.transform_folder(src, out, transform)
    with pytest.raises(LrcError, match="differ"):
        folder.transform_folder(src, src, transform, force=True)

    def fail(f, dst):
        raise LrcError("boom")

    with pytest.raises(LrcError, match="boom"):
        folder.transform_folder(src, tmp_path / "out2", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing left behind
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrcError, match="no .onnx"):
        folder.transform_folder(tmp_path / "empty", tmp_path / "o3", transform)


@pytest.fixture
def merged_folder(tmp_path):
    """An exported decoder folder: decoder_model_merged.onnx (no model.onnx) + tokenizer/config."""
    d = tmp_path / "dec"
    d.mkdir()
    onnx.save(matmul_chain(d=16, hidden=64), d / "decoder_model_merged.onnx")
    (d / "tokenizer.json").write_text("{}")
    (d / "config.json").write_text(json.dumps({"model_type": "test"}))
    return d


def test_decoder_model_merged_folder_through_every_command(merged_folder, tmp_path):
    r = _cli("analyse", merged_folder, "--rank", "4", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["totals"]["count"] == 3
    out = tmp_path / "dec-lrc"
    r = _cli("compress", merged_folder, "--rank", "4", "--method", "svd", "-o", out)
    assert r.exit_code == 0, r.output
    assert "rewrote 3 of 3 projections" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "decoder_model_merged.onnx",
                                                    "lrc.json", "tokenizer.json"]
    rep = json.loads((out / "lrc.json").read_text())
    assert rep["checks"] == {"checker": "ok", "shape_inference": "ok", "ort_cpu_session": "ok"}
    r = _cli("verify", merged_folder, out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["outputs"]["y"]["rel_error"] > 0
    r = _cli("analyse", out, "--json")
    assert r.exit_code == 0, r.output
    # quantize: --quantize-rest on the folder, and lrc.quantize on the folder
    q = tmp_path / "dec-q"
    r = _cli("compress", merged_folder, "--rank", "4", "--method", "svd", "--exclude", "ffn.down",
             "-o", q, "--quantize-rest", "int8")
    assert r.exit_code == 0, r.output
    assert "quantize-rest: quantised 1 dense MatMuls" in r.output
    assert (q / "tokenizer.json").is_file() and (q / "decoder_model_merged.onnx").is_file()
    from lrc.quantize import quantize

    q2 = tmp_path / "dec-q2"
    rep = quantize(merged_folder, q2, "int8", targets="all")
    assert rep["quantized"] == 3 and rep["output"] == str(q2 / "decoder_model_merged.onnx")
    assert sorted(p.name for p in q2.iterdir()) == ["config.json", "decoder_model_merged.onnx",
                                                   "tokenizer.json"]
