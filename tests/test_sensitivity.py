"""The sensitivity probe: one ONNX Runtime session whose weights a run may replace."""

from __future__ import annotations

import numpy as np

from lrc.calibration.sensitivity import Probe
from test_evaluate import _weights, write_lm


def test_probe_measures_the_output_kl_of_replaced_weights(tmp_path):
    """The unchanged weights give KL 0; a larger change of a weight gives a larger KL; the
    session's own weights are untouched between runs (a run's values do not stick)."""
    w = _weights()
    folder = write_lm(tmp_path / "lm", w)
    batches = [np.array([1, 5, 9, 3, 7, 2, 11, 4]), np.array([1, 6, 6, 8, 12, 30])]
    p = Probe(folder / "model.onnx", ["W1", "W2"], batches)
    assert p({}) == 0.0 or abs(p({})) < 1e-7
    assert abs(p({"W1": w["W1"]})) < 1e-7
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(w["W1"].shape).astype(np.float32)
    small, big = p({"W1": w["W1"] + 0.05 * noise}), p({"W1": w["W1"] + 0.5 * noise})
    assert 0 < small < big
    assert abs(p({})) < 1e-7  # the replaced values did not stay in the session
    both = p({"W1": w["W1"] + 0.05 * noise, "W2": w["W2"] * 1.2})
    assert both > small


def test_probe_kl_is_the_mean_token_kl_of_the_logits(tmp_path):
    """The KL summed inside the session (dense logits and probabilities fed back, log-sum-exp
    of the changed ones) is the mean over every window's tokens of Σ p (log p − log q), from an
    independent numpy forward pass."""
    from test_evaluate import np_logits

    w = _weights()
    folder = write_lm(tmp_path / "lm", w)
    batches = [np.array([1, 5, 9, 3, 7, 2, 11, 4]), np.array([1, 6, 6, 8, 12, 30])]
    changed = {**w, "W2": w["W2"] + 0.3 * np.random.default_rng(2).standard_normal(
        w["W2"].shape).astype(np.float32)}

    def lsm(x):
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - x.max(-1, keepdims=True)

    kls = []
    for ids in batches:
        lp, lq = lsm(np_logits(w, ids)), lsm(np_logits(changed, ids))
        kls.extend(np.sum(np.exp(lp) * (lp - lq), axis=-1))
    got = Probe(folder / "model.onnx", ["W2"], batches)({"W2": changed["W2"]})
    assert got > 0 and np.isclose(got, np.mean(kls), rtol=1e-3), (got, np.mean(kls))


