"""Bounded memory: a large single-file model is spilled to external data and loaded lazily; the
outputs, statistics and written files are the same as without; the temporary folder goes.

Tiny synthetic graphs with the spill threshold lowered to 0 (every file counts as large), so
these run in seconds; benchmarks/memory.py measures the real peak RSS on SmolLM2."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import matmul_chain, run

from lrc.errors import LrcError
from lrc.graph import model as M


@pytest.fixture
def spill_all(monkeypatch):
    monkeypatch.setattr(M, "SPILL_THRESHOLD", 0)


def _feeds(d=64, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((2, 5, d)).astype(np.float32)}


@pytest.fixture
def chain(tmp_path):
    p = tmp_path / "m" / "model.onnx"
    p.parent.mkdir()
    onnx.save_model(matmul_chain(d=64, hidden=128), str(p))
    return p


def _spill_dir(model: ir.Model):
    sp = M.spilled(model)
    assert sp is not None, "the model was not spilled"
    return sp.dir


def test_large_single_file_loads_lazily_from_a_spill_folder(chain, spill_all):
    m = M.load(chain)
    folder = _spill_dir(m)
    assert (folder / M.SPILL_DATA).is_file()
    kinds = {v.name: v.const_value for v in m.graph.initializers.values()}
    big = {k: t for k, t in kinds.items() if t.nbytes > 1024}
    assert big and all(isinstance(t, ir.ExternalTensor) for t in big.values())
    # nothing was read into memory: no array materialised, no file mapped
    assert all(t._array is None and t.raw is None for t in big.values())
    assert not isinstance(kinds["bias"], ir.ExternalTensor)  # 512 bytes: stays inline
    # offsets are page-aligned (runtimes may map them) and the values are the file's
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(chain)).graph.initializer}
    for k, t in big.items():
        assert t.offset % 4096 == 0
        np.testing.assert_array_equal(t.numpy(), ref[k])
    assert m.meta["lrc.source_path"] == str(chain)
    # a weight read is a copy; the file is not left mapped (its pages would stay resident)
    t = big["model.layers.0.mlp.up_proj.weight"]
    a, b = t.numpy(), np.asarray(t)
    assert t.raw is None and t._array is None and a is not b
    np.testing.assert_array_equal(a, b)
    assert t.tobytes() == a.tobytes() and t.raw is None


def test_external_data_model_is_read_on_use(chain, tmp_path):
    """A model that already has external data is not spilled, but read the same way."""
    out = M.save(M.load(chain), tmp_path / "ext.onnx", external_data=True)
    m = M.load(out)
    assert M.spilled(m) is None
    t = m.graph.initializers["model.layers.0.mlp.down_proj.weight"].const_value
    assert isinstance(t, M.DiskTensor)
    t.numpy()
    assert t.raw is None
    np.testing.assert_array_equal(run(str(M.save(m, tmp_path / "back.onnx")), _feeds())[0],
                                  run(str(chain), _feeds())[0])


def test_small_file_is_not_spilled(chain):
    m = M.load(chain)  # default threshold: 256 MB
    assert M.spilled(m) is None
    assert not any(isinstance(v.const_value, ir.ExternalTensor)
                   for v in m.graph.initializers.values())


def test_spill_folder_removed_when_the_model_goes(chain, spill_all):
    m = M.load(chain)
    folder = _spill_dir(m)
    assert folder.is_dir()
    del m
    gc.collect()
    assert not folder.exists()


def test_two_loads_share_one_spill_until_the_file_changes(chain, spill_all):
    a, b = M.load(chain), M.load(chain)
    assert M.spilled(a) is M.spilled(b)
    assert M.external_folder(chain) == _spill_dir(a)
    onnx.save_model(matmul_chain(d=64, hidden=128, seed=7), str(chain))
    c = M.load(chain)
    assert M.spilled(c) is not M.spilled(a)
    np.testing.assert_array_equal(
        c.graph.initializers["model.layers.0.mlp.up_proj.weight"].const_value.numpy(),
        onnx.numpy_helper.to_array(next(t for t in onnx.load(str(chain)).graph.initializer
                                        if t.name == "model.layers.0.mlp.up_proj.weight")))
    del a, b, c
    gc.collect()
    assert M.external_folder(chain) == chain.parent


def test_saved_output_stays_one_file_and_runs_the_same(chain, spill_all, tmp_path):
    want = run(str(chain), _feeds())
    m = M.load(chain)
    out = M.save(m, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx.data").exists()  # the source was one file: so is the output
    assert not M.external_files(out)
    got = run(str(out), _feeds())
    np.testing.assert_array_equal(got[0], want[0])
    # every written weight was unmapped again
    assert all(v.const_value.raw is None for v in m.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor))
    # and the model still reads after it (maps again)
    w = m.graph.initializers["model.layers.0.mlp.up_proj.weight"].const_value.numpy()
    assert w.shape == (64, 128)


def test_saved_with_external_data_runs_the_same(chain, spill_all, tmp_path):
    want = run(str(chain), _feeds())
    m = M.load(chain)
    out = M.save(m, tmp_path / "out.onnx", external_data=True)
    assert M.external_files(out) == {"out.onnx.data"}
    np.testing.assert_array_equal(run(str(out), _feeds())[0], want[0])
    assert all(v.const_value.raw is None for v in m.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor) and
               str(_spill_dir(m)) in str(v.const_value.base_dir))


def test_streamed_file_spills_again(chain, spill_all, tmp_path):
    """``_write_streaming`` writes one graph field per initializer; the spill merges them."""
    out = M.save(M.load(chain), tmp_path / "out.onnx")
    again = M.load(out)
    names = [v.name for v in again.graph.initializers.values()]
    assert names == [t.name for t in onnx.load(str(chain)).graph.initializer]
    np.testing.assert_array_equal(
        run(str(M.save(again, tmp_path / "again.onnx")), _feeds())[0], run(str(chain), _feeds())[0])


def test_header_read_skips_weights(chain, spill_all):
    proto, p = M.load_proto(chain)
    assert p == chain
    w = {t.name: t for t in proto.graph.initializer}["model.layers.0.mlp.up_proj.weight"]
    assert list(w.dims) == [64, 128] and not w.raw_data and w.data_type == onnx.TensorProto.FLOAT
    assert M.external_files(chain) == set()


def test_header_read_skips_weights_below_the_spill_threshold(chain, monkeypatch):
    """A file too small to spill but above SCAN_MIN_BYTES is still read for its graph without
    its weights (bytes and parsed message would be two copies); weights=True reads them."""
    monkeypatch.setattr(M, "SCAN_MIN_BYTES", 1024)
    assert chain.stat().st_size < M.SPILL_THRESHOLD
    w = {t.name: t for t in M.load_proto(chain)[0].graph.initializer}
    assert list(w["model.layers.0.mlp.up_proj.weight"].dims) == [64, 128]
    big = [n for n, t in w.items() if "proj.weight" in n]
    assert big and not any(w[n].raw_data for n in big)
    full = {t.name: t for t in M.load_proto(chain, weights=True)[0].graph.initializer}
    assert all(full[n].raw_data for n in big)
    # the size and the onnx checker read it the same way (its graph, weights left on disk)
    scans = []
    real = M._scan
    monkeypatch.setattr(M, "_scan", lambda *a, **k: scans.append(a[0]) or real(*a, **k))
    assert M.file_size(chain) == chain.stat().st_size and scans
    with M.graph_file(chain) as g:
        assert g != chain and g.stat().st_size < chain.stat().st_size / 10
    assert M.structural_check(chain)["checker"] == "ok"


def test_truncated_large_file_is_one_clear_error(chain, spill_all, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(chain.read_bytes()[:-100])
    with pytest.raises(LrcError, match="not a valid ONNX model"):
        M.load(bad)
    assert not list(tmp_path.glob("lrc-weights-*"))


def test_session_finds_spilled_weights(chain, spill_all):
    from lrc.runtime.session import open_session

    m = M.load(chain)
    data = ir.serde.serialize_model(m).SerializeToString()  # external references only
    assert len(data) < 4096
    sess = open_session(data, path=chain)
    np.testing.assert_array_equal(sess.run(None, _feeds())[0], run(str(chain), _feeds())[0])


def test_calibration_statistics_identical_with_the_spill(chain, monkeypatch):
    from lrc.calibration.stats import collect_stats

    names = ["h0", "h3"]  # inputs of up_proj and down_proj: computed by the session
    batches = [_feeds(seed=i) for i in range(3)]
    want = collect_stats(chain, names, batches)
    monkeypatch.setattr(M, "SPILL_THRESHOLD", 0)
    spills = []
    real = M.spilled_proto
    monkeypatch.setattr(M, "spilled_proto", lambda p: spills.append(p) or real(p))
    got = collect_stats(chain, names, batches)
    assert spills, "calibration did not go through the spill"
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k].xtx, want[k].xtx, rtol=1e-12)
        assert got[k].n == want[k].n
    gc.collect()
    assert M.external_folder(chain) == chain.parent  # the spill made for calibration is gone


def test_checks_read_the_graph_without_its_weights(chain, spill_all, tmp_path, monkeypatch):
    from lrc.runtime.session import check_loads

    parsed = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model",
                        lambda p, **kw: parsed.append(p) or real(p, **kw))
    assert M.structural_check(chain) == {"checker": "ok", "shape_inference": "ok"}
    assert parsed and parsed[0] != str(chain) and "lrc-weights-" in parsed[0]
    assert check_loads(chain) == {"ort_cpu_session": "ok"}
    gc.collect()
    assert M.external_folder(chain) == chain.parent
    bad = tmp_path / "bad.onnx"  # the error names the user's file, not the spill folder
    m = onnx.load(str(chain))
    m.graph.node[0].op_type = "NoSuchOp"
    onnx.save_model(m, str(bad))
    with pytest.raises(LrcError, match="bad.onnx"):
        check_loads(bad)


def test_if_branches_round_trip_through_the_spill(tmp_path, spill_all):
    """Weights inside ``If`` branches (merged decoders) stay in the graph; outer weights spill."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(3)
    w = numpy_helper.from_array(r.standard_normal((64, 64)).astype(np.float32), "w_outer")
    wb = numpy_helper.from_array(r.standard_normal((64, 64)).astype(np.float32), "w_branch")

    def branch(name, weight_inits, weight):
        return helper.make_graph([helper.make_node("MatMul", ["x", weight], [f"{name}_y"])],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y",
                                                                          TensorProto.FLOAT, None)],
                                 weight_inits)

    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", [wb], "w_branch"),
                            else_branch=branch("else", [], "w_outer"))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
                                        helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [w])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    src = tmp_path / "if.onnx"
    onnx.save_model(proto, str(src))
    x = r.standard_normal((2, 64)).astype(np.float32)
    m = M.load(src)
    assert isinstance(m.graph.initializers["w_outer"].const_value, ir.ExternalTensor)
    out = M.save(m, tmp_path / "out.onnx")
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_array_equal(run(str(out), feeds)[0], run(str(src), feeds)[0])


