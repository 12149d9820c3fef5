"""benchmarks/cuda.py without a GPU: everything but the GPU itself.

* the payload that carries SmolLM2 to the GPU machine (GGUF blocks + a graph skeleton) rebuilds
  the very float32 tensors (synthetic blocks here; ``cuda_prepare.sh`` checks the real model);
* the placement check and the quantised forms of ``tests/test_cuda.py`` on the CPU EP;
* ``cuda.py run --check``: variants, placement, interleaved bench, JSON and Markdown, on tiny
  exported models (a LLaMA decoder with a KV cache, a BERT encoder);
* ``render`` refuses a --check result and writes a CUDA one between the markers.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import test_cuda as tc

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lrc_bench_cuda", ROOT / "benchmarks" / "cuda.py")
cuda = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda)


def _blocks(qtype: str, n: int, rng) -> bytes:
    nb = n // 32
    d = (rng.standard_normal(nb) * 0.01).astype(np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == "Q8_0":
        q = rng.integers(-127, 128, (nb, 32)).astype(np.int8).view(np.uint8)
        return np.concatenate([d, q], axis=1).tobytes()
    m = (rng.standard_normal(nb) * 0.01).astype(np.float16).view(np.uint8).reshape(nb, 2)
    q = rng.integers(0, 256, (nb, 16)).astype(np.uint8)
    return np.concatenate([d, m, q], axis=1).tobytes()


def test_dequantize_matches_gguf():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    for qt in ("Q4_1", "Q8_0"):
        raw = _blocks(qt, 64 * 96, rng)
        want = gguf.quants.dequantize(np.frombuffer(raw, np.uint8).reshape(96, -1),
                                      gguf.GGMLQuantizationType[qt])
        got = cuda.dequantize(qt, raw, (96, 64))
        assert got.dtype == np.float32 and np.array_equal(got, want.reshape(96, 64))


def test_head_permute_is_transformers_reverse_permute():
    """The permutation transformers applies to llama Q / K weights read from a GGUF."""
    w = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)
    heads, dim = 3, 12 // 3 // 2
    want = w.reshape(heads, dim, 2, 4).swapaxes(2, 1).reshape(12, 4)
    assert np.array_equal(cuda.head_permute(w, heads), want)
    assert cuda.transform(w, "p3.T").shape == (4, 12)


def test_pack_unpack_round_trip(tmp_path):
    """An ONNX model whose big weights are GGUF tensors dequantised, transposed and
    head-permuted: packed to blocks + skeleton, rebuilt bit for bit."""
    rng = np.random.default_rng(1)
    tensors = {
        "a": ("Q4_1", (256, 256), _blocks("Q4_1", 65536, rng)),
        "b": ("Q8_0", (512, 128), _blocks("Q8_0", 65536, rng)),
        "c": ("Q4_1", (256, 256), _blocks("Q4_1", 65536, rng)),
        "norm": ("F32", (256,), rng.standard_normal(256).astype(np.float32).tobytes()),
    }
    deq = {k: cuda.dequantize(q, raw, s) for k, (q, s, raw) in tensors.items()}
    inits = {"wa": cuda.transform(deq["a"], "T"), "wb": cuda.transform(deq["b"], "id"),
             "wc": cuda.transform(deq["c"], "p4.T"), "small": np.ones((4, 4), np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["h"]),
             helper.make_node("MatMul", ["h", "wc"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    dense = tmp_path / "dense"
    dense.mkdir()
    onnx.save(helper.make_model(g), str(dense / "model.onnx"))
    (dense / "config.json").write_text("{}")
    meta = cuda.pack_from_blocks(dense, tensors, tmp_path / "payload", heads=(4, 2))
    assert meta["unmatched_large"] == []
    assert {k: (e["tensor"], e["how"]) for k, e in meta["initializers"].items()} == {
        "wa": ("a", "T"), "wb": ("b", "id"), "wc": ("c", "p4.T")}
    assert (tmp_path / "payload" / "weights.bin").stat().st_size == sum(
        len(tensors[k][2]) for k in "abc")
    out = cuda.unpack(tmp_path / "payload", tmp_path / "rebuilt")
    assert (out / "config.json").is_file()
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    for k, v in inits.items():
        assert np.array_equal(got[k], v), k
    # a damaged block is refused, not silently used
    blob = bytearray((tmp_path / "payload" / "weights.bin").read_bytes())
    blob[100] ^= 0xFF
    (tmp_path / "payload" / "weights.bin").write_bytes(bytes(blob))
    with pytest.raises(SystemExit, match="checksum"):
        cuda.unpack(tmp_path / "payload", tmp_path / "rebuilt2")


def test_pack_copy_round_trip(tmp_path):
    dense = tmp_path / "d"
    dense.mkdir()
    onnx.save(tc.matmul_chain(), str(dense / "model.onnx"))
    cuda.pack_copy(dense, tmp_path / "p")
    out = cuda.unpack(tmp_path / "p", tmp_path / "r")
    assert (out / "model.onnx").read_bytes() == (dense / "model.onnx").read_bytes()


def test_placement_from_trace(tmp_path):
    ev = [{"cat": "Node", "name": "mm_kernel_time", "args": {"op_name": "MatMulNBits",
                                                             "provider": "CPUExecutionProvider"}},
          {"cat": "Node", "name": "shape_kernel_time",
           "args": {"op_name": "Shape", "provider": "CPUExecutionProvider",
                    "output_type_shape": [{"int64": [3]}]}},
          {"cat": "Node", "name": "mul_kernel_time",
           "args": {"op_name": "Mul", "provider": "CPUExecutionProvider",
                    "output_type_shape": [{"float": [1, 128, 576]}]}},
          {"cat": "Node", "name": "add_kernel_time", "args": {"op_name": "Add",
                                                              "provider": "CUDAExecutionProvider"}},
          {"cat": "Node", "name": "rope_kernel_time",
           "args": {"op_name": "MatMul", "provider": "CPUExecutionProvider",
                    "input_type_shape": [{"float": [1, 32, 1]}, {"float": [1, 1, 16]}]}},
          {"cat": "Session", "name": "model_run"}]
    p = tmp_path / "t.json"
    p.write_text(json.dumps(ev))
    pl = cuda.placement_from_trace(str(p), "CUDAExecutionProvider")
    assert pl["nodes"] == 5 and pl["fallback_ops"] == {"MatMulNBits": 1, "Mul": 1}
    assert not pl["on_ep"]
    assert cuda.placement_from_trace(str(p), "CPUExecutionProvider")["fallback_ops"] == {}


@pytest.mark.parametrize("name", list(tc.QUANT_FORMS))
def test_quantised_forms_on_the_cpu_ep(tmp_path, name):
    """What test_cuda checks on CUDA, on the CPU EP: the forms compress, load, agree."""
    tc.test_quantised_forms_placed_on_cuda(tmp_path, name, provider="cpu")


def test_quantised_embedding_on_the_cpu_ep(tmp_path):
    tc.test_quantised_embedding_on_cuda(tmp_path, provider="cpu")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    from fixtures_export import save_tiny

    from lrc.exporters import export

    root = tmp_path_factory.mktemp("tiny")
    save_tiny("llama", root / "llama-hf", seed=3)
    export(root / "llama-hf", root / "llama", exporter="optimum")
    save_tiny("bert", root / "bert-hf", seed=4)
    export(root / "bert-hf", root / "bert")
    return root


@pytest.mark.slow
def test_run_check_on_tiny_models(tiny_models, tmp_path, capsys):
    """``cuda.py run --check``: the device's code path on the CPU EP, tiny settings."""
    out = tmp_path / "out"
    rc = cuda.main(["run", "--check", "--out", str(out), "--work", str(tmp_path / "work"),
                    "--jobs", "1", "--threads", "1",
                    "--model", f"llama={tiny_models / 'llama'}",
                    "--model", f"bert={tiny_models / 'bert'}"])
    assert rc == 0
    res = json.loads((out / "cuda-results.json").read_text())
    assert res["mode"] == "check" and res["machine"]["ep"] == "cpu"
    assert "skipped" in res["tests"]["summary"] or "passed" in res["tests"]["summary"]
    names = [n for n, _ in cuda.VARIANTS]
    for label, kind in (("llama", "decoder"), ("bert", "encoder")):
        rec = res["models"][label]
        assert rec["kind"] == kind and "error" not in rec, rec.get("error")
        built = {v["name"]: v for v in rec["variants"]}
        assert list(built) == names
        failed = {n: v["error"] for n, v in built.items() if "error" in v}
        assert not failed, failed
        assert all(v["placement"]["on_ep"] for v in built.values())  # the CPU EP has them all
        phases = {(r["variant"], r["phase"]) for r in rec["bench"]["runs"]}
        want = {"prefill", "decode"} if kind == "decoder" else {"encoder"}
        assert phases == {(n, ph) for n in names for ph in want}
    md = (out / "cuda-section.md").read_text()
    assert md.startswith(cuda.BEGIN) and md.rstrip().endswith(cuda.END)
    assert "NOT a CUDA measurement" in md and "lowrank-0.5" in md
    # a --check result never lands in BENCHMARKS.md
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# B\n")
    with pytest.raises(SystemExit, match="check"):
        cuda.main(["render", "--results", str(out / "cuda-results.json"), "--target", str(target)])
    assert target.read_text() == "# B\n"


