"""CUDA execution provider paths. They run only where onnxruntime-gpu sees a GPU; elsewhere they
skip and say why (never faked). ``benchmarks/cuda.py`` runs them on a GPU machine.

Placement is read from an ORT profile (the provider of every node): a form "runs on CUDA" when
none of its compute nodes ran on the CPU EP (ORT's deliberate CPU placement of small integer
shape arithmetic does not count), and its outputs agree with the CPU EP's."""

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lrc
import lrc.model  # noqa: F401  (public alias of lrc.graph.model)
from graphs import matmul_chain, tied_head, to_proto

pytestmark = pytest.mark.gpu
HAVE_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="CUDAExecutionProvider not available "
                                f"(onnxruntime {ort.__version__}: {ort.get_available_providers()})")


def _cuda_script():
    spec = importlib.util.spec_from_file_location(
        "lrc_bench_cuda", Path(__file__).resolve().parents[1] / "benchmarks" / "cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _placed(path, tmp_path, feeds, provider="cuda"):
    """(placement on ``provider``, its outputs, the CPU EP's outputs) of one run of ``path``."""
    from lrc.runtime.providers import lookup
    from lrc.runtime.session import open_session

    s = open_session(path, provider=provider, strict=True, profile_prefix=str(tmp_path / "prof"),
                     log_severity=3)
    got = s.run(None, feeds)
    pl = _cuda_script().placement_from_trace(s.end_profiling(), lookup(provider).name)
    want = open_session(path, provider="cpu").run(None, feeds)
    return pl, got, want


@needs_cuda
@pytest.mark.parametrize("form,falls_back", [("qdq", False), ("dynamic", True)])
def test_int8_forms_on_cuda(tmp_path, form, falls_back):
    """qdq factors run entirely on CUDA; the dynamic form needs the CPU (ORT #7745, #12229)."""
    new, _ = lrc.compress(matmul_chain(d=64, hidden=256), rank=16, int8=True, int8_form=form)
    p = tmp_path / "q.onnx"
    lrc.model.save(new, p)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    x = np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)
    if falls_back:
        with pytest.raises(Exception):
            ort.InferenceSession(str(p), so, providers=["CUDAExecutionProvider"]).run(None, {"x": x})
    else:
        s = ort.InferenceSession(str(p), so, providers=["CUDAExecutionProvider"])
        assert np.all(np.isfinite(s.run(None, {"x": x})[0]))


# lrc.compress options of the forms that must run on CUDA (--quantize int8's
# DynamicQuantizeMatMul: test_int8_dynamic_quantize_placement_is_reported)
QUANT_FORMS = {
    "int4": dict(quantize="int4"),
    "int4-correct32": dict(quantize="int4", correct_rank=32, method="svd"),
    "int4-correct32-add": dict(quantize="int4", correct_rank=32, correct_form="add", method="svd"),
    "int8-weight": dict(quantize="int8-weight"),
    "lowrank-int8-qdq": dict(rank=16, int8=True, int8_form="qdq"),
}


@needs_cuda
@pytest.mark.parametrize("name", list(QUANT_FORMS))
def test_quantised_forms_placed_on_cuda(tmp_path, name, provider="cuda"):
    new, _ = lrc.compress(matmul_chain(d=64, hidden=256), **QUANT_FORMS[name])
    p = tmp_path / "m.onnx"
    lrc.model.save(new, p)
    x = np.random.default_rng(1).standard_normal((2, 8, 64)).astype(np.float32)
    pl, got, want = _placed(p, tmp_path, {"x": x}, provider)
    assert pl["on_ep"], f"{name}: compute off {provider}: {pl['fallback_ops']} ({pl['by_provider']})"
    scale = float(np.abs(want[0]).max())
    assert float(np.abs(got[0] - want[0]).max()) <= 2e-2 * scale


@needs_cuda
def test_int8_dynamic_quantize_placement_is_reported(tmp_path):
    """--quantize int8 (DynamicQuantizeMatMul): whichever way ORT places it, the placement check
    says so -- on CUDA it must agree with the CPU EP, on the CPU it must be flagged."""
    new, _ = lrc.compress(matmul_chain(d=64, hidden=256), quantize="int8")
    p = tmp_path / "m.onnx"
    lrc.model.save(new, p)
    x = np.random.default_rng(2).standard_normal((2, 8, 64)).astype(np.float32)
    pl, got, want = _placed(p, tmp_path, {"x": x})
    if pl["on_ep"]:
        assert float(np.abs(got[0] - want[0]).max()) <= 5e-2 * float(np.abs(want[0]).max())
    else:
        assert "DynamicQuantizeMatMul" in pl["fallback_ops"], pl


@needs_cuda
def test_quantised_embedding_on_cuda(tmp_path, provider="cuda"):
    """--quantize int4 on a tied embedding / LM head: GatherBlockQuantized rows + the head."""
    vocab, d = 4096, 256  # 1M elements: large enough to be quantised (EMBED_MIN)
    new, _ = lrc.compress(tied_head(vocab=vocab, d=d), quantize="int4", correct_rank="32,head=64",
                          method="svd")
    p = tmp_path / "m.onnx"
    lrc.model.save(new, p)
    ids = np.random.default_rng(3).integers(0, vocab, (2, 8)).astype(np.int64)
    pl, got, want = _placed(p, tmp_path, {"ids": ids}, provider)
    assert pl["on_ep"], f"compute off {provider}: {pl['fallback_ops']} ({pl['by_provider']})"
    assert float(np.abs(got[0] - want[0]).max()) <= 2e-2 * float(np.abs(want[0]).max())


@needs_cuda
def test_bench_cuda_with_io_binding(tmp_path):
    from lrc.measure.bench import bench

    p = tmp_path / "m.onnx"
    import onnx

    onnx.save(matmul_chain(d=64, hidden=256), p)
    res = bench([p], eps=("cuda",), seq_lens=(16,), runs=5, warmup=1, amdahl=False, memory=False)
    assert res["runs"] and res["runs"][0]["ep"].lower().startswith("cuda")


@needs_cuda
def test_bench_cuda_dense_against_quantised(tmp_path):
    """The interleaved A/B bench of a dense graph and its int4 form, IO-bound on the GPU."""
    import onnx

    from lrc.measure.bench import bench

    dense, q = tmp_path / "dense.onnx", tmp_path / "q.onnx"
    onnx.save(matmul_chain(d=256, hidden=1024), dense)
    lrc.model.save(lrc.compress(matmul_chain(d=256, hidden=1024), quantize="int4")[0], q)
    res = bench([dense, q], eps=("cuda",), batch_sizes=(1, 8), seq_lens=(32,), runs=5, warmup=1,
                amdahl=False, memory=False)
    assert res["settings"]["io_binding"] == {"cuda": "cuda"}
    assert len(res["runs"]) == 4 and all(r["p50_ms"] > 0 for r in res["runs"])
    assert {r["speedup"] for r in res["runs"] if r["model"] == res["models"][0]["name"]} == {1.0}


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path):
    if HAVE_CUDA:
        pytest.skip("a GPU is present")
    from lrc.measure.bench import bench
    from lrc.errors import LrcError

    p = tmp_path / "m.onnx"
    import onnx

    onnx.save(to_proto(lrc.compress(matmul_chain(), rank=4)[0]), p)
    with pytest.raises(LrcError, match="(?i)cuda"):
        bench([p], eps=("cuda",), runs=2, warmup=1, amdahl=False, memory=False)
