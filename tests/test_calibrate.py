"""Activation statistics (lrc.calibration.stats) on small synthetic graphs, checked against
numpy; models given as files and in memory."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrc.calibration import stats as calibrate
from lrc.calibration.stats import ActStats, cached_stats, collect_stats, load_stats, save_stats
from lrc.calibration.tokens import token_batches
from lrc.errors import LrcError

D, H, V = 8, 12, 40  # hidden, FFN width, vocab


def _model(seed: int = 0) -> onnx.ModelProto:
    """input_ids -> Gather(E) -> Add(b) = "h" -> MatMul W1 -> Relu = "r" -> MatMul W2 -> out;
    "h" also feeds MatMul W3 (a shared input, like Q/K/V). attention_mask is an (unused) input."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "E"),
        numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((H, D)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "W3"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], name="gather"),
        helper.make_node("Add", ["emb", "bias"], ["h"], name="add"),
        helper.make_node("MatMul", ["h", "W1"], ["y1"], name="fc1"),
        helper.make_node("Relu", ["y1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y2"], name="fc2"),
        helper.make_node("MatMul", ["h", "W3"], ["y3"], name="fc3"),
        helper.make_node("Add", ["y2", "y3"], ["out"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", D])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reference(model: onnx.ModelProto, feeds_list, names):
    """The same tensors from a plain ORT session with the tensors added as outputs by hand."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {n: [] for n in names}
    for feeds in feeds_list:
        for n, v in zip(names, sess.run(names, feeds)):
            out[n].append(v)
    return out


def _feeds(rng, b, s, mask=None):
    ids = rng.integers(0, V, size=(b, s)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64) if mask is None else mask}


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture()
def tiny(tmp_path) -> Path:
    p = tmp_path / "tiny" / "model.onnx"
    p.parent.mkdir()
    onnx.save(_model(), p)
    return p


def test_xtx_matches_numpy(tiny):
    rng = np.random.default_rng(1)
    batches = [_feeds(rng, 2, 5), _feeds(rng, 1, 7), _feeds(rng, 3, 4)]
    stats = collect_stats(tiny, ["h", "r"], batches, threads=1)
    ref = _reference(onnx.load(tiny), batches, ["h", "r"])
    for name, d in (("h", D), ("r", H)):
        x = np.concatenate([v.reshape(-1, d) for v in ref[name]]).astype(np.float64)
        s = stats[name]
        assert s.name == name and s.n == 10 + 7 + 12 and s.d == d
        assert s.xtx.dtype == np.float64 and s.xtx.shape == (d, d)
        assert _rel(s.xtx, x.T @ x) < 1e-9
        assert _rel(s.abs_mean, np.abs(x).mean(0)) < 1e-9
        assert _rel(s.sq_mean, (x * x).mean(0)) < 1e-9
    # The intermediate tensors themselves are what numpy computes from the weights.
    m = onnx.load(tiny)
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    h = w["E"][batches[0]["input_ids"]] + w["bias"]
    np.testing.assert_allclose(ref["h"][0], h, rtol=1e-6)
    np.testing.assert_allclose(ref["r"][0], np.maximum(h @ w["W1"], 0), rtol=1e-5, atol=1e-5)


def test_shared_inputs_deduplicated_and_single_run(tiny, monkeypatch):
    rng = np.random.default_rng(2)
    batches = [_feeds(rng, 1, 6) for _ in range(3)]
    runs = []
    real = calibrate.open_session

    def spy(*a, **k):
        sess = real(*a, **k)

        class Wrapped:
            lrc_path = sess.lrc_path

            def run(self, names, feeds):
                if names is not None:  # not the Gram product's session
                    runs.append(list(names))
                return sess.run(names, feeds)

            def __getattr__(self, item):
                return getattr(sess, item)

        return Wrapped()

    monkeypatch.setattr(calibrate, "open_session", spy)
    stats = collect_stats(tiny, ["h", "h", "r", "h"], batches)  # fc1 and fc3 both read "h"
    assert list(stats) == ["h", "r"]
    assert runs == [["h", "r"]] * 3  # one run per batch, all tensors at once


def test_token_id_batches_and_mask(tiny):
    """Token-id arrays get feeds built for them; rows with attention_mask 0 are excluded."""
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, V, size=(1, 9)), rng.integers(0, V, size=(1, 4))]
    from_ids = collect_stats(tiny, ["h"], ids)
    ref = collect_stats(tiny, ["h"], [{"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids])
    assert from_ids["h"].n == 13
    np.testing.assert_array_equal(from_ids["h"].xtx, ref["h"].xtx)

    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    padded = _feeds(rng, 2, 5, mask=mask)
    s = collect_stats(tiny, ["h", "r"], [padded])
    ref = _reference(onnx.load(tiny), [padded], ["h", "r"])
    for name in ("h", "r"):
        x = ref[name][0][mask.astype(bool)].astype(np.float64)
        assert s[name].n == 8
        assert _rel(s[name].xtx, x.T @ x) < 1e-9
        assert _rel(s[name].abs_mean, np.abs(x).mean(0)) < 1e-9


def test_graph_input_and_errors(tiny):
    rng = np.random.default_rng(4)
    feeds = _feeds(rng, 1, 3)
    feeds["attention_mask"] = feeds["attention_mask"].astype(np.int64)
    with pytest.raises(LrcError, match="initializer"):
        collect_stats(tiny, ["W1"], [feeds])
    with pytest.raises(LrcError, match="not produced"):
        collect_stats(tiny, ["nope"], [feeds])
    with pytest.raises(LrcError, match="no such file"):
        collect_stats(tiny.parent / "missing.onnx", ["h"], [feeds])


def test_external_data(tmp_path, tiny, monkeypatch):
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(_model(), ext, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    assert (ext.parent / "model.onnx.data").is_file()
    assert ext.stat().st_size < 2000  # the weights really are outside
    rng = np.random.default_rng(5)
    batches = [_feeds(rng, 2, 6) for _ in range(2)]
    monkeypatch.chdir(tmp_path)  # the data is found relative to the model, not the cwd
    a = collect_stats(ext, ["h", "r"], batches)
    b = collect_stats(tiny, ["h", "r"], batches)
    for n in ("h", "r"):
        np.testing.assert_array_equal(a[n].xtx, b[n].xtx)
    # The fingerprint covers the external data file.
    before = calibrate.model_fingerprint(ext)
    data = ext.parent / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert calibrate.model_fingerprint(ext) != before


def test_actstats_roundtrip(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((10, 4))
    s = ActStats("a/b:0", x.T @ x, np.abs(x).mean(0), (x * x).mean(0), 10)
    s.save(tmp_path / "one.npz")
    t = ActStats.load(tmp_path / "one.npz")
    assert t.name == s.name and t.n == 10
    np.testing.assert_array_equal(t.xtx, s.xtx)
    save_stats({"a/b:0": s, "c": t}, tmp_path / "many.npz", meta={"k": 1})
    many = load_stats(tmp_path / "many.npz")
    assert list(many) == ["a/b:0", "c"]
    np.testing.assert_array_equal(many["c"].abs_mean, s.abs_mean)


def _tokenizer(path: Path, cls_sep: bool = True) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(V - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.save(str(path))
    return path


def _texts(n_docs=6, words=50, seed=7):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, V - 3, size=words)) for _ in range(n_docs)]


def test_token_batches(tmp_path):
    tj = _tokenizer(tmp_path / "tokenizer.json")
    texts = _texts()
    wins = token_batches(tj, texts, n_tokens=45, seq_len=16)
    assert [w.shape for w in wins] == [(1, 16), (1, 16), (1, 13)]
    assert all(w.dtype == np.int64 and w[0, 0] == 1 and w[0, -1] == 2 for w in wins)
    body = np.concatenate([w[0, 1:-1] for w in wins])
    first = [int(t[1:]) + 3 for t in texts[0].split()]
    np.testing.assert_array_equal(body[:14], first[:14])  # text order, no gaps
    plain = token_batches(tj, texts, n_tokens=32, seq_len=16, bos=False)
    assert [w.shape[1] for w in plain] == [16, 16] and plain[0][0, 0] == first[0]
    forced = token_batches(_tokenizer(tmp_path / "t2.json", cls_sep=False), texts, 32, 16, bos="[CLS]")
    assert forced[0][0, 0] == 1 and forced[0][0, 1] == first[0]
    short = token_batches(tj, ["w1 w2 w3"], n_tokens=100, seq_len=16)
    assert [w.tolist() for w in short] == [[[1, 4, 5, 6, 2]]]
    with pytest.raises(LrcError):
        token_batches(tj, texts, n_tokens=10, seq_len=2)


def test_cache_hit_and_key(tiny, tmp_path, monkeypatch):
    _tokenizer(tiny.parent / "tokenizer.json")
    texts = _texts()
    cache = tmp_path / "cache"
    first = cached_stats(tiny, ["h", "r", "h"], texts, n_tokens=64, seq_len=16, cache_dir=cache)
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 1 and first["h"].n == 64

    def boom(*a, **k):
        raise AssertionError("cache miss: collect_stats ran")

    monkeypatch.setattr(calibrate, "collect_stats", boom)
    again = cached_stats(tiny, ["r", "h"], texts, n_tokens=64, seq_len=16, cache_dir=cache)
    assert set(again) == {"h", "r"}
    for n in ("h", "r"):
        np.testing.assert_array_equal(again[n].xtx, first[n].xtx)
        np.testing.assert_array_equal(again[n].abs_mean, first[n].abs_mean)
        assert again[n].n == first[n].n
    monkeypatch.undo()

    other = cached_stats(tiny, ["h", "r"], texts, n_tokens=48, seq_len=16, cache_dir=cache)
    assert other["h"].n == 48 and len(list(cache.glob("*.npz"))) == 2
    key = calibrate.stats_cache_key
    base = key(tiny, ["h", "r"], texts, 64, 16)
    assert base != key(tiny, ["h", "r"], texts, 64, 32)
    assert base != key(tiny, ["h"], texts, 64, 16)
    assert base != key(tiny, ["h", "r"], texts[:-1], 64, 16)
    assert base == key(tiny, ["r", "h", "h"], texts, 64, 16)
    onnx.save(_model(seed=1), tiny)  # other weights: other key
    assert base != key(tiny, ["h", "r"], texts, 64, 16)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "c"))
    assert calibrate.cache_dir_default() == tmp_path / "c" / "calib"
    monkeypatch.delenv("LRC_CACHE_DIR")
    assert calibrate.cache_dir_default() == Path.home() / ".cache" / "lrc" / "calib"


def test_in_memory_models_give_the_file_s_statistics(tiny, tmp_path):
    """A ModelProto, an onnx_ir.Model or serialized bytes: the same numbers as the file (the
    model passed in is not modified); external data is found beside ``path``."""
    import onnx_ir as ir

    from lrc.graph.model import load

    rng = np.random.default_rng(10)
    batches = [_feeds(rng, 2, 5), _feeds(rng, 1, 7)]
    ref = collect_stats(tiny, ["h", "r"], batches)
    proto = onnx.load(tiny)
    n_outputs = len(proto.graph.output)
    for model in (proto, ir.serde.deserialize_model(proto), proto.SerializeToString()):
        got = collect_stats(model, ["h", "r"], batches)
        for n in ("h", "r"):
            np.testing.assert_array_equal(got[n].xtx, ref[n].xtx)
    assert len(proto.graph.output) == n_outputs
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(_model(), ext, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    lazy = load(ext)  # weights left on disk; the file it came from is the default path
    got = collect_stats(lazy, ["h", "r"], batches)
    np.testing.assert_array_equal(got["r"].xtx, ref["r"].xtx)
    bare = onnx.load(ext, load_external_data=False)
    np.testing.assert_array_equal(collect_stats(bare, ["r"], batches, path=ext)["r"].xtx, ref["r"].xtx)
    with pytest.raises(LrcError, match="path="):
        calibrate.model_fingerprint(bare)


def test_in_memory_cache_key(tiny, tmp_path, monkeypatch):
    """An in-memory model is keyed by its serialized bytes: the same key as a file holding them,
    another key once it changes; a file's key does not depend on how it is passed."""
    tok = _tokenizer(tmp_path / "tokenizer.json")
    texts = _texts()
    proto = onnx.load(tiny)
    data = proto.SerializeToString()
    same = tmp_path / "same.onnx"
    same.write_bytes(data)
    key = calibrate.stats_cache_key
    assert key(proto, ["h"], texts, 64, 16, tok) == key(same, ["h"], texts, 64, 16, tok)
    assert calibrate.model_fingerprint(data) == calibrate.model_fingerprint(same)
    with pytest.raises(LrcError, match="tokenizer"):
        key(proto, ["h"], texts, 64, 16)  # nothing to find tokenizer.json beside
    cache = tmp_path / "cache"
    first = cached_stats(proto, ["h", "r"], texts, n_tokens=64, seq_len=16, cache_dir=cache,
                         tokenizer=tok)
    from_file = collect_stats(tiny, ["h", "r"], token_batches(tok, texts, 64, 16))
    np.testing.assert_array_equal(first["r"].xtx, from_file["r"].xtx)
    monkeypatch.setattr(calibrate, "collect_stats", lambda *a, **k: pytest.fail("cache miss"))
    again = cached_stats(proto, ["r", "h"], texts, n_tokens=64, seq_len=16, cache_dir=cache,
                         tokenizer=tok)
    np.testing.assert_array_equal(again["r"].xtx, first["r"].xtx)
    proto.graph.initializer[0].raw_data = bytes(len(proto.graph.initializer[0].raw_data))
    assert key(proto, ["h"], texts, 64, 16, tok) != key(same, ["h"], texts, 64, 16, tok)


MINILM = Path("/tmp/minilm_opt/model.onnx")


@pytest.mark.slow
@pytest.mark.skipif(not MINILM.is_file(), reason="needs the optimum MiniLM export at /tmp/minilm_opt")
def test_minilm_real(tmp_path):
    m = onnx.load(MINILM, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    targets = [n.input[0] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(targets) == 36
    texts = [("The quick brown fox jumps over the lazy dog. " * 40 + f"Story {i}.") for i in range(40)]
    batches = token_batches(MINILM.parent / "tokenizer.json", texts, n_tokens=2048, seq_len=128)
    assert all(b[0, 0] == 101 and b[0, -1] == 102 for b in batches)  # [CLS] .. [SEP]
    t0 = time.perf_counter()
    stats = collect_stats(MINILM, targets, batches, threads=os.cpu_count())
    dt = time.perf_counter() - t0
    assert len(stats) == 24  # Q/K/V share one input per layer: 4 distinct inputs x 6 layers
    for s in stats.values():
        assert s.n == 2048 and np.allclose(s.xtx, s.xtx.T)
        assert np.all(np.diag(s.xtx) >= 0) and np.all(s.abs_mean > 0)
        np.testing.assert_allclose(np.diag(s.xtx) / s.n, s.sq_mean, rtol=1e-9)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nMiniLM: {dt / 2.048:.3f} s per 1k tokens, peak RSS {peak_mb:.0f} MB")


def test_float32_precision_and_merge(tiny):
    rng = np.random.default_rng(8)
    batches = [_feeds(rng, 2, 5), _feeds(rng, 1, 7)]
    exact = collect_stats(tiny, ["r"], batches)["r"]
    fast = collect_stats(tiny, ["r"], batches, precision="float32")["r"]
    assert fast.xtx.dtype == np.float64 and _rel(fast.xtx, exact.xtx) < 1e-5
    with pytest.raises(LrcError, match="precision"):
        collect_stats(tiny, ["r"], batches, precision="half")
    a = collect_stats(tiny, ["r"], batches[:1])["r"]
    b = collect_stats(tiny, ["r"], batches[1:])["r"]
    ab = a.merged(b)
    assert ab.n == exact.n
    assert _rel(ab.xtx, exact.xtx) < 1e-12 and _rel(ab.abs_mean, exact.abs_mean) < 1e-12


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_gram_engines_agree(precision):
    x = np.random.default_rng(9).standard_normal((37, 11)).astype(np.float32)
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    ort_g = calibrate.Gram(precision, engine="ort")(x)
    np_g = calibrate.Gram(precision, engine="numpy")(x)
    tol = 1e-12 if precision == "float64" else 1e-5
    for g in (ort_g, np_g):
        assert g.dtype == np.float64 and _rel(g, ref) < tol
    x64 = x.astype(np.float64) * 3
    assert _rel(calibrate.Gram(precision)(x64), 9 * ref) < tol
