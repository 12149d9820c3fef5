"""lrc.quantize: ONNX Runtime's quantisers on what low rank left dense (or on the factors)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrc
import lrc.model  # noqa: F401  (public alias of lrc.graph.model)
from graphs import matmul_chain
from lrc.errors import LrcError
from lrc.quantize import factor_node_names, op_counts, quantize, quantize_rest

X = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)


def _run(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": X})[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """(dense file, low-rank folder, low-rank with int8 factors folder): up/down factorised at
    rank 8, o_proj left dense; the folders carry a tokenizer.json that must be copied."""
    root = tmp_path_factory.mktemp("q")
    dense = root / "dense.onnx"
    onnx.save(matmul_chain(d=16, hidden=32), dense)
    out = {}
    for name, int8 in (("lr", False), ("lr_i8f", True)):
        folder = root / name
        folder.mkdir()
        m, rep = lrc.compress(lrc.model.load(dense), rank=8, include=["ffn"], int8=int8,
                              int8_form="dynamic")
        assert rep["totals"]["rewritten"] == 2
        lrc.model.save(m, folder / "model.onnx")
        (folder / "tokenizer.json").write_text("{}")
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
        out[name] = folder
    return dense, out["lr"], out["lr_i8f"]


def _factor_meta_ops(path):
    m = onnx.load(str(path))
    return sorted(n.op_type for n in m.graph.node
                  if any(p.key == "lrc.factor" for p in n.metadata_props))


def test_rest_int8_quantizes_dense_and_keeps_float_factors(lowrank, tmp_path):
    dense, lr, _ = lowrank
    out = tmp_path / "q8"
    rep = quantize_rest(lr, out)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    ops = op_counts(out / "model.onnx")
    # o_proj -> DynamicQuantizeLinear + MatMulInteger; the 4 factor MatMuls stay float MatMuls
    assert ops.get("MatMulInteger") == 1 and ops.get("DynamicQuantizeLinear") == 1
    assert ops.get("MatMul") == 4
    assert _factor_meta_ops(out / "model.onnx") == ["MatMul"] * 4
    assert rep["quantized"] == 1 and rep["factor_matmuls"] == 4 and rep["factors_left_float"] == 4
    got, ref = _run(out / "model.onnx"), _run(lr / "model.onnx")
    assert _rel(got, ref) < 0.05
    assert "quantised 1 dense MatMuls" in rep["summary"]


def test_rest_int4_uses_matmulnbits_only_on_dense(lowrank, tmp_path):
    _, lr, _ = lowrank
    out = tmp_path / "q4"
    quantize_rest(lr, out, mode="int4", block_size=16)
    ops = op_counts(out / "model.onnx")
    assert ops.get("MatMulNBits") == 1 and ops.get("MatMul") == 4
    assert np.isfinite(_run(out / "model.onnx")).all()


def test_factors_only_weight_forms_8_and_4_bits(lowrank, tmp_path):
    _, lr, _ = lowrank
    for mode, bits in (("int8-weight", 8), ("int4", 4)):
        out = tmp_path / mode
        rep = quantize(lr, out, mode, targets="factors", block_size=16)
        m = onnx.load(str(out / "model.onnx"))
        nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
        assert len(nb) == 4 and rep["quantized"] == 4
        assert all({a.name: a.i for a in n.attribute}["bits"] == bits for n in nb)
        # the dense o_proj stays a float MatMul
        assert [n.name for n in m.graph.node if n.op_type == "MatMul"] == [
            "/model/layers.0/self_attn/o_proj/MatMul"]
        tol = 0.02 if bits == 8 else 0.3
        assert _rel(_run(out / "model.onnx"), _run(lr / "model.onnx")) < tol


def test_everything_int8_and_int8_factor_form_left_alone(lowrank, tmp_path):
    dense, lr, lr_i8f = lowrank
    out = tmp_path / "all8"
    rep = quantize_rest(lr, out, exclude_factors=False)
    assert op_counts(out / "model.onnx").get("MatMulInteger") == 5 and rep["kept_float"] == 0
    # lrc's own int8 factors (already MatMulInteger) + ORT on the rest: every product int8
    out2 = tmp_path / "i8f_rest8"
    rep2 = quantize_rest(lr_i8f, out2)
    ops = op_counts(out2 / "model.onnx")
    assert ops.get("MatMulInteger") == 5 and "MatMul" not in ops
    assert rep2["int8_factor_nodes"] == 4 and rep2["factor_matmuls"] == 0
    assert _rel(_run(out2 / "model.onnx"), _run(lr_i8f / "model.onnx")) < 0.05


def test_file_in_file_out_nothing_to_quantize_and_errors(lowrank, tmp_path):
    dense, lr, _ = lowrank
    out = tmp_path / "dense_q8.onnx"
    rep = quantize_rest(dense, out)  # no factors: every weight MatMul is "rest"
    assert rep["quantized"] == 3 and op_counts(out).get("MatMulInteger") == 3
    with pytest.raises(LrcError, match="exists"):
        quantize_rest(dense, out)
    quantize_rest(dense, out, force=True)
    with pytest.raises(LrcError, match="mode"):
        quantize(dense, tmp_path / "x.onnx", "int3")
    with pytest.raises(LrcError, match="block_size"):
        quantize(dense, tmp_path / "x.onnx", "int4", block_size=24)
    # only factors requested on a model without any: written unchanged
    rep = quantize(dense, tmp_path / "same.onnx", "int4", targets="factors")
    assert rep["quantized"] == 0 and op_counts(tmp_path / "same.onnx").get("MatMul") == 3
    assert not list(tmp_path.glob(".*tmp-*"))  # no temporary folder left behind


def test_unnamed_factor_nodes_get_names(tmp_path):
    m = matmul_chain(d=16, hidden=32, names=False)
    new, _ = lrc.compress(m, rank=8, include=["ffn"])
    p = ir_to_proto(new)
    for n in p.graph.node:
        n.name = ""
    src = tmp_path / "unnamed.onnx"
    onnx.save(p, src)
    assert factor_node_names(onnx.load(str(src))) == ["", "", "", ""]
    rep = quantize_rest(src, tmp_path / "out.onnx")
    assert rep["nodes_named"] > 0 and rep["quantized"] == 1
    assert op_counts(tmp_path / "out.onnx").get("MatMul") == 4


def ir_to_proto(model):
    import onnx_ir as ir

    return ir.serde.serialize_model(model)


def test_inplace_replaces_a_compressed_folder_and_file(lowrank, tmp_path):
    import shutil

    from lrc.quantize import quantize_rest_inplace

    _, lr, _ = lowrank
    folder = tmp_path / "c"
    shutil.copytree(lr, folder)
    (folder / "lrc.json").write_text("{}")
    rep = quantize_rest_inplace(folder, "int8")
    assert rep["output"] == str(folder / "model.onnx")
    assert op_counts(folder / "model.onnx").get("MatMulInteger") == 1
    assert (folder / "lrc.json").is_file() and (folder / "tokenizer.json").is_file()
    f = tmp_path / "c.onnx"
    shutil.copy(lr / "model.onnx", f)
    quantize_rest_inplace(f, "int4", block_size=16)
    assert op_counts(f).get("MatMulNBits") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "c.onnx"]  # nothing left behind