def test_spill_folders_of_dead_processes_are_swept(chain, spill_all, tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f"lrc-weights-{p.pid}-abc"
    stale.mkdir()
    (stale / M.SPILL_DATA).write_bytes(b"x")
    mine = tmp_path / f"lrc-weights-{__import__('os').getpid()}-keep"
    mine.mkdir()
    m = M.load(chain)
    assert _spill_dir(m).parent == tmp_path
    assert not stale.exists() and mine.exists()


# --------------------------------------------------------------------------------------------
# New weights on disk (Store), sliced statistics, the update's memory
# --------------------------------------------------------------------------------------------


def _npz_batches(folder, n=3, d=64):
    folder.mkdir()
    for i in range(n):
        np.savez(folder / f"b{i}.npz", **_feeds(d=d, seed=10 + i))
    return folder


def _compress(src, out, **kw):
    from lrc.pipeline import CompressConfig, compress_model

    model, report = compress_model(src, CompressConfig.of(**kw))
    M.save(model, out)
    return model, report


def test_new_factors_wait_on_disk_and_write_the_same_file(chain, tmp_path, monkeypatch):
    """A loaded model's factors go to its Store as they are made (DiskTensors), the written
    file is byte for byte the one an in-memory run writes, single file, and the store's folder
    goes with the model."""
    monkeypatch.setattr(M, "STORE_MIN_BYTES", 0)
    model, _ = _compress(chain, tmp_path / "disk.onnx", ratio=0.5, method="svd")
    stored = [v.const_value for v in model.graph.initializers.values()
              if M.is_stored(v.const_value)]
    assert len(stored) >= 6 and all(isinstance(t, M.DiskTensor) for t in stored)
    folder = model.graph.meta["lrc.store"].dir
    assert (folder / M.STORE_DATA).is_file()
    assert all(t.offset % 4096 == 0 and t.raw is None for t in stored)  # read on use only
    assert not (tmp_path / "disk.onnx.data").exists()  # stored tensors are not "external"
    monkeypatch.setattr(M, "STORE_MIN_BYTES", 1 << 60)  # nothing stored: all in memory
    mem, _ = _compress(chain, tmp_path / "mem.onnx", ratio=0.5, method="svd")
    assert not any(M.is_stored(v.const_value) for v in mem.graph.initializers.values())
    assert (tmp_path / "disk.onnx").read_bytes() == (tmp_path / "mem.onnx").read_bytes()
    del model, stored
    gc.collect()
    assert not folder.exists()


def test_update_factors_kept_on_disk_give_the_same_model(chain, tmp_path, monkeypatch):
    """The update keeps each unit's factors in the Store until the pass writes them, and
    releases each rewrite once its segment is built: the same file as with all in memory."""
    batches = _npz_batches(tmp_path / "in")
    kw = dict(ratio=0.5, method="svd-llm", update=True, calib_inputs=[batches],
              dense_edges=False)
    monkeypatch.setattr(M, "STORE_MIN_BYTES", 0)
    model, report = _compress(chain, tmp_path / "disk.onnx", **kw)
    assert report["method"] == "svd-llm+update" and "fallback" not in report["calibration"]
    monkeypatch.setattr(M, "STORE_MIN_BYTES", 1 << 60)
    _compress(chain, tmp_path / "mem.onnx", **kw)
    assert (tmp_path / "disk.onnx").read_bytes() == (tmp_path / "mem.onnx").read_bytes()


def test_segments_inline_stored_weights(chain, monkeypatch):
    """A graph handed to ONNX Runtime never points at a store's file (the session reads the
    model's own folder): cut segments and calibration bytes carry those weights inline."""
    from lrc.calibration.stats import _serialized
    from lrc.graph.expose import cut_segment, layout

    monkeypatch.setattr(M, "STORE_MIN_BYTES", 0)
    m = M.load(chain)
    v = m.graph.initializers["model.layers.0.mlp.up_proj.weight"]
    w = v.const_value.numpy()
    v.const_value = M.new_tensor(m.graph, w * 2, v.name)
    assert M.is_stored(v.const_value)
    proto = onnx.ModelProto.FromString(_serialized(m))
    t = {i.name: i for i in proto.graph.initializer}[v.name]
    assert t.data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), w * 2)
    lay = layout(m.graph)
    seg = cut_segment(m, lay, 0, len(lay.nodes), list(m.graph.outputs), {"x": np.float32})
    t = {i.name: i for i in seg.proto.graph.initializer}[v.name]
    assert t.data_location == onnx.TensorProto.DEFAULT and not t.external_data


