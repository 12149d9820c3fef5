"""The CLI through subprocess: real output, and one clean line for every bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from graphs import matmul_chain, no_targets, run

LRC = [sys.executable, "-m", "lrc.cli"]


def lrc(*args, cwd=None):
    env = dict(os.environ, COLUMNS="200", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([*LRC, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(matmul_chain(d=16, hidden=64), p)
    return p


def _one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lrc: error:")
    return lines[0]


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_analyse_compress_verify_roundtrip(model_file, tmp_path):
    r = lrc("analyse", model_file, "--rank", "4")
    assert r.returncode == 0, r.stderr
    assert "ffn.down" in r.stdout and "all projections" in r.stdout
    out = tmp_path / "small.onnx"
    r = lrc("compress", model_file, "--rank", "4", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "rewrote 3 of 3 projections" in r.stdout
    summary = json.loads((tmp_path / "small.onnx.lrc.json").read_text())
    assert summary["totals"]["rewritten"] == 3 and summary["checks"]["checker"] == "ok"
    r = lrc("verify", model_file, out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["y"]["rel_error"] > 0
    # output exists -> refused, untouched
    before = out.read_bytes()
    e = _one_line_error(lrc("compress", model_file, "--rank", "4", "-o", out))
    assert "--force" in e and out.read_bytes() == before
    assert lrc("compress", model_file, "--rank", "2", "-o", out, "--force").returncode == 0


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_full_rank_verifies_exactly(model_file, tmp_path):
    out = tmp_path / "full.onnx"
    assert lrc("compress", model_file, "--rank", "full", "-o", out).returncode == 0
    r = lrc("verify", model_file, out, "--rtol", "1e-4")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_verify_rtol_fails_when_outputs_differ(model_file, tmp_path):
    out = tmp_path / "r1.onnx"
    assert lrc("compress", model_file, "--rank", "1", "-o", out).returncode == 0
    r = lrc("verify", model_file, out, "--rtol", "1e-4")
    assert r.returncode == 1


def test_verify_with_real_inputs(model_file, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = lrc("verify", model_file, model_file, "--inputs", tmp_path / "in.npz", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["outputs"]["y"]["max_abs"] == 0.0 and "in.npz" in res["inputs"]


def test_missing_path(tmp_path):
    e = _one_line_error(lrc("compress", tmp_path / "nope.onnx", "--rank", "4"))
    assert "no such file" in e


def test_not_onnx(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_text("hello, I am not a protobuf\n" * 10)
    _one_line_error(lrc("analyse", p))
    assert not list(tmp_path.glob("x-lrc*"))


def test_truncated_protobuf(model_file, tmp_path):
    data = model_file.read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    e = _one_line_error(lrc("compress", p, "--rank", "4"))
    assert "trunc.onnx" in e
    assert not list(tmp_path.glob("trunc-lrc*"))


def test_empty_file(tmp_path):
    p = tmp_path / "e.onnx"
    p.write_bytes(b"")
    assert "empty" in _one_line_error(lrc("analyse", p))


@pytest.mark.parametrize("args,msg", [
    (["--rank", "0"], "positive integer"),
    (["--rank", "-2"], "positive integer"),
    (["--ratio", "2"], "ratio"),
    (["--include", "fnn"], "unknown role"),
    (["--rank", "4", "--energy", "0.9"], "only one"),
    (["--rank", "4", "--update"], "--update needs --method svd-llm"),
    (["--rank", "4", "--method", "magic"], "--method must be one of"),
    (["--target-params", "0.5", "--rank", "3"], "not both"),
])
def test_bad_options(model_file, tmp_path, args, msg):
    e = _one_line_error(lrc("compress", model_file, *args, "-o", tmp_path / "o.onnx"))
    assert msg in e
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_bad_policy_file(model_file, tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("roles: [1, 2")
    assert "policy" in _one_line_error(lrc("compress", model_file, "--policy", p))
    assert "--policy" in _one_line_error(lrc("compress", model_file, "--policy",
                                             tmp_path / "q.yml"))


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_external_data_outside_folder_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(16 * 64, np.float32).tobytes())
    d = tmp_path / "model"
    d.mkdir()
    m = matmul_chain(d=16, hidden=64)
    w = next(i for i in m.graph.initializer if i.name.endswith("up_proj.weight"))
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", str(16 * 64 * 4))):
        e = w.external_data.add()
        e.key, e.value = k, v
    onnx.save(m, d / "evil.onnx")
    e = _one_line_error(lrc("compress", d / "evil.onnx", "--rank", "4"))
    assert "outside the model's folder" in e
    for loc in ("/etc/passwd",):
        w.external_data[0].value = loc
        onnx.save(m, d / "evil2.onnx")
        assert "outside" in _one_line_error(lrc("analyse", d / "evil2.onnx"))
    assert not list(d.glob("*-lrc*"))


def test_hard_linked_external_data_refused_up_front(model_file, tmp_path):
    """onnx-ir refuses a data file with several hard links at its first read, deep in a pass
    ("internal error"): lrc says so when it loads the model, in one line."""
    ext = tmp_path / "ext.onnx"
    onnx.save(onnx.load(model_file), ext, save_as_external_data=True, size_threshold=0,
              location="ext.onnx.data")
    os.link(tmp_path / "ext.onnx.data", tmp_path / "twin.data")
    e = _one_line_error(lrc("compress", ext, "--rank", "4", "-o", tmp_path / "o.onnx"))
    assert "hard links" in e and "ext.onnx.data" in e
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_external_data_roundtrip(model_file, tmp_path):
    out = tmp_path / "ext.onnx"
    r = lrc("compress", model_file, "--rank", "full", "-o", out, "--external-data")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ext.onnx.data").is_file()
    # and an externally-stored input model is read lazily and compressed
    out2 = tmp_path / "ext2.onnx"
    assert lrc("compress", out, "--rank", "4", "-o", out2, "--allow-larger").returncode == 0
    x = np.random.default_rng(0).standard_normal((1, 2, 16)).astype(np.float32)
    ref = run(str(model_file), {"x": x})[0]
    np.testing.assert_allclose(run(str(out), {"x": x})[0], ref, rtol=1e-4, atol=1e-5)


def test_nothing_eligible_exits_zero(tmp_path):
    p = tmp_path / "relu.onnx"
    onnx.save(no_targets(), p)
    r = lrc("compress", p, "--rank", "4", "-o", tmp_path / "o.onnx")
    assert r.returncode == 0, r.stderr
    assert "nothing eligible" in r.stdout


def test_rank_at_least_min_dim_left_dense(model_file, tmp_path):
    r = lrc("compress", model_file, "--rank", "16", "-o", tmp_path / "o.onnx")
    assert r.returncode == 0, r.stderr
    assert "left dense" in r.stdout and ">= min(in, out)" in r.stdout
