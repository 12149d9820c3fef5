"""The model reference (lrc.modelref): what a user names, resolved once — file, folder, format,
tokenizer, configs, KV layout — for every command."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import lrc.model
from lrc.errors import LrcError
from lrc.modelref import FORMATS, ModelRef, is_past, kv_layout, pick_file, resolve
from lrc.runtime import feeds as F
from lrc.runtime.session import open_session

from graphs import matmul_chain
from test_feeds import _decoder


def test_formats_of_folders_and_files(tmp_path):
    opt = tmp_path / "optimum"
    opt.mkdir()
    _decoder(opt / "model.onnx")
    (opt / "config.json").write_text(json.dumps({"num_key_value_heads": 2}))
    (opt / "tokenizer.json").write_text("{}")
    ref = resolve(opt)
    assert ref.format == "optimum" and ref.file == opt / "model.onnx"
    assert ref.tokenizer == opt / "tokenizer.json" and not ref.in_memory
    assert resolve(ref) is ref  # resolved once: a reference passes through

    merged = tmp_path / "merged"
    merged.mkdir()
    _decoder(merged / "decoder_model_merged.onnx")
    _decoder(merged / "decoder_with_past_model.onnx")
    assert resolve(merged).format == "merged-decoder"
    assert resolve(merged).file.name == "decoder_model_merged.onnx"

    bare = tmp_path / "bare.onnx"
    onnx.save(matmul_chain(), bare)
    ref = resolve(bare)
    assert ref.format == "onnx-file" and ref.tokenizer is None and ref.config == {}
    with pytest.raises(LrcError, match="no tokenizer.json"):
        ref.need_tokenizer()

    mem = resolve(matmul_chain())
    assert mem.format == "in-memory" and mem.file is None and mem.in_memory
    assert [f.name for f in FORMATS][0] == "in-memory"


def test_a_builder_folder_is_read_from_its_genai_config(tmp_path):
    """ONNX Runtime GenAI's model builder writes genai_config.json and no config.json: the file
    it names is the model, and its fields are the model's configuration."""
    d = tmp_path / "builder"
    d.mkdir()
    _decoder(d / "decoder.onnx", heads="kv", head_dim="hd")  # symbolic cache dims
    _decoder(d / "other.onnx")
    (d / "genai_config.json").write_text(json.dumps({"model": {
        "bos_token_id": 1, "eos_token_id": [2, 3], "context_length": 2048, "vocab_size": 37,
        "decoder": {"filename": "decoder.onnx", "head_size": 4, "hidden_size": 8,
                    "num_attention_heads": 4, "num_key_value_heads": 2,
                    "num_hidden_layers": 2}}}))
    ref = resolve(d)
    assert ref.format == "genai-builder" and ref.file == d / "decoder.onnx"
    assert pick_file(d) == d / "decoder.onnx"  # two models: the config says which
    cfg = ref.config
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"]) == (2, 4, 2)
    assert cfg["max_position_embeddings"] == 2048 and cfg["eos_token_id"] == [2, 3]
    # the feeds of a session on it take the cache shape from there (no config.json needed)
    s = open_session(ref)
    f = F.text_feeds(s, np.array([[1, 2]]))
    assert f["past_key_values.0.key"].shape == (1, 2, 0, 4)
    assert F.cache_dims(open_session(d)) == (2, 4)