def test_statistics_in_slices_are_the_statistics(chain, tmp_path, monkeypatch):
    """Past the Gram budget, statistics are computed a slice of the inputs at a time, in the
    order they are read: by segments of a fresh load of the file (one walk through the graph,
    resumed slice after slice), or in one session per slice when the graph cannot be cut; the
    factors are those of one pass either way."""
    from lrc.calibration import sequential as Q
    from lrc.calibration import stats as S

    assert S.slices(["a", "b", "c", "d"], {"a": 4, "b": 4, "c": 8, "d": 2}, 300) == \
        [["a", "b"], ["c"], ["d"]]  # 128 + 128 bytes fit 300; c's 512 alone; a run of one
    batches = _npz_batches(tmp_path / "in")
    kw = dict(ratio=0.5, method="svd-llm", update=False, calib_inputs=[batches])
    _compress(chain, tmp_path / "one.onnx", **kw)
    want = run(str(tmp_path / "one.onnx"), _feeds())[0]
    monkeypatch.setenv("LRC_GRAM_MB", str(64 * 64 * 8 / 1024**2))  # one 64-wide Gram per slice
    seen, runners = [], []
    real_call, real_init = Q.SegmentStats.__call__, Q.SegmentStats.__init__

    def call(self, names, b):
        seen.append(list(names))
        return real_call(self, names, b)

    monkeypatch.setattr(Q.SegmentStats, "__call__", call)
    monkeypatch.setattr(Q.SegmentStats, "__init__",
                        lambda self, *a, **k: runners.append(self) or real_init(self, *a, **k))
    _compress(chain, tmp_path / "seg.onnx", **kw)
    assert len(seen) >= 2 and all(len(p) == 1 for p in seen)
    assert len({n for p in seen for n in p}) == len(seen)  # each slice computed once
    assert runners[0].passes == 1  # resumed, never restarted from the inputs
    np.testing.assert_allclose(run(str(tmp_path / "seg.onnx"), _feeds())[0], want,
                               rtol=1e-5, atol=1e-6)
    # a graph that cannot be cut: one session per slice
    def refuse(self, *a, **k):
        raise Q.SegmentError("cannot cut")

    monkeypatch.setattr(Q.SegmentStats, "__init__", refuse)
    computed = []
    real = S.collect_stats
    monkeypatch.setattr(S, "collect_stats", lambda m, names, *a, **k:
                        computed.append(list(names)) or real(m, names, *a, **k))
    _compress(chain, tmp_path / "sliced.onnx", **kw)
    assert len(computed) >= 2 and all(len(p) == 1 for p in computed)
    np.testing.assert_allclose(run(str(tmp_path / "sliced.onnx"), _feeds())[0], want,
                               rtol=1e-5, atol=1e-6)