def test_render_replaces_between_markers(tmp_path):
    res = {"mode": "cuda", "machine": {"gpu": "NVIDIA H200", "onnxruntime": "1.31.1", "ep": "cuda",
                                       "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                       "python": "3.12", "cores": 16, "date": "2026-12-01"},
           "models": {"m": {"kind": "encoder", "variants": [
               {"name": "dense", "size_bytes": 1e6, "placement": {"on_ep": True}},
               {"name": "lrc-int8", "size_bytes": 5e5,
                "placement": {"on_ep": False, "fallback_ops": {"DynamicQuantizeMatMul": 3}}}],
               "bench": {"runs": [{"variant": "dense", "phase": "encoder", "batch": 1, "seq": 128,
                                   "p50_ms": 1.5, "speedup": 1.0}]}}},
           "notes": [], "tests": {"summary": "9 passed"}}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(res))
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# B\n\nbefore\n\n{cuda.BEGIN}\nold\n{cuda.END}\n\nafter\n")
    assert cuda.main(["render", "--results", str(p), "--target", str(target)]) == 0
    text = target.read_text()
    assert "old" not in text and "before" in text and "after" in text
    assert text.count(cuda.BEGIN) == 1 and "NVIDIA H200" in text
    assert "fallback: DynamicQuantizeMatMul x3" in text and "1.500 (1.00)" in text
    assert "not timed" in text


