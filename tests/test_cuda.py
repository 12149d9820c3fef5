"""CUDA execution provider paths. They run only where onnxruntime-gpu sees a GPU; elsewhere they
skip and say why (never faked)."""

import numpy as np
import onnxruntime as ort
import pytest

import lrc
import lrc.model  # noqa: F401  (public alias of lrc.graph.model)
from graphs import matmul_chain, to_proto

pytestmark = pytest.mark.gpu
HAVE_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="CUDAExecutionProvider not available "
                                f"(onnxruntime {ort.__version__}: {ort.get_available_providers()})")


@needs_cuda
@pytest.mark.parametrize("form,falls_back", [("qdq", False), ("dynamic", True)])
def test_int8_forms_on_cuda(tmp_path, form, falls_back):
    """qdq factors run entirely on CUDA; the dynamic form needs the CPU (ORT #7745, #12229)."""
    new, _ = lrc.compress(matmul_chain(d=64, hidden=256), rank=16, int8=form)
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


@needs_cuda
def test_bench_cuda_with_io_binding(tmp_path):
    from lrc.measure.bench import bench

    p = tmp_path / "m.onnx"
    import onnx

    onnx.save(matmul_chain(d=64, hidden=256), p)
    res = bench([p], eps=("cuda",), seq_lens=(16,), runs=5, warmup=1, amdahl=False, memory=False)
    assert res["runs"] and res["runs"][0]["ep"].lower().startswith("cuda")


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