def test_sliced_statistics_read_out_of_order_recompute():
    from lrc.calibration.stats import SlicedStats

    calls = []

    def compute(part):
        calls.append(tuple(part))
        return {n: f"stats of {n}" for n in part}

    s = SlicedStats(compute, [["a", "b"], ["c"]])
    assert s["a"] == "stats of a" and s["b"] == "stats of b" and s["c"] == "stats of c"
    assert calls == [("a", "b"), ("c",)] and s.passes == 2
    assert s.get("zzz") is None and len(s) == 3 and set(s) == {"a", "b", "c"}
    assert s["a"] == "stats of a" and s.passes == 3  # back to the first slice: computed again


def test_bad_gram_budget_is_one_line(monkeypatch):
    from lrc.calibration.stats import gram_budget

    monkeypatch.setenv("LRC_GRAM_MB", "lots")
    with pytest.raises(LrcError, match="LRC_GRAM_MB"):
        gram_budget()


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_data_release_drops_cached_corpora():
    pytest.importorskip("gensim")
    from lrc import data

    data.calibration_texts(n_tokens=2000)
    assert data._eval_ngrams.cache_info().currsize == 1
    data.release()
    assert data._eval_ngrams.cache_info().currsize == 0
    assert data.calibration_texts(n_tokens=2000)  # read again on the next call


