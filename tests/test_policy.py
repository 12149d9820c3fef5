"""Rank selection, include/exclude and policy files."""

import json

import pytest

import lrc
from graphs import matmul_chain
from lrc import LrcError
from lrc.factorize import break_even_rank, rank_for_energy, rank_for_ratio


def test_rank_rules():
    assert break_even_rank(384, 1536) == 307
    assert rank_for_ratio(384, 1536, 0.5) == 153
    assert rank_for_energy([3.0, 2.0, 1.0], 0.5) == 1  # 9/14 >= 0.5
    assert rank_for_energy([3.0, 2.0, 1.0], 0.92) == 2  # 13/14 = 0.9286
    assert rank_for_energy([3.0, 2.0, 1.0], 0.93) == 3

def test_energy_and_ratio_settings():
    m = matmul_chain(d=16, hidden=32)
    _, rep = lrc.compress(m, ratio=0.5)
    for r in rep["rewritten"]:
        mm, nn = r["shape"]
        assert r["rank"] == int(0.5 * mm * nn / (mm + nn))
    _, rep = lrc.compress(m, energy=0.5, allow_larger=True)
    assert all(r["energy"] >= 0.5 for r in rep["rewritten"])


def test_include_exclude_roles_and_globs():
    m = matmul_chain()
    _, rep = lrc.compress(m, rank=2, include=["ffn"], exclude=["ffn.down"])
    assert [r["role"] for r in rep["rewritten"]] == ["ffn.up"]
    _, rep = lrc.compress(matmul_chain(), rank=2, include=["*o_proj*"])
    assert [r["role"] for r in rep["rewritten"]] == ["attn.o"]
    with pytest.raises(LrcError, match="unknown role"):
        lrc.compress(matmul_chain(), rank=2, include=["fnn"])


def test_policy_file_overrides(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("ratio: 0.5\nroles:\n  ffn.down: {rank: 3}\n  attn: skip\nnodes:\n  '*up_proj*': {rank: 5}\n")
    _, rep = lrc.compress(matmul_chain(), policy=p)
    ranks = {r["role"]: r["rank"] for r in rep["rewritten"]}
    assert ranks == {"ffn.up": 5, "ffn.down": 3}
    assert any("role attn" in s["reason"] for s in rep["skipped"])
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"blocks": {"0": "skip"}}))
    _, rep = lrc.compress(matmul_chain(), policy=j)
    assert rep["totals"]["rewritten"] == 0


