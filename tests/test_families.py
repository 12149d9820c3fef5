"""Family coverage: tiny random-weight GPT-2, LLaMA, Qwen2, Gemma, BERT and T5 (no download),
exported, analysed (roles found), compressed at full rank (outputs unchanged) and at low rank
(still runs)."""

import collections

import pytest

from fixtures_export import save_tiny  # noqa: F401 (skips without torch/transformers)

import lrc
import lrc.model
from lrc.exporters import export
from lrc.measure.verify import verify

LLAMA_LIKE = {"attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.o": 2, "ffn.gate": 2, "ffn.up": 2,
              "ffn.down": 2, "head": 1}
EXPECTED = {
    "gpt2": {"model.onnx": {"attn.qkv": 2, "attn.o": 2, "ffn.up": 2, "ffn.down": 2, "head": 1}},
    "llama": {"model.onnx": LLAMA_LIKE},
    "qwen2": {"model.onnx": LLAMA_LIKE},
    "gemma": {"model.onnx": LLAMA_LIKE},
    "bert": {"model.onnx": {"attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.o": 2, "ffn.up": 2,
                            "ffn.down": 2}},
    "t5": {"encoder_model.onnx": {"attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.o": 2,
                                  "ffn.up": 2, "ffn.down": 2},
           "decoder_model.onnx": {"attn.q": 4, "attn.k": 4, "attn.v": 4, "attn.o": 4,
                                  "ffn.up": 2, "ffn.down": 2, "head": 1}},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            save_tiny(family, root / "hf")
            cache[family] = export(root / "hf", root / "onnx", exporter="optimum")
        return cache[family]
    return get


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_roles_and_full_rank(family, exported, tmp_path):
    res = exported(family)
    files = {f.name: f for f in res.files}
    for name, roles in EXPECTED[family].items():
        a = lrc.analyse(files[name])
        assert dict(collections.Counter(r["role"] for r in a["nodes"])) == roles, name
        model, rep = lrc.compress(files[name], rank="full")
        assert rep["totals"]["rewritten"] == sum(roles.values())
        out = tmp_path / name
        lrc.model.save(model, out)
        v = verify(files[name], out)
        assert v["worst_rel"] <= 1e-4, (name, v["outputs"])
        small, _ = lrc.compress(files[name], rank=4, method="svd")  # auto refuses: no tokenizer
        lrc.model.save(small, tmp_path / ("r4-" + name))
        assert verify(files[name], tmp_path / ("r4-" + name))["worst_rel"] < 10


def test_t5_merged_decoder_subgraphs(exported, tmp_path):
    res = exported("t5")
    merged = next((f for f in res.files if f.name == "decoder_model_merged.onnx"), None)
    if merged is None:
        pytest.skip("this optimum version writes no merged decoder")
    a = lrc.analyse(merged)
    assert a["totals"]["count"] > 0  # projections inside the If branches are found
    model, rep = lrc.compress(merged, rank="full")
    lrc.model.save(model, tmp_path / "m.onnx")
    assert verify(merged, tmp_path / "m.onnx")["worst_rel"] <= 1e-4