@pytest.mark.slow
def test_run_check_times_carried_folders_as_they_are(tiny_models, tmp_path):
    """``--prebuilt LABEL=NAME:DIR``: folders built elsewhere are placed and timed as they are,
    the first the reference; ``render`` puts several results' models side by side."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_models / "llama", tmp_path / "copy")
    rc = cuda.main(["run", "--check", "--no-tests", "--out", str(out), "--work", str(tmp_path / "w"),
                    "--prebuilt", f"t=first:{tiny_models / 'llama'}",
                    "--prebuilt", f"t=second:{tmp_path / 'copy'}",
                    "--prebuilt", f"t=missing:{tmp_path / 'nowhere'}"])
    assert rc == 0
    rec = json.loads((out / "cuda-results.json").read_text())["models"]["t"]
    assert rec["prebuilt"] and "error" not in rec, rec.get("error")
    assert [v["name"] for v in rec["variants"]] == ["first", "second", "missing"]
    assert "not carried" in rec["variants"][2]["error"]
    assert {(r["variant"], r["phase"]) for r in rec["bench"]["runs"]} == {
        (n, ph) for n in ("first", "second") for ph in ("prefill", "decode")}
    first = next(r for r in rec["bench"]["runs"] if r["variant"] == "first")
    assert first["speedup"] == pytest.approx(1.0)  # the reference
    a = json.loads((out / "cuda-results.json").read_text())
    b = dict(a, models={"u": rec}, notes=["n"])
    for name, res in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(res))
    target = tmp_path / "B.md"
    target.write_text("# B\n")
    cuda.render([tmp_path / "a.json", tmp_path / "b.json"], target, force_check=True)
    text = target.read_text()
    assert "### t (decoder)" in text and "### u (decoder)" in text and "- n (" in text