def test_probe_changes_a_tied_heads_table_apart_from_its_embedding(tmp_path):
    """A table read by a tied head and by the embedding (the model builder's
    Gather(Transpose(head weight)), optimum's Gather(table) + MatMul(Transpose(table))) is two
    probe inputs: the head's name, and ``embedding_inputs[name]`` for the Gather's side."""
    import onnx
    from graphs import builder_tied, tied_head

    rng = np.random.default_rng(0)
    for proto, name, vocab in ((builder_tied(vocab=256, d=32, hidden=32), "lm_head.MatMul.weight",
                                256), (tied_head(vocab=50, d=16), "embed.weight", 50)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(proto, path)
        w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
        ids = proto.graph.input[0].name
        p = Probe(path, [name], [{ids: rng.integers(0, vocab, (1, 12))},
                                 {ids: rng.integers(0, vocab, (1, 7))}])
        alias = p.embedding_inputs[name]
        assert alias != name and abs(p({alias: w})) < 1e-7
        noisy = w + 0.3 * rng.standard_normal(w.shape).astype(np.float32)
        head, emb, both = p({name: noisy}), p({alias: noisy}), p({name: noisy, alias: noisy})
        assert head > 0 and emb > 0 and both > 0
        assert len({round(head, 7), round(emb, 7), round(both, 7)}) == 3
        # one copy of the table: both names are inputs fed from one array, no initializer
        sessions = [t.sess for t in p.tails]
        assert {name, alias} <= {i.name for s in sessions for i in s.get_inputs()}
        assert not any(name == i.name for s in sessions
                       for i in s.get_overridable_initializers())
        assert p._tables[name] is p._tables[alias]
    # the table's values come from external data, and from a model in memory
    import onnx_ir as ir

    proto = builder_tied(vocab=256, d=32, hidden=32)
    name = "lm_head.MatMul.weight"
    w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
    onnx.save(proto, tmp_path / "ext.onnx", save_as_external_data=True, size_threshold=0,
              location="ext.onnx.data")
    batch = [{"input_ids": rng.integers(0, 256, (1, 9))}]
    for src in (tmp_path / "ext.onnx", ir.load(tmp_path / "ext.onnx")):
        p = Probe(src, [name], batch, path=tmp_path / "ext.onnx")
        np.testing.assert_array_equal(p._tables[name], w)
        assert abs(p({})) < 1e-7 and p({name: w * 1.5}) > 0


def _residual_lm(layers=6, vocab=40, d=16, seed=3):
    """ids -> E -> ``layers`` residual blocks ``h += tanh(h·W_l) * mask`` (the mask a data
    tensor every block reads, as an attention mask is) -> ``h·Wh`` logits; W_l's Transpose sits
    at the top of the graph, before the data reaches it (as exporters place them)."""
    from graphs import _model, init, vin
    from onnx import TensorProto, helper

    r = np.random.default_rng(seed)
    w = {"E": r.standard_normal((vocab, d)).astype(np.float32),
         "Wh": (r.standard_normal((d, vocab)) / np.sqrt(d)).astype(np.float32),
         **{f"W{i}": (r.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
            for i in range(layers)}}
    nodes = [helper.make_node("Transpose", [f"W{i}"], [f"W{i}t"]) for i in range(layers)]
    nodes += [helper.make_node("Gather", ["E", "input_ids"], ["h0"]),
              helper.make_node("Cast", ["attention_mask"], ["m0"], to=TensorProto.FLOAT),
              helper.make_node("Unsqueeze", ["m0", "ax"], ["mask"])]
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [f"h{i}", f"W{i}t"], [f"u{i}"]),
                  helper.make_node("Tanh", [f"u{i}"], [f"t{i}"]),
                  helper.make_node("Mul", [f"t{i}", "mask"], [f"v{i}"]),
                  helper.make_node("Add", [f"h{i}", f"v{i}"], [f"h{i + 1}"])]
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "Wh"], ["logits"]))
    proto = _model(nodes, [vin("input_ids", ["b", "s"], TensorProto.INT64),
                           vin("attention_mask", ["b", "s"], TensorProto.INT64)],
                   [vin("logits", ["b", "s", vocab])],
                   [*(init(k, v) for k, v in w.items()), init("ax", np.array([-1]))])
    return proto, w


def test_probe_starts_each_run_in_the_shortest_tail_with_the_whole_graphs_kl(tmp_path):
    """A change of a late weight runs only the graph after its first use (fed the dense
    residual stream and mask cached there), the head's change only the head; each gives the
    whole graph's KL, and unchanged weights still 0."""
    import onnx

    proto, w = _residual_lm()
    path = tmp_path / "lm.onnx"
    onnx.save(proto, path)
    r = np.random.default_rng(4)
    batches = [{"input_ids": r.integers(0, 40, (1, 11)), "attention_mask": np.ones((1, 11),
                                                                                     np.int64)},
               {"input_ids": r.integers(0, 40, (1, 7)), "attention_mask": np.ones((1, 7),
                                                                                    np.int64)}]
    names = [f"W{i}" for i in range(6)] + ["Wh"]
    cut, whole = Probe(path, names, batches, cuts=3), Probe(path, names, batches, cuts=0)
    assert len(whole.tails) == 1 and len(cut.tails) >= 3
    starts = {}
    for n in names:
        changed = {n: w[n] + 0.2 * r.standard_normal(w[n].shape).astype(np.float32)}
        got, want = cut(changed), whole(changed)
        assert want > 0 and np.isclose(got, want, rtol=1e-5, atol=1e-9), (n, got, want)
        assert abs(cut({n: w[n]})) < 1e-7
        starts[n] = cut.tails[cut._tail(changed)].start
    # later weights start later; W0 needs the whole graph; the head runs alone
    assert starts["W0"] == 0 and starts["Wh"] == max(starts.values())
    assert [starts[f"W{i}"] for i in range(6)] == sorted(starts[f"W{i}"] for i in range(6))
    assert starts["W5"] > 0
    head = cut.tails[0]
    assert head.hands is None and {i.name for i in head.sess.get_inputs()} >= {"Wh"}
    assert not any(f"W{i}" in head.inputs for i in range(6))
