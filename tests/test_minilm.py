"""Truth on a real model: all-MiniLM-L6-v2 exported to ONNX, analysed, compressed, verified."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lrc
import lrc.model  # noqa: F401  (public alias of lrc.graph.model)
from lrc.measure.verify import verify

pytestmark = pytest.mark.slow
EXPECTED = {"attn.q": 6, "attn.k": 6, "attn.v": 6, "attn.o": 6, "ffn.up": 6, "ffn.down": 6}


def test_analyse_finds_36_projections_with_roles(minilm_dir):
    res = lrc.analyse(minilm_dir, rank=64)
    assert res["totals"]["count"] == 36
    assert {r: v["count"] for r, v in res["roles"].items()} == EXPECTED
    by_name = {r["name"]: r for r in res["nodes"]}
    r = by_name["/encoder/layer.3/attention/output/dense/MatMul"]
    assert (r["role"], r["block"], r["shape"]) == ("attn.o", 3, [384, 384])
    r = by_name["/encoder/layer.3/output/dense/MatMul"]
    assert (r["role"], r["shape"]) == ("ffn.down", [1536, 384])
    assert all(r["rank90"] <= r["rank95"] <= r["rank99"] for r in res["nodes"])


def test_rank64_runs_and_full_rank_is_exact(minilm_dir, tmp_path):
    env = dict(os.environ, COLUMNS="200")
    out = tmp_path / "r64"
    r = subprocess.run([sys.executable, "-m", "lrc.cli", "compress", str(minilm_dir), "--rank", "64",
                        "--recipe", "plain", "-o", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "lrc.json").read_text())
    assert summary["totals"]["rewritten"] == 36
    assert all(x["rank"] == 64 for x in summary["rewritten"])
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    res = verify(minilm_dir, out)
    assert 0 < res["worst_rel"] < 2  # runs; rank 64 is lossy
    assert summary["size_after"] < 0.7 * summary["size_before"]

    model, rep = lrc.compress(minilm_dir, rank="full")
    lrc.model.save(model, tmp_path / "full.onnx")
    ids = np.random.default_rng(0).integers(0, 30000, (2, 24)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    res = verify(minilm_dir, tmp_path / "full.onnx", inputs=feeds)
    assert res["worst_rel"] <= 1e-4


def test_whitened_factors_beat_plain_svd_on_real_text(minilm_dir, tmp_path):
    from lrc.measure.quality import compare_encoder

    res = {}
    for method in ("svd", "svd-llm"):
        model, rep = lrc.compress(minilm_dir, ratio=0.6, include=["ffn"], method=method,
                                  calib_tokens=4096)
        out = tmp_path / f"{method}.onnx"
        lrc.model.save(model, out)
        import shutil
        shutil.copy(minilm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
        res[method] = compare_encoder(minilm_dir, out, "docs")["embedding_cosine"]
    assert rep["calibration"]["tokens"] == 4096
    assert res["svd-llm"] > res["svd"] + 0.1


def test_int4_correction_brings_real_embeddings_closer(minilm_dir, tmp_path):
    """The real model, real text out of the calibration domain: lrc int4 with a rank-32
    whitened correction is closer to dense than the same 4-bit codes without it, the
    embedding table is int8 (GatherBlockQuantized) and the file is a fraction of dense."""
    import shutil

    from lrc.measure.quality import compare_encoder

    shutil.copy(minilm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cos, size = {}, {}
    for r in (0, 32):
        model, rep = lrc.compress(minilm_dir, quantize="int4", correct_rank=r,
                                  calib_tokens=4096)
        out = tmp_path / f"q{r}.onnx"
        lrc.model.save(model, out)
        size[r] = out.stat().st_size
        cos[r] = compare_encoder(minilm_dir, out, "docs")["embedding_cosine"]
        q = rep["quantize"]
        assert q["totals"]["quantized"] == 36 and q["embeddings"][0]["bits"] == 8
    assert all(n["werr_after"] < n["werr_before"] for n in q["nodes"])
    assert cos[32] > cos[0] and cos[32] > 0.97, cos
    assert size[32] < 0.35 * (minilm_dir / "model.onnx").stat().st_size


def test_tokenizer_flag_for_a_bare_onnx_file(minilm_dir, tmp_path):
    """A .onnx file with no tokenizer.json beside it: data-aware compression and eval say to
    pass --tokenizer, and work with it (a file or the folder holding one)."""
    import shutil

    from test_cli import _one_line_error, lrc as cli

    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    shutil.copy(minilm_dir / "model.onnx", bare)
    out = tmp_path / "r.onnx"
    e = _one_line_error(cli("compress", bare, "--rank", "64", "--method", "svd-llm",
                            "--calib-tokens", "1024", "-o", out), code=2)
    assert "--tokenizer" in e and not out.exists()
    e = _one_line_error(cli("compress", bare, "--rank", "64", "--tokenizer", tmp_path / "none",
                            "-o", out), code=2)
    assert "--tokenizer" in e
    r = cli("compress", bare, "--rank", "64", "--method", "svd-llm", "--calib-tokens", "1024",
            "--tokenizer", minilm_dir, "-o", out)
    assert r.returncode == 0, r.stderr
    r = cli("eval", bare, out, "--tokenizer", minilm_dir / "tokenizer.json", "--max-tokens",
            "256", "--json")
    assert r.returncode == 0, r.stderr