def test_prefer_mmap_is_harmless():
    from lrc.sysmem import prefer_mmap, trim

    assert isinstance(prefer_mmap(), bool)
    trim()
    assert np.ones(1 << 20).sum() == 1 << 20


def test_wide_correction_by_column_blocks_is_the_same(monkeypatch):
    """A head's correction (and the whitened norms around it) is computed a block of columns
    at a time: the same factors and errors as in one piece."""
    from lrc import quantmath as Q

    r = np.random.default_rng(0)
    x = r.standard_normal((200, 24))
    g = x.T @ x
    e = r.standard_normal((24, 300)).astype(np.float32)
    want = Q.correction_factors(e, g, 5)
    w_norm, w_err = Q.whitened_norm2(e, g), Q.whitened_error(e, e * 0.9, g)
    w_left = Q.whitened_norm2(e, g, minus=(want.a, want.b))
    monkeypatch.setattr(Q, "COLUMNS", 7)
    got = Q.correction_factors(e, g, 5)
    np.testing.assert_allclose(got.a @ got.b, want.a @ want.b, rtol=1e-4, atol=1e-5)
    assert got.rel_error == pytest.approx(want.rel_error, rel=1e-9)
    assert got.energy == pytest.approx(want.energy, rel=1e-9)
    # G·M in float32 there (and in the error's ‖X·W‖): another column blocking sums in
    # another order
    assert Q.whitened_norm2(e, g) == pytest.approx(w_norm, rel=1e-7)
    assert Q.whitened_error(e, e * 0.9, g) == pytest.approx(w_err, rel=1e-7)
    assert Q.whitened_norm2(e, g, minus=(want.a, want.b)) == pytest.approx(w_left, rel=1e-9)
    d = e.astype(np.float64) - want.a.astype(np.float64) @ want.b.astype(np.float64)
    assert w_left == pytest.approx(float(np.sum((g @ d) * d)), rel=1e-9)