def test_a_builder_sliding_window_cache_is_a_buffer_of_the_window(tmp_path):
    """The builder's sliding-window attention (Gemma-3) runs on a shared past/present buffer of
    at least the window from the first step: genai_config.json says so (a sliding window and
    ``past_present_share_buffer``); every cache lrc makes for it is such a buffer, and the
    attention mask and positions count the positions it holds, not its size."""
    d = tmp_path / "builder"
    d.mkdir()
    _decoder(d / "model.onnx", heads="kv", head_dim="hd")
    dec = {"filename": "model.onnx", "head_size": 4, "hidden_size": 8, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 2,
           "sliding_window": {"window_size": 16, "layers": [0]}}
    genai = {"model": {"vocab_size": 37, "decoder": dec},
             "search": {"past_present_share_buffer": True}}
    (d / "genai_config.json").write_text(json.dumps(genai))
    s = open_session(resolve(d))
    assert F.cache_capacity(s) == 16
    f = F.text_feeds(s, np.array([[1, 2, 3]]))  # a prefill: an empty buffer of the window
    assert f["past_key_values.1.value"].shape == (1, 2, 16, 4)
    assert f["attention_mask"].shape == (1, 3) and f["position_ids"].tolist() == [[0, 1, 2]]
    past = F.empty_past(s, capacity=40)  # longer than the window when the caller needs it
    assert past.length == 0 and past["past_key_values.0.key"].shape == (1, 2, 40, 4)
    step = F.text_feeds(s, np.array([[5]]), past=F.Past(past, 7))
    assert step["attention_mask"].shape == (1, 8) and step["position_ids"].tolist() == [[7]]
    # lrc's own genai_config (a cache that grows: no shared buffer) keeps the growing cache
    genai["search"]["past_present_share_buffer"] = False
    (d / "genai_config.json").write_text(json.dumps(genai))
    s = open_session(resolve(d))
    assert F.cache_capacity(s) == 0
    assert F.text_feeds(s, np.array([[1, 2]]))["past_key_values.0.key"].shape == (1, 2, 0, 4)


def test_kv_layout_is_the_one_parser_of_cache_names(tmp_path):
    assert is_past("past_key_values.3.key") and is_past("past.0.value")
    assert is_past("past_key.2") and not is_past("present.0.key")
    lay = resolve(_decoder(tmp_path / "m.onnx")).kv
    assert (lay.past_key, lay.present_value, lay.layers) == (
        "past_key_values.%d.key", "present.%d.value", 2)
    assert (lay.kv_heads, lay.head_size) == (2, 4)
    assert lay.inputs[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert resolve(matmul_chain()).kv is None
    with pytest.raises(ValueError, match="number the layers"):
        kv_layout({"past_key_values.0.key": [], "past_key_values.0.value": [],
                   "past_key_values.2.key": [], "past_key_values.2.value": []}, {})


def test_a_loaded_model_knows_its_file_and_tokenizer(tmp_path):
    """``lrc.model.load`` records the file; the reference of the model in memory finds the
    tokenizer and configs beside it; a tokenizer given explicitly wins."""
    (tmp_path / "tokenizer.json").write_text("{}")
    p = tmp_path / "m.onnx"
    onnx.save(matmul_chain(), p)
    m = lrc.model.load(tmp_path)
    ref = resolve(m)
    assert ref.in_memory and ref.model is m and ref.file == p
    assert ref.tokenizer == tmp_path / "tokenizer.json"
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    assert resolve(ref, tokenizer=other).tokenizer == other / "tokenizer.json"
    with pytest.raises(LrcError, match="no tokenizer.json there"):
        resolve(p, tokenizer=tmp_path / "absent")
    with ref.as_file() as f:  # what a profile reads: the model in memory, written
        assert f.is_file() and f != p


def test_bad_references_are_one_line(tmp_path):
    with pytest.raises(LrcError, match="no such file"):
        resolve(tmp_path / "absent")
    with pytest.raises(LrcError, match="holds no .onnx"):
        resolve(tmp_path)
    (tmp_path / "a.onnx").write_bytes(onnx.load_model_from_string(
        matmul_chain().SerializeToString()).SerializeToString())
    (tmp_path / "b.onnx").write_bytes((tmp_path / "a.onnx").read_bytes())
    with pytest.raises(LrcError, match="several models"):
        resolve(tmp_path)
    with pytest.raises(LrcError, match="not a model"):
        resolve(42)
    assert isinstance(resolve(tmp_path / "a.onnx"), ModelRef)
