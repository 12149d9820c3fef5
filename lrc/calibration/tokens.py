"""Tokenisation shared by calibration, the sequential update and eval.

* ``load_tokenizer`` / ``plain_tokenizer``: a ``tokenizers.Tokenizer`` with padding and
  truncation off (lrc cuts windows itself; exported tokenizer.json files often pad and truncate
  to 128, which silently shortens texts and, with an all-ones mask, pollutes mean pooling).
* ``tokenizer_path``: tokenizer.json given, or the model reference's; an error when there is
  none.
* ``token_batches``: calibration text cut into int64 windows framed the way the tokenizer frames
  a single text (``special_frame``).

Only ``tokenizers`` and numpy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lrc.errors import LrcError, opt
from lrc.modelref import resolve, tokenizer_file

log = logging.getLogger(__name__)

__all__ = ["load_tokenizer", "plain_tokenizer", "special_frame", "token_batches", "tokenizer_path"]


def plain_tokenizer(tok):
    """``tok`` with padding and truncation off (a copy when they were on)."""
    from tokenizers import Tokenizer

    if tok.padding is None and tok.truncation is None:
        return tok
    tok = Tokenizer.from_str(tok.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_tokenizer(tokenizer=None, model=None):
    """A plain ``tokenizers.Tokenizer``: ``tokenizer`` itself (an object, a tokenizer.json file
    or a folder holding one), else the model's (a :class:`~lrc.modelref.ModelRef`, or anything
    :func:`lrc.modelref.resolve` takes; None when it has none)."""
    from tokenizers import Tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return plain_tokenizer(tokenizer)
    if tokenizer is not None:
        return plain_tokenizer(Tokenizer.from_file(str(tokenizer_file(tokenizer))))
    if model is None:
        return None
    return resolve(model).load_tokenizer()


def tokenizer_path(model=None, tokenizer=None) -> Path:
    """tokenizer.json: ``tokenizer`` (a file or a folder), else the model's (a
    :class:`~lrc.modelref.ModelRef`, or anything :func:`lrc.modelref.resolve` takes). A model
    in memory with no file of origin needs ``tokenizer``."""
    if tokenizer is not None:
        return tokenizer_file(tokenizer)
    ref = resolve(model) if model is not None else None
    if ref is None or (ref.file is None and ref.tokenizer is None):
        raise LrcError("no tokenizer: an in-memory model has no folder to find tokenizer.json "
                       f"in; pass {opt('tokenizer')}")
    if ref.tokenizer is None:
        raise LrcError(f"tokenizer.json not found at {ref.folder / 'tokenizer.json'}; pass "
                       f"{opt('tokenizer')}")
    return ref.tokenizer


def special_frame(tok, bos: bool | str) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer puts before and after a single text ([CLS] .. [SEP], <s> ..);
    ``bos`` a string: that token first and nothing after; False: none."""
    if isinstance(bos, str):
        tid = tok.token_to_id(bos)
        if tid is None:
            raise LrcError(f"token {bos!r} is not in the tokenizer's vocabulary")
        return [tid], []
    if not bos:
        return [], []
    plain = tok.encode("hello world", add_special_tokens=False).ids
    full = tok.encode("hello world", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def token_batches(
    tokenizer_json_path: str | os.PathLike,
    texts: Sequence[str],
    n_tokens: int = 16384,
    seq_len: int = 256,
    bos: bool | str = True,
) -> list[np.ndarray]:
    """Tokenise ``texts`` (joined by a blank line) and cut them into int64 windows [1, L].

    With ``bos=True`` each window is framed the way the tokenizer frames a single text: BOS for
    decoders whose tokenizer adds one, [CLS] .. [SEP] for BERT-like encoders; a string names the
    token to put first instead. Windows hold ``seq_len`` tokens (frame included); the last one
    is shorter when ``n_tokens`` is not a multiple of ``seq_len``. Fewer than ``n_tokens`` come
    back when the texts run out.
    """
    tok = load_tokenizer(tokenizer_json_path)
    prefix, suffix = special_frame(tok, bos)
    content = seq_len - len(prefix) - len(suffix)
    if content <= 0:
        raise LrcError(f"seq_len {seq_len} leaves no room for text after the special tokens")
    sep = tok.encode("\n\n", add_special_tokens=False).ids

    def stream():
        first = True
        chunk = 64
        for start in range(0, len(texts), chunk):
            for enc in tok.encode_batch(list(texts[start:start + chunk]), add_special_tokens=False):
                if not enc.ids:
                    continue
                if not first:
                    yield from sep
                first = False
                yield from enc.ids

    it = stream()
    windows: list[np.ndarray] = []
    remaining = int(n_tokens)
    while remaining > 0:
        want = min(seq_len, remaining) - len(prefix) - len(suffix)
        if want <= 0:
            break
        body = [t for _, t in zip(range(want), it)]
        if not body:
            break
        windows.append(np.array([prefix + body + suffix], dtype=np.int64))
        remaining -= windows[-1].shape[1]
        if len(body) < want:
            break
    if not windows:
        raise LrcError("no calibration tokens: the texts are empty")
    # a large vocabulary's tokenizer (Gemma-3's 262k) takes ~300 MB of small blocks that stay
    # in the heap once freed: hand them back before the calibration runs
    del it, tok
    from lrc.sysmem import trim

    trim()
    got = sum(w.shape[1] for w in windows)
    if got < n_tokens:
        log.warning("calibration texts ran out: %d of %d tokens", got, n_tokens)
    return windows
