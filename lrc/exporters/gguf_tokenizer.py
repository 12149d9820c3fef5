"""GGUF tokenizers: lrc's own tokenizer.json for SentencePiece-style vocabularies, and a check of
any written tokenizer.json against a reference tokenizer of the GGUF's own vocabulary.

Why: transformers 4.57 converts a Gemma GGUF's vocabulary to a *Unigram* model over the GGUF
scores, but the SentencePiece model behind it is BPE-type, so the words come out fragmented
("Hello world" -> ``Hello ▁w or ld``) and perplexity rises tenfold with no warning.

What llama.cpp runs for a ``tokenizer.ggml.model == "llama"`` vocabulary without merges (its SPM
tokenizer): spaces become ``▁`` (and one is prepended when ``add_space_prefix``); the text is
split into characters; then, repeatedly, the adjacent pair whose concatenation is a token with
the highest score is merged (ties: the leftmost); a leftover character that is no token is
written as its UTF-8 bytes ``<0xNN>``. Merging by the score of the merged piece is BPE with the
merges ``(a, b)`` for every token ``t = a + b`` (``a`` and ``b`` tokens too), ranked by the
score of ``t`` -- which is what :func:`spm_tokenizer` writes, with byte fallback, the normalizer
(Prepend ``▁`` if ``add_space_prefix``, Replace `` `` -> ``▁``), the decoder (Replace ``▁`` ->
`` ``, ByteFallback, Fuse, Strip one space if prefixed) and control / user-defined tokens as
added tokens (matched whole in the raw text, as llama.cpp does).

The check (:func:`check_tokenizer`) encodes a few KB of prose, code, digits, punctuation and
non-ASCII text with the written tokenizer.json and with a pure-Python reference of the GGUF's
vocabulary -- the SPM algorithm above for SentencePiece-style vocabularies, byte-level BPE with
the GGUF's merges applied word by word (words split by the written tokenizer's own pre-tokenizer)
for ``gpt2``-type ones -- and requires equal ids and ``decode(encode(x)) == x``; a difference is
one line naming the first differing piece.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path

from lrc.errors import LrcError

# GGUF token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: types matched whole in the raw text before the vocabulary model runs (llama.cpp's
#: "special token" partition; user-defined ones are matched even without parse_special)
_WHOLE = (UNKNOWN, CONTROL, USER_DEFINED)

SPACE = "▁"


@dataclass
class GGUFVocab:
    """A GGUF file's tokenizer metadata (``tokenizer.ggml.*``)."""

    model: str
    tokens: list[str]
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_space_prefix: bool = True
    add_bos: bool = True
    add_eos: bool = False
    source: str = "gguf"

    @property
    def is_spm(self) -> bool:
        """A SentencePiece-style vocabulary (Gemma, Llama-2): llama.cpp's SPM tokenizer runs it."""
        return self.model == "llama" and not self.merges

    def type_of(self, i: int) -> int:
        return self.types[i] if i < len(self.types) else NORMAL

    def whole_tokens(self) -> list[str]:
        """Control / user-defined / unknown tokens: matched whole in the raw text."""
        return [t for i, t in enumerate(self.tokens) if self.type_of(i) in _WHOLE and t]