@pytest.mark.parametrize("text,msg", [
    ("roles: {fnn: {rank: 2}}", "unknown role"),
    ("rank: -1", "positive integer"),
    ("bogus: 1", "unknown key"),
    ("roles: {ffn: {rank: 2, ratio: 0.5}}", "only one"),
    ("blocks: {'a-b': skip}", "block key"),
    ("[unclosed", "bad policy file"),
])
def test_bad_policy_files(tmp_path, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(LrcError, match=msg):
        lrc.compress(matmul_chain(), policy=p)


@pytest.mark.parametrize("kw", [{"rank": 0}, {"rank": -3}, {"ratio": 1.5}, {"energy": 0},
                                {"rank": 4, "ratio": 0.5}, {"rank": "lots"}])
def test_bad_settings(kw):
    with pytest.raises(LrcError):
        lrc.compress(matmul_chain(), **kw)


def test_global_budget_uniform_over_selection():
    m = matmul_chain(d=16, hidden=64)
    total = 16 * 16 + 2 * 16 * 64
    _, rep = lrc.compress(m, target_params=0.8, include=["ffn"])
    b = rep["budget"]
    assert b["allocation"] == "uniform"
    ffn = 2 * 16 * 64
    assert b["ratio"] == pytest.approx((0.8 * total - (total - ffn)) / ffn)
    kept = rep["totals"]["params_after"] + (total - ffn)
    assert kept <= 0.8 * total + 80  # integer ranks round down
    with pytest.raises(LrcError, match="cannot be met"):
        lrc.compress(matmul_chain(d=16, hidden=64), target_params=0.1, include=["ffn.up"])
    with pytest.raises(LrcError, match="not both"):
        lrc.compress(matmul_chain(), target_params=0.5, rank=3)


def test_auto_method_resolution(tmp_path):
    from lrc.methods import resolve
    from lrc.modelref import resolve as ref_of

    # in memory without a tokenizer: nothing to calibrate on
    assert resolve("auto", ref_of(matmul_chain()))[0] == "svd"
    import onnx

    p = tmp_path / "m.onnx"
    onnx.save(matmul_chain(), p)
    method, why = resolve("auto", ref_of(p))
    assert method == "svd" and "tokenizer" in why
    assert resolve("auto", ref_of(p), rank="full")[0] == "svd"
    assert resolve("asvd", ref_of(p))[0] == "asvd"
    with pytest.raises(LrcError, match="unknown method"):
        resolve("nope", ref_of(p))


def test_target_speedup_from_ort_profile(tmp_path):
    import onnx

    p = tmp_path / "m.onnx"
    onnx.save(matmul_chain(d=64, hidden=256), p)
    _, rep = lrc.compress(p, target_speedup=1.05, method="svd")
    b = rep["budget"]
    assert 0 < b["matmul_time_fraction"] <= 1
    f = b["matmul_time_fraction"]
    assert b["params_fraction"] == pytest.approx((1 / 1.05 - (1 - f)) / f, rel=1e-4)
    with pytest.raises(LrcError, match="beyond|limit"):
        lrc.compress(p, target_speedup=1000.0, method="svd")


def test_auto_method_sees_the_file_behind_a_loaded_model(tmp_path):
    import onnx

    from lrc.pipeline import CompressConfig, compress_model
    from lrc.graph.model import load

    p = tmp_path / "m.onnx"
    onnx.save(matmul_chain(), p)
    (tmp_path / "tokenizer.json").write_text("{}")
    m = load(p)  # an in-memory model that knows the folder its tokenizer is in
    # --rank full resolves auto to svd before any calibration: only the note is checked here
    _, rep = compress_model(m, CompressConfig.of(rank="full"))
    assert rep["method"] == "svd"
    from lrc.methods import resolve
    from lrc.modelref import resolve as ref_of

    method, why = resolve("auto", ref_of(m))
    assert method in ("svd-llm", "svd") and "no model file" not in why


def test_negative_block_keys_count_from_the_end(tmp_path):
    from test_update import residual_mlp

    from lrc.graph.policy import load_policy

    p = tmp_path / "edges.yaml"
    p.write_text('blocks: {"0,-1": skip, "1-3": {rank: 2}}\n')
    assert [b for b, _ in load_policy(p).blocks] == [{0, -1}, {1, 2, 3}]
    p.write_text('rank: 2\nblocks: {"0,-1": skip}\n')
    _, rep = lrc.compress(residual_mlp(blocks=4), policy=p)
    assert sorted({r["block"] for r in rep["rewritten"]}) == [1, 2]
    assert sorted({s["block"] for s in rep["skipped"]}) == [0, 3]
    p.write_text('rank: 2\nblocks: {"-2": {rank: 1}}\n')
    _, rep = lrc.compress(residual_mlp(blocks=4), policy=p)
    assert {r["block"]: r["rank"] for r in rep["rewritten"]} == {0: 2, 1: 2, 2: 1, 3: 2}
    p.write_text('blocks: {"-2-1": skip}\n')
    with pytest.raises(LrcError, match="block key"):
        lrc.compress(residual_mlp(blocks=4), policy=p)


def test_budget_with_dense_edge_blocks(tmp_path):
    """--target-params with first/last blocks dense: the other blocks take the whole cut."""
    from test_update import residual_mlp

    p = tmp_path / "edges.yaml"
    p.write_text('blocks: {"0,-1": skip}\n')
    _, rep = lrc.compress(residual_mlp(blocks=4, d=24, hidden=64), policy=p, target_params=0.7)
    per_block = 2 * 24 * 64
    total = 4 * per_block
    assert rep["budget"]["ratio"] == pytest.approx((0.7 * total - 2 * per_block) / (2 * per_block))
    kept = rep["totals"]["params_after"] + 2 * per_block
    assert sorted({r["block"] for r in rep["rewritten"]}) == [1, 2]
    assert 0.6 * total < kept <= 0.7 * total


def test_dense_edges_flag_equals_the_edge_policy(tmp_path):
    """--dense-edges is blocks {"0,-1": skip}: same ranks, same budget, and it is recorded."""
    from test_update import residual_mlp

    p = tmp_path / "edges.yaml"
    p.write_text('blocks: {"0,-1": skip}\n')
    _, by_file = lrc.compress(residual_mlp(blocks=4, d=24, hidden=64), policy=p, target_params=0.7)
    _, by_flag = lrc.compress(residual_mlp(blocks=4, d=24, hidden=64), dense_edges=True,
                              target_params=0.7)
    assert by_flag["budget"]["ratio"] == pytest.approx(by_file["budget"]["ratio"])
    assert ([(r["block"], r["rank"]) for r in by_flag["rewritten"]]
            == [(r["block"], r["rank"]) for r in by_file["rewritten"]])
    assert by_flag["policy"]["dense_blocks"] == [-1, 0]
    # with a policy file's own block rules, the flag comes first (edges stay dense)
    p.write_text('rank: 2\nblocks: {"0": {rank: 1}}\n')
    _, rep = lrc.compress(residual_mlp(blocks=4), policy=p, dense_edges=True)
    assert sorted({r["block"] for r in rep["rewritten"]}) == [1, 2]


def test_dense_edges_cli(tmp_path):
    import onnx
    from test_update import residual_mlp

    from lrc.cli import app
    from typer.testing import CliRunner

    src = tmp_path / "m.onnx"
    onnx.save(residual_mlp(blocks=3), src)
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "--rank", "2",
                                 "--method", "svd", "--dense-edges", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o.onnx.lrc.json").read_text())
    assert sorted({x["block"] for x in rep["rewritten"]}) == [1]


def test_target_params_forced_below_itself_by_a_dense_head_is_refused():
    """A dense head counted in target-params' total (Gemma-3: 62 % of the projection
    parameters) would force the selected projections far below the target: one line saying
    what the budget forces and how to accept it, before any work."""
    from onnx import helper

    from graphs import _model, init, rng, vin

    r = rng(3)
    m = _model([helper.make_node("MatMul", ["x", "up"], ["h"], name="/model/layers.0/mlp/up_proj/MatMul"),
                helper.make_node("MatMul", ["h", "head"], ["logits"], name="/lm_head/MatMul")],
               [vin("x", ["n", 64])], [vin("logits", ["n", 100])],
               [init("up", r.standard_normal((64, 128)).astype("float32")),
                init("head", r.standard_normal((128, 100)).astype("float32"))])
    with pytest.raises(LrcError, match=r"61% of them stay dense \(head 61%\).* keep only 49%.*ratio"):
        lrc.compress(m, target_params=0.8, exclude=["head"], method="svd")