def test_wide_quantisation_by_column_blocks_is_the_same(monkeypatch):
    from lrc import quantmath as Q

    w = np.random.default_rng(1).standard_normal((64, 50)).astype(np.float32)
    for bits in (4, 8):
        want = Q.quantize_blockwise(w, bits, 32)
        monkeypatch.setattr(Q, "COLUMNS", 7)
        got = Q.quantize_blockwise(w, bits, 32)
        monkeypatch.setattr(Q, "COLUMNS", 4096)
        np.testing.assert_array_equal(got.packed, want.packed)
        np.testing.assert_array_equal(got.scales, want.scales)
        assert (got.k, got.n) == (want.k, want.n)
        np.testing.assert_array_equal(Q.dequantize(Q.columns(want, slice(3, 9))),
                                      Q.dequantize(want)[:, 3:9])


def test_wide_dequantisation_by_column_blocks_is_the_same(monkeypatch):
    from lrc import quantmath as Q

    w = np.random.default_rng(2).standard_normal((64, 50)).astype(np.float32)
    bq = Q.quantize_blockwise(w, 4, 32)
    want = Q.dequantize(bq)
    monkeypatch.setattr(Q, "COLUMNS", 7)
    np.testing.assert_array_equal(Q.dequantize(bq), want)


def test_values_that_do_not_depend_on_inputs_are_recomputed_not_carried(tmp_path):
    """An exporter's Transpose of a (tied) table is static: no cut carries it (a copy per
    calibration batch), the segment that reads it recomputes it, and the statistics gathered
    by segments are those of one session."""
    from onnx import TensorProto, helper, numpy_helper

    from lrc.calibration.sequential import SegmentStats
    from lrc.calibration.stats import collect_stats
    from lrc.graph.expose import layout
    from lrc.graph.locate import locate

    r = np.random.default_rng(0)
    w = numpy_helper.from_array(r.standard_normal((16, 16)).astype(np.float32), "model.layers.0.mlp.up_proj.weight")
    e = numpy_helper.from_array(r.standard_normal((40, 16)).astype(np.float32), "model.embed_tokens.weight")
    nodes = [helper.make_node("Transpose", ["model.embed_tokens.weight"], ["emb_t"], perm=[1, 0],
                              name="/t/Transpose"),
             helper.make_node("MatMul", ["x", "model.layers.0.mlp.up_proj.weight"], ["h"],
                              name="/model/layers.0/mlp/up_proj/MatMul"),
             helper.make_node("Relu", ["h"], ["a"], name="/model/layers.0/act/Relu"),
             helper.make_node("MatMul", ["a", "emb_t"], ["logits"], name="/lm_head/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5, 40])],
                          [w, e])
    p = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    m = M.load(p)
    lay = layout(m.graph)
    t_out = next(v for v in lay.values.values() if v.name == "emb_t")
    assert id(t_out) in lay.static
    assert all("emb_t" not in [v.name for v in lay.crossing(c)] for c in range(len(lay.nodes) + 1))
    readers = {t.node.inputs[0].name: t for t in locate(m)}
    assert set(readers) >= {"x", "a"}
    batches = [_feeds(d=16, seed=i) for i in range(3)]
    got = SegmentStats(m, {n: readers[n] for n in ("x", "a")}, model_path=p)(["x", "a"], batches)
    want = collect_stats(p, ["x", "a"], batches)
    for n in ("x", "a"):
        np.testing.assert_allclose(got[n].xtx, want[n].xtx, rtol=1e-6)


def test_disk_tensors_are_read_and_copied_without_a_mapping(tmp_path, monkeypatch):
    """A weight on disk is written by copying its file a chunk at a time (the single-file
    writer never holds it whole), and ``tobytes`` reads it instead of mapping it."""
    store = M.Store()
    a = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
    t = store.put(a, "w")
    assert t.tobytes() == a.tobytes() and t.raw is None
    with open(tmp_path / "copy", "wb") as f:
        assert t.write_to(f, chunk=4096) == a.nbytes  # 3 chunks
    assert (tmp_path / "copy").read_bytes() == a.tobytes()
    # the writer streams it: same file as the in-memory tensor's, tobytes never called
    g = ir.Graph([], [], nodes=[], initializers=[ir.Value(name="w", const_value=t)], name="g",
                 opset_imports={"": 18})
    m = ir.Model(g, ir_version=9)
    monkeypatch.setattr(M.DiskTensor, "tobytes", lambda self: pytest.fail("held whole"))
    M._write_streaming(m, tmp_path / "disk.onnx")
    g.initializers["w"].const_value = ir.tensor(a, name="w")
    M._write_streaming(m, tmp_path / "mem.onnx")
    assert (tmp_path / "disk.onnx").read_bytes() == (tmp_path / "mem.onnx").read_bytes()
