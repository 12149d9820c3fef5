"""Real text for evaluation and calibration, from installed packages only (no network).

Sources (``list_texts()`` prints them with their origin):

=========  =====================================================  ==========================
name       content                                                 package
=========  =====================================================  ==========================
news       Lee background corpus, articles 0-149 (Australian        gensim (test data)
           news, 2001); the in-domain perplexity text
lee        Lee 2005 50 news documents (with ``lee_similarity()``)   gensim (test data)
wiki       Wikipedia articles in raw wikitext markup (links,        gensim (test data)
           templates, lists, tables), first half of the pages
forum      Usenet posts from sci.space and alt.atheism (1993):      gensim (test data,
           conversational replies that quote and answer each        ``mini_newsgroup``)
           other, signatures; first half of the posts, headers
           reduced to the Subject line
docs       the Python language reference / library docs topics     Python stdlib (pydoc_data)
           (technical documentation, grammar, lists); the
           out-of-domain text: no documentation is in calibration
code       Python source of a fixed set of stdlib modules           Python stdlib
=========  =====================================================  ==========================

``calibration_texts()`` draws a mixed-domain calibration set from the *other* halves: news
articles 150-299 (prose), the second half of the wiki pages (markup, lists, tables), the second
half of the forum posts (dialogue: people replying to each other) and a disjoint list of stdlib
modules (code).  Technical documentation (``docs``) is deliberately absent from calibration: it is
the out-of-domain text every quality figure is also reported on.  Every
calibration passage that shares a 16-gram of word/punctuation tokens with any evaluation text is
dropped, which is stricter than "no shared 32-gram of subword tokens" for any BPE or WordPiece
tokenizer (a 32-subword span covers at least 16 such tokens).  The gensim files are found with
``importlib.util.find_spec`` and read directly, without importing gensim (and its scipy);
``mini_newsgroup`` is a zlib-compressed protocol-0 pickle of a scikit-learn ``Bunch``, so its
post strings are read from the pickle text with a regular expression -- it is never unpickled
(unpickling runs code and would need scikit-learn).

gensim is the only extra package, declared as lrc's ``data`` extra: ``pip install 'lrc[data]'``
(gensim's 27.8 MB wheel; ``pip install --no-deps gensim`` is enough for reading the files).
docs and code come from the running Python, so their exact text follows the Python version
(recorded in ``text_info``).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np

from lrc.errors import LrcError

__all__ = [
    "release",
    "list_texts",
    "load_text",
    "text_info",
    "calibration_texts",
    "lee_similarity",
    "eval_names",
    "shared_ngrams",
]

GENSIM_HINT = ("pip install 'lrc[data]'  (gensim: lrc reads its test data; "
               "pip install --no-deps gensim is enough)")

# stdlib modules used as text: eval and calibration lists are disjoint.
_CODE_EVAL = ("textwrap", "heapq", "bisect", "fractions", "json.decoder", "json.encoder",
              "shlex", "string", "colorsys", "graphlib")
_CODE_CALIB = ("argparse", "dataclasses", "functools", "enum", "csv", "difflib", "ipaddress",
               "pprint", "statistics", "tokenize", "configparser", "calendar", "gettext",
               "fnmatch", "glob", "queue", "sched", "secrets", "uuid", "zipfile", "tarfile",
               "contextlib", "abc", "copy", "random", "typing", "pathlib", "shutil")

_SOURCES = {
    "news": "Lee background news corpus, articles 0-149 (gensim test data)",
    "lee": "Lee 2005 similarity corpus, 50 news documents (gensim test data)",
    "wiki": "Wikipedia pages in raw wikitext markup, first half (gensim test data)",
    "forum": "Usenet posts (sci.space, alt.atheism, 1993), replies quoting each other, "
             "first half (gensim test data mini_newsgroup)",
    "docs": "Python language reference topics (stdlib pydoc_data), technical documentation",
    "code": "Python stdlib source: " + ", ".join(_CODE_EVAL),
}
_CALIB_DOMAINS = ("news", "wiki", "forum", "code")
NGRAM = 16


# ----------------------------------------------------------------------------- files


def _gensim_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LrcError(f"real-text data needs gensim's test data: {GENSIM_HINT}")
    d = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not (d / "lee_background.cor").is_file():
        raise LrcError(f"gensim is installed without its test data at {d}: {GENSIM_HINT}")
    return d


def _lines(fname: str, encoding: str = "utf-8") -> list[str]:
    text = (_gensim_data() / fname).read_text(encoding=encoding)
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


@functools.lru_cache(maxsize=None)
def _news_articles() -> tuple[str, ...]:
    return tuple(_lines("lee_background.cor", "latin-1"))


@functools.lru_cache(maxsize=None)
def _lee_docs() -> tuple[str, ...]:
    return tuple(_lines("lee.cor", "latin-1"))


@functools.lru_cache(maxsize=None)
def _wiki_pages() -> tuple[str, ...]:
    """Non-redirect pages of the shortened enwiki dump, XML entities decoded."""
    import html

    path = _gensim_data() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        xml = f.read()
    pages = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, re.S):
        body = html.unescape(body).strip()
        if body and not body.upper().startswith("#REDIRECT"):
            pages.append(body)
    return tuple(pages)


@functools.lru_cache(maxsize=None)
def _forum_posts() -> tuple[str, ...]:
    """The 200 posts of gensim's ``mini_newsgroup``: Subject line + body, other headers dropped.

    The file is a zlib-compressed protocol-0 pickle; each post is one ``V`` (raw-unicode-escape)
    string on its own line (``aV...`` when appended to a list).  Reading those lines keeps this
    free of unpickling (which would execute code and import scikit-learn).
    """
    import zlib

    path = _gensim_data() / "mini_newsgroup"
    try:
        raw = zlib.decompress(path.read_bytes()).decode("latin-1")
    except (OSError, zlib.error) as e:
        raise LrcError(f"cannot read the forum text {path}: {e}") from e
    posts = []
    for m in re.finditer(r"^a?V(.*)$", raw, re.M):
        text = m.group(1).encode("latin-1").decode("raw_unicode_escape")
        head, _, body = text.partition("\n\n")
        subject = next((h for h in head.splitlines() if h.startswith("Subject:")), "")
        body = body.strip()
        if body:
            posts.append((subject + "\n\n" + body).strip())
    if len(posts) < 100:
        raise LrcError(f"{path} holds {len(posts)} posts, expected about 200 (unknown format)")
    return tuple(posts)


@functools.lru_cache(maxsize=None)
def _doc_topics() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # stripped Pythons
        raise LrcError("this Python has no pydoc_data (the 'docs' text)") from e
    return tuple(topics[k].strip() for k in sorted(topics))


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise LrcError(f"the stdlib source of {name} is not installed (needed for 'code')")
    return Path(spec.origin).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- public


def list_texts() -> dict[str, str]:
    """Named evaluation texts and where they come from."""
    return dict(_SOURCES)


def eval_names() -> tuple[str, ...]:
    """Names of all evaluation texts (calibration is disjoint from each)."""
    return tuple(_SOURCES)


def text_info(name: str) -> dict:
    """Origin, size and Python version of a named text (for result records)."""
    text = load_text(name)
    return {"name": name, "source": _SOURCES[name], "chars": len(text),
            "python": "%d.%d" % sys.version_info[:2]}


def _documents(name: str) -> list[str]:
    if name == "news":
        return list(_news_articles()[:150])
    if name == "lee":
        return list(_lee_docs())
    if name == "wiki":
        pages = _wiki_pages()
        return list(pages[: len(pages) // 2])
    if name == "forum":
        posts = _forum_posts()
        return list(posts[: len(posts) // 2])
    if name == "docs":
        return list(_doc_topics())
    if name == "code":
        return [_module_source(m) for m in _CODE_EVAL]
    raise LrcError(f"unknown text {name!r}; known: {', '.join(_SOURCES)}")


def load_text(name: str) -> str:
    """One evaluation text as a string (documents separated by blank lines)."""
    return "\n\n".join(_documents(name))


def _chunks(text: str, size: int = 2000) -> list[str]:
    """Split at line boundaries into pieces of about ``size`` characters."""
    out, cur, n = [], [], 0
    for line in text.splitlines():
        cur.append(line)
        n += len(line) + 1
        if n >= size:
            out.append("\n".join(cur).strip())
            cur, n = [], 0
    if cur and "\n".join(cur).strip():
        out.append("\n".join(cur).strip())
    return [c for c in out if c]


def _calib_pool(domain: str) -> list[str]:
    if domain == "news":
        return list(_news_articles()[150:])
    if domain == "wiki":
        pages = _wiki_pages()
        return [c for p in pages[len(pages) // 2:] for c in _chunks(p)]
    if domain == "forum":
        posts = _forum_posts()
        return [c for p in posts[len(posts) // 2:] for c in _chunks(p)]
    if domain == "code":
        out = []
        for m in _CODE_CALIB:
            try:
                out.extend(_chunks(_module_source(m)))
            except LrcError:
                continue
        return out
    raise LrcError(f"unknown calibration domain {domain!r}; known: {', '.join(_CALIB_DOMAINS)}")


_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _ngrams(text: str, n: int = NGRAM) -> set[int]:
    toks = _TOKEN_RE.findall(text)
    return {hash(tuple(toks[i:i + n])) for i in range(len(toks) - n + 1)}


@functools.lru_cache(maxsize=None)
def _eval_ngrams() -> frozenset[int]:
    grams: set[int] = set()
    for name in _SOURCES:
        for doc in _documents(name):
            grams |= _ngrams(doc)
    return frozenset(grams)


def shared_ngrams(a: list[str] | str, b: list[str] | str, n: int, tokenize=None) -> int:
    """Number of distinct n-grams (of ``tokenize(text)`` tokens, default words/punctuation)
    that occur both in ``a`` and in ``b``."""
    tok = tokenize or _TOKEN_RE.findall

    def grams(texts):
        out = set()
        for t in [texts] if isinstance(texts, str) else texts:
            ids = list(tok(t))
            out |= {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}
        return out

    return len(grams(a) & grams(b))


def calibration_texts(n_tokens: int = 32768, tokenizer=None, domains=_CALIB_DOMAINS,
                      seed: int = 0) -> list[str]:
    """A mixed-domain calibration set of about ``n_tokens`` tokens, disjoint from eval texts.

    Passages are taken round-robin from ``domains`` (news, wiki, forum, code), shuffled within each
    domain with ``seed``; passages sharing a 16-gram with any evaluation text are skipped.
    Tokens are counted with ``tokenizer`` (a ``tokenizers.Tokenizer``) when given, else
    estimated as characters / 4.  Returns the passages (each a document or ~2000-char chunk).
    """
    rng = np.random.default_rng(seed)
    banned = _eval_ngrams()
    pools = []
    for d in domains:
        pool = _calib_pool(d)
        pools.append([pool[i] for i in rng.permutation(len(pool))])

    def count(t: str) -> int:
        if tokenizer is None:
            return max(1, len(t) // 4)
        return len(tokenizer.encode(t, add_special_tokens=False).ids)

    out, total, idx = [], 0, [0] * len(pools)
    while total < n_tokens and any(i < len(p) for i, p in zip(idx, pools)):
        for k, pool in enumerate(pools):
            while idx[k] < len(pool):
                passage = pool[idx[k]]
                idx[k] += 1
                if not (_ngrams(passage) & banned):
                    out.append(passage)
                    total += count(passage)
                    break
            if total >= n_tokens:
                break
    if total < n_tokens:
        raise LrcError(f"only ~{total} calibration tokens available from {', '.join(domains)} "
                       f"(asked {n_tokens})")
    return out


def release() -> None:
    """Drop the corpora and n-gram sets this module keeps in memory (about 100 MB once the
    calibration set was drawn: the evaluation texts' 16-grams, the wiki dump...), and hand the
    freed heap back to the system; the next call reads them again."""
    import gc

    for f in list(globals().values()):
        if callable(f) and hasattr(f, "cache_clear") and getattr(f, "__module__", "") == __name__:
            f.cache_clear()
    gc.collect()
    from lrc.sysmem import trim

    trim()  # glibc keeps the freed small blocks in its heap otherwise


def lee_similarity() -> tuple[list[str], np.ndarray]:
    """Lee 2005: 50 news documents and their 50x50 mean human similarity (symmetric, 0..1).

    The file stores the upper triangle; the usual score is the Pearson correlation between the
    model's cosine similarities and the human ratings over the 1225 pairs i < j.
    """
    docs = list(_lee_docs())
    sim = np.loadtxt(_gensim_data() / "similarities0-1.txt")
    if sim.shape != (len(docs), len(docs)):
        raise LrcError(f"Lee similarity matrix has shape {sim.shape}, expected 50x50")
    upper = np.triu(sim, 1)
    return docs, upper + upper.T + np.eye(len(docs))