def read_vocab(path: str | Path) -> GGUFVocab:
    """The tokenizer metadata of the GGUF file ``path`` (read with ``gguf.GGUFReader``)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input
        raise LrcError(f"cannot read {path.name} as GGUF: {str(e).splitlines()[0] if str(e) else e}") from e

    def get(key: str, default=None):
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    tokens = get("tokens")
    if not tokens:
        raise LrcError(f"{path.name} holds no tokenizer (no tokenizer.ggml.tokens)")
    model = get("model", "llama")
    spm = model == "llama" and not get("merges")
    return GGUFVocab(
        model=model,
        tokens=list(tokens),
        scores=[float(s) for s in get("scores", [])],
        types=[int(t) for t in get("token_type", [])],
        merges=list(get("merges", [])),
        pre=get("pre"),
        bos_id=get("bos_token_id"),
        eos_id=get("eos_token_id"),
        unk_id=get("unknown_token_id"),
        pad_id=get("padding_token_id"),
        add_space_prefix=bool(get("add_space_prefix", spm)),  # llama.cpp's defaults
        add_bos=bool(get("add_bos_token", spm)),
        add_eos=bool(get("add_eos_token", False)),
        source=path.name,
    )


# ----------------------------------------------------------------------------- SPM -> tokenizer.json
def spm_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SPM merging: ``(a, b)`` for every token ``a + b``
    whose halves are tokens, ranked by the merged token's score (highest first), tokens of equal
    score by id, the splits of one token by their halves' scores. (llama.cpp breaks a tie of
    equal scores by position, which no merge list can express; the check would catch it.)"""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    score = vocab.scores or [0.0] * len(vocab.tokens)
    found = []
    for t, i in ids.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia, ib = ids.get(a), ids.get(b)
            if ia is not None and ib is not None:
                found.append((-score[i], i, -score[ia], -score[ib], a, b))
    found.sort(key=lambda m: m[:4])
    return [(m[4], m[5]) for m in found]


def spm_tokenizer(vocab: GGUFVocab):
    """A ``tokenizers.Tokenizer`` equal to llama.cpp's SPM tokenizer of ``vocab`` (see module
    docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    ids = {t: i for i, t in enumerate(vocab.tokens)}
    unk = _token(vocab, vocab.unk_id)
    tok = Tokenizer(models.BPE(ids, spm_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(SPACE)] if vocab.add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    special = [AddedToken(t, special=True, normalized=False) for i, t in enumerate(vocab.tokens)
               if vocab.type_of(i) in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for i, t in enumerate(vocab.tokens)
            if vocab.type_of(i) == USER_DEFINED and t]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    # BOS A (EOS) [BOS B (EOS)], as transformers' LlamaTokenizerFast / GemmaTokenizerFast write it
    bos = _token(vocab, vocab.bos_id) if vocab.add_bos else None
    eos = _token(vocab, vocab.eos_id) if vocab.add_eos else None
    if bos or eos:
        a, e = ([bos] if bos else []), ([eos] if eos else [])
        single = a + ["$A"] + e
        pair = single + [f"{t}:1" for t in a] + ["$B:1"] + [f"{t}:1" for t in e]
        used = {t: i for t, i in ((bos, vocab.bos_id), (eos, vocab.eos_id)) if t}
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=list(used.items()))
    return tok


def _token(vocab: GGUFVocab, i: int | None) -> str | None:
    return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None


# ----------------------------------------------------------------------------- references
def _partition(text: str, whole: list[str]) -> list[tuple[str, bool]]:
    """``text`` cut at every occurrence of a whole-matched token, longest tokens first (as
    llama.cpp's special-token partition does): ``[(piece, is_token), ...]``."""
    parts: list[tuple[str, bool]] = [(text, False)]
    for t in sorted(set(whole), key=len, reverse=True):
        if not any(not tok and t in p for p, tok in parts):
            continue
        out = []
        for p, is_tok in parts:
            if is_tok or t not in p:
                out.append((p, is_tok))
                continue
            pieces = p.split(t)
            for k, piece in enumerate(pieces):
                if piece:
                    out.append((piece, False))
                if k < len(pieces) - 1:
                    out.append((t, True))
        parts = out
    return parts


class SpmReference:
    """llama.cpp's SPM tokenizer (``llm_tokenizer_spm``) of a GGUF vocabulary, in plain Python."""

    def __init__(self, vocab: GGUFVocab):
        self.vocab = vocab
        self.ids = {t: i for i, t in enumerate(vocab.tokens)}
        self.scores = vocab.scores or [0.0] * len(vocab.tokens)
        self.whole = vocab.whole_tokens()

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        prev_token = True  # a prefix space goes before the first piece and after each token
        for piece, is_tok in _partition(text, self.whole):
            if is_tok:
                out.append(self.ids[piece])
                prev_token = True
                continue
            if self.vocab.add_space_prefix and prev_token:
                piece = " " + piece
            out += self._merge(piece.replace(" ", SPACE))
            prev_token = False
        return out

    def _merge(self, text: str) -> list[int]:
        sym = list(text)
        n = len(sym)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            t = sym[left] + sym[right]
            i = self.ids.get(t)
            if i is not None:
                heapq.heappush(heap, (-self.scores[i], left, right, len(t)))

        for k in range(n - 1):
            add(k, k + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue  # stale: one side was merged meanwhile
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add(prv[left], left)
            add(left, nxt[left])
        out: list[int] = []
        unk = self.vocab.unk_id if self.vocab.unk_id is not None else -1
        k = 0 if n else -1
        while k >= 0:
            i = self.ids.get(sym[k])
            if i is not None:
                out.append(i)
            else:  # a character that is no token: its UTF-8 bytes
                out += [self.ids.get(f"<0x{b:02X}>", unk) for b in sym[k].encode("utf-8")]
            k = nxt[k]
        return out


class BpeReference:
    """Byte-level BPE with the GGUF's merges applied per word (``gpt2``-type vocabularies); words
    come from the written tokenizer's own normalizer and pre-tokenizer."""

    def __init__(self, vocab: GGUFVocab, tokenizer):
        self.vocab = vocab
        self.ids = {t: i for i, t in enumerate(vocab.tokens)}
        self.ranks = {}
        for r, m in enumerate(vocab.merges):
            a, _, b = m.partition(" ")
            self.ranks.setdefault((a, b), r)
        self.whole = vocab.whole_tokens()
        self.normalizer = tokenizer.normalizer
        self.pre = tokenizer.pre_tokenizer
        model = json.loads(tokenizer.to_str()).get("model", {})
        self.ignore_merges = bool(model.get("ignore_merges"))

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece, is_tok in _partition(text, self.whole):
            if is_tok:
                out.append(self.ids[piece])
                continue
            if self.normalizer is not None:
                piece = self.normalizer.normalize_str(piece)
            words = self.pre.pre_tokenize_str(piece) if self.pre is not None else [(piece, None)]
            for word, _ in words:
                out += self._word(word)
        return out

    def _word(self, word: str) -> list[int]:
        unk = self.vocab.unk_id if self.vocab.unk_id is not None else -1
        if self.ignore_merges and word in self.ids:
            return [self.ids[word]]
        parts = list(word)
        while len(parts) > 1:
            best = min(range(len(parts) - 1),
                       key=lambda k: self.ranks.get((parts[k], parts[k + 1]), float("inf")))
            pair = (parts[best], parts[best + 1])
            if pair not in self.ranks:
                break
            merged, k = [], 0
            while k < len(parts):  # every occurrence of the pair, left to right
                if k < len(parts) - 1 and (parts[k], parts[k + 1]) == pair:
                    merged.append(parts[k] + parts[k + 1])
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        return [self.ids.get(p, unk) for p in parts]


def reference(vocab: GGUFVocab, tokenizer) -> SpmReference | BpeReference | None:
    """The reference tokenizer of ``vocab``; None for vocabulary models lrc has none for."""
    if vocab.is_spm:
        return SpmReference(vocab)
    if vocab.model == "gpt2" and vocab.merges:
        return BpeReference(vocab, tokenizer)
    return None


# ----------------------------------------------------------------------------- the check
_EXTRA = ("Digits 0123456789, 3.14159 and 1,234,567; 2026-11-30 12:34:56. "
          "Punctuation: !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~  -- double  spaces,\ttabs\n\n"
          "naïve café 東京 🙂 Ünïcödé — “quotes” ‘single’ … ñ ß Ωμέγα Привет مرحبا नमस्ते\n"
          "Hello world. hello World! HELLO WORLD?\n")


def sample_text(chars: int = 3000) -> str:
    """A few KB of English prose from lrc's bundled texts, Python code, digits, punctuation
    and non-ASCII text."""
    from lrc import data

    prose = ""
    for name in ("news", "docs"):
        try:
            prose = data.load_text(name)
            break
        except LrcError:
            continue
    try:
        code = data.load_text("code")
    except LrcError:
        code = ""
    half = chars // 2
    return prose[:half] + "\n\n" + code[:half] + "\n" + _EXTRA


def _piece(tokenizer, vocab: GGUFVocab, i: int) -> str:
    if 0 <= i < len(vocab.tokens):
        return repr(vocab.tokens[i])
    t = tokenizer.id_to_token(i) if i >= 0 else None
    return repr(t) if t is not None else f"id {i}"


def expected_decode(text: str, vocab: GGUFVocab) -> str:
    """What decoding the ids of ``text`` gives back: ``text`` itself, except that with
    ``add_space_prefix`` llama.cpp (and the Prepend normalizer) puts a ``▁`` before the text
    after every whole-matched token too, and only the first one is stripped on decoding."""
    if not (vocab.is_spm and vocab.add_space_prefix):
        return text
    out, prev = [], None
    for piece, is_tok in _partition(text, vocab.whole_tokens()):
        out.append(" " + piece if prev and not is_tok else piece)
        prev = is_tok
    return "".join(out)


def check_tokenizer(tokenizer, vocab: GGUFVocab, text: str | None = None) -> dict:
    """Encode ``text`` (default :func:`sample_text`) with ``tokenizer`` (a ``tokenizers.Tokenizer``
    or a tokenizer.json path) and with the reference of ``vocab``; raise :class:`LrcError` (one
    line) at the first differing piece or when decoding does not give the text back. Returns
    ``{"checked": bool, "chars": N, "tokens": n, "roundtrip": bool, "note": str}``."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    text = sample_text() if text is None else text
    ref = reference(vocab, tokenizer)
    if ref is None:
        return {"checked": False, "chars": 0, "tokens": 0, "roundtrip": False,
                "note": f"not checked: lrc has no reference for tokenizer model '{vocab.model}'"}
    got = tokenizer.encode(text, add_special_tokens=False).ids
    want = ref.encode(text)
    if got != want:
        k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        done = tokenizer.decode(got[:k], skip_special_tokens=False)
        g = _piece(tokenizer, vocab, got[k]) if k < len(got) else "nothing"
        w = _piece(tokenizer, vocab, want[k]) if k < len(want) else "nothing"
        at = text[max(0, len(done) - 20):len(done) + 20]
        raise LrcError(f"tokenizer check failed for {vocab.source}: token {k} (near {at!r}) is {g} "
                       f"in tokenizer.json but {w} in the GGUF vocabulary "
                       f"({'SentencePiece' if vocab.is_spm else vocab.model} reference)")
    unk = vocab.unk_id if vocab.unk_id is not None else -1
    roundtrip = unk not in got and -1 not in got
    if roundtrip:
        back = tokenizer.decode(got, skip_special_tokens=False)
        want_text = expected_decode(text, vocab)
        if back != want_text:
            k = next((j for j, (a, b) in enumerate(zip(back, want_text)) if a != b),
                     min(len(back), len(want_text)))
            raise LrcError(f"tokenizer check failed for {vocab.source}: decode(encode(text)) differs "
                           f"from the text at char {k}: {back[k:k + 20]!r} instead of "
                           f"{want_text[k:k + 20]!r}")
    return {"checked": True, "chars": len(text), "tokens": len(got), "roundtrip": roundtrip,
            "note": "" if roundtrip else
            "the vocabulary maps some characters to <unk>: round trip not checked"}


def prepare(gguf: str | Path, folder: str | Path) -> tuple[GGUFVocab, str]:
    """For a GGUF whose vocabulary is SentencePiece-style, write lrc's tokenizer.json into
    ``folder`` (over transformers' one). Returns ``(vocab, what was done)``."""
    vocab = read_vocab(gguf)
    if not vocab.is_spm:
        return vocab, f"transformers' conversion of the GGUF {vocab.model} vocabulary"
    path = Path(folder) / "tokenizer.json"
    tok = spm_tokenizer(vocab)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return vocab, "converted by lrc from the GGUF SentencePiece vocabulary"


__all__ = ["BpeReference", "GGUFVocab", "SpmReference", "check_tokenizer", "expected_decode", "prepare",
           "read_vocab", "reference", "sample_text", "spm_merges", "spm_tokenizer"]
