"""What a decode step's weight MatMuls cost on this machine: ONNX Runtime's ``MatMulNBits`` at
one token (M = 1), per node and per weight, for each bits / block size target-size may choose,
and what a concat-form correction adds (its ``X·A`` node, the ``Concat``, the ``rank`` rows
stacked under each member's codes). Measured once per machine, ORT version and thread count on
synthetic chains of nodes whose weights do not fit in the caches (as a decoder's do not), and
kept in ``$LRC_CACHE_DIR/decode`` (``~/.cache/lrc/decode``). The same at a prompt of
:data:`PREFILL_TOKENS` tokens (the prefill budget's prices): there the kernels are bound by
arithmetic, not by the bytes read, 8-bit codes cost ~1.4x 4-bit ones and a correction's two
extra nodes 9-23 % of its group (measured on a 2-core AMD EPYC).

The allocator (:mod:`lrc.allocate`) charges each choice its predicted time beside its bytes:
on ORT's CPU kernels a block of 64 is no faster than 32 (measured), and a correction costs two
nodes whose time at batch 1 is mostly fixed, so bytes alone do not tell a choice's speed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

#: bump when what is measured (or how) changes: older cache files then miss
VERSION = 4
#: the (bits, block) kinds measured; "f32": a float MatMul (a float correction's A)
KINDS = ((4, 32), (4, 64), (4, 128), (8, 32))  # what target-size chooses from
_SMALL, _LARGE = 256, 1024  # the square shapes a node's fixed and per-weight time come from
_CHAIN = 32  # nodes in a chain of small nodes
#: bytes of weights a chain of large nodes reads: several times a server's last-level cache, so
#: its weights stream from memory as a decoder's do (a chain that fits in the cache measured
#: 8-bit codes and corrections at a third of what they cost in SmolLM2's decode)
STREAM_BYTES = 192e6
_RANK = 32  # the correction measured (the smallest rank target-size chooses)
#: the prompt the prefill times are for (``lrc bench``'s prefill, s128)
PREFILL_TOKENS = 128
_PREFILL_LARGE_NODES = 16  # arithmetic-bound: no need to stream, a few large nodes suffice


@dataclass
class DecodeCost:
    """Seconds per decode step: ``node[kind] = (fixed, per weight)`` with ``kind`` "4/32",
    "8/32", ..., "f32"; ``concat`` the correction's Concat (and what else it costs beyond its
    two MatMuls). ``prefill`` and ``prefill_concat``: the same over a prompt of ``tokens``;
    ``prefill_corr = (fixed, per input, per weight of A)``: a correction with a 4-bit A there
    beyond its rows under the codes (its X·A node and its Concat, fitted on three chains: a
    thin node costs more per weight than the square ones)."""

    node: dict = field(default_factory=dict)
    concat: float = 0.0
    threads: int = 0
    where: str = ""
    prefill: dict = field(default_factory=dict)
    prefill_concat: float = 0.0
    tokens: int = 0
    prefill_corr: tuple = ()

    def matmul(self, k: int, n: int, bits: int, block: int, prefill: bool = False) -> float:
        """One [k, n] weight's MatMul at one token (over the prompt with ``prefill``):
        ``bits`` 32 is a float MatMul."""
        table = self.prefill if prefill else self.node
        key = "f32" if bits >= 32 else f"{bits}/{block}"
        if key not in table:  # a kind not measured: its bits at block 32
            key = f"{bits}/32" if f"{bits}/32" in table else "4/32"
        c0, c1 = table[key]
        return c0 + c1 * k * n

    def group(self, k: int, ns: list[int], bits: int, block: int, rank: int = 0,
              a_bits: int = 32, prefill: bool = False) -> float:
        """A group of weights ``[k, n_i]`` reading one input, with a concat correction of
        ``rank`` (A in ``a_bits`` codes of block 32, or float): the seconds its MatMuls take
        per decoded token (over the prompt with ``prefill``)."""
        t = sum(self.matmul(k + rank, n, bits, block, prefill) for n in ns)
        if rank and prefill and a_bits == 4 and self.prefill_corr:
            c0, ck, ca = self.prefill_corr
            t += c0 + ck * k + ca * k * rank
        elif rank:
            t += (self.matmul(k, rank, a_bits, 32, prefill)
                  + (self.prefill_concat if prefill else self.concat))
        return t

    def describe(self, prefill: bool = False) -> str:
        table = self.prefill if prefill else self.node
        us = {k: f"{v[0] * 1e6:.0f} us + {v[1] * 1e12:.2f} ps/weight" for k, v in table.items()}
        at = f"over {self.tokens} tokens" if prefill else "at one token"
        return (f"ORT CPU MatMulNBits {at}, {self.threads} threads ({self.where}): "
                + "; ".join(f"{k}: {v}" for k, v in us.items())
                + f"; a correction's Concat "
                f"{(self.prefill_concat if prefill else self.concat) * 1e6:.0f} us")


def _cache_file(threads: int) -> Path:
    import onnxruntime as ort

    env = os.environ.get("LRC_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "lrc"
    cpu = _cpu_name()
    key = f"v{VERSION}-ort{ort.__version__}-t{threads}-{cpu}"
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in key)[:160]
    return root / "decode" / f"{safe}.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threads(threads: int | None) -> int:
    return int(threads) if threads else (os.cpu_count() or 1)


def decode_cost(threads: int | None = None, *, cache: bool = True, runs: int = 15,
                stream_bytes: float = STREAM_BYTES) -> DecodeCost:
    """The machine's :class:`DecodeCost` (measured in a few seconds the first time; then read
    from the cache)."""
    n = _threads(threads)
    f = _cache_file(n)
    if cache and f.is_file():
        try:
            return DecodeCost(**json.loads(f.read_text()))
        except (ValueError, TypeError):
            pass  # a damaged cache file: measure again
    cost = measure(n, runs=runs, stream_bytes=stream_bytes)
    if cache:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(cost)))
        os.replace(tmp, f)
    return cost


def _chain(k: int, bits, block: int, n: int, rank: int = 0, seed: int = 0,
           tokens: int = 1) -> bytes:
    """``n`` square [k, k] MatMuls in a chain (``bits`` 32: float MatMul), each with its own
    weights, on ``tokens`` rows; with ``rank``, each node's input carries a concat correction
    (4-bit A)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def nbits(name, x, kk, nn, b, blk, out):
        if b >= 32:
            w = (rng.standard_normal((kk, nn)) / np.sqrt(kk)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, name + "_w"))
            return helper.make_node("MatMul", [x, name + "_w"], [out])
        nb = -(-kk // blk)
        inits.append(numpy_helper.from_array(
            rng.integers(0, 256, (nn, nb, blk * b // 8), dtype=np.uint8), name + "_q"))
        scale = 1.0 / (np.sqrt(kk) * (4.6 if b == 4 else 74.0))
        inits.append(numpy_helper.from_array(
            np.full(nn * nb, scale, np.float32), name + "_s"))
        return helper.make_node("MatMulNBits", [x, name + "_q", name + "_s"], [out],
                                domain="com.microsoft", K=kk, N=nn, bits=b, block_size=blk,
                                accuracy_level=4)

    x = "x"
    for i in range(n):
        inp = x
        if rank:
            nodes.append(nbits(f"a{i}", x, k, rank, 4, 32, f"a{i}_o"))
            nodes.append(helper.make_node("Concat", [x, f"a{i}_o"], [f"c{i}"], axis=-1))
            inp = f"c{i}"
        nodes.append(nbits(f"w{i}", inp, k + rank, k, bits, block, f"y{i}"))
        x = f"y{i}"
    g = helper.make_graph(nodes, "decode_cost",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, tokens, k])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def measure(threads: int, runs: int = 15, stream_bytes: float = STREAM_BYTES) -> DecodeCost:
    """Time the chains, interleaved (medians of ``runs``): per kind a chain of small and one of
    large nodes (``stream_bytes`` of weights in all) give its fixed and per-weight seconds; a
    chain with a rank-32 correction on every node, beside the plain 4/32 chain, gives the
    Concat's share. The same again over :data:`PREFILL_TOKENS` rows (a few large nodes)."""
    from lrc.runtime.session import open_session

    def large(bits):  # nodes of [_LARGE, _LARGE] whose weights add up to stream_bytes
        per_weight = bits / 8 + (4 / 32 if bits < 32 else 0)  # codes + a float scale per 32
        return max(int(stream_bytes // (_LARGE * _LARGE * per_weight)), 4)

    plans = {}
    for tokens in (1, PREFILL_TOKENS):
        nl = (lambda bits: _PREFILL_LARGE_NODES) if tokens > 1 else large
        for bits, block in KINDS:
            plans[(f"{bits}/{block}", _SMALL, tokens)] = (_SMALL, bits, block, _CHAIN, 0)
            plans[(f"{bits}/{block}", _LARGE, tokens)] = (_LARGE, bits, block, nl(bits), 0)
        plans[("f32", _SMALL, tokens)] = (_SMALL, 32, 0, _CHAIN, 0)
        plans[("f32", _LARGE, tokens)] = (_LARGE, 32, 0, nl(32), 0)
        plans[("corr", _SMALL, tokens)] = (_SMALL, 4, 32, _CHAIN, _RANK)
    plans[("corr", _LARGE, PREFILL_TOKENS)] = (_LARGE, 4, 32, _PREFILL_LARGE_NODES, _RANK)
    plans[("corr2", _LARGE, PREFILL_TOKENS)] = (_LARGE, 4, 32, _PREFILL_LARGE_NODES, 2 * _RANK)
    sessions = {key: open_session(_chain(*p, seed=i, tokens=key[2]), threads=threads)
                for i, (key, p) in enumerate(plans.items())}
    feeds = {key: {"x": np.random.default_rng(1).standard_normal(
        (1, key[2], plans[key][0])).astype(np.float32)} for key in plans}
    for key, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[key])
    times: dict = {key: [] for key in sessions}
    for _ in range(runs):
        for key, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[key])
            times[key].append(time.perf_counter() - t0)
    per_node = {key: float(np.median(v)) / plans[key][3] for key, v in times.items()}
    tables: dict = {1: {}, PREFILL_TOKENS: {}}
    for tokens, node in tables.items():
        for kind in [f"{b}/{bl}" for b, bl in KINDS] + ["f32"]:
            ts, tl = per_node[(kind, _SMALL, tokens)], per_node[(kind, _LARGE, tokens)]
            c1 = max((tl - ts) / (_LARGE ** 2 - _SMALL ** 2), 0.0)
            node[kind] = (max(ts - c1 * _SMALL ** 2, 0.0), c1)
    cost = DecodeCost(node=tables[1], threads=threads, where=f"{_cpu_name()}, measured "
                      f"{time.strftime('%Y-%m-%d')}", prefill=tables[PREFILL_TOKENS],
                      tokens=PREFILL_TOKENS)
    # the corrected chain's node, less what its two MatMuls predict: the Concat's share (from
    # small nodes, where the fixed costs it is made of are not lost among the weights' bytes)
    for tokens in tables:
        pre = tokens > 1
        corr = per_node[("corr", _SMALL, tokens)]
        share = max(corr - cost.matmul(_SMALL + _RANK, _SMALL, 4, 32, pre)
                    - cost.matmul(_SMALL, _RANK, 4, 32, pre), 0.0)
        setattr(cost, "prefill_concat" if pre else "concat", share)
    # over a prompt: what a correction adds beyond its rows, at two sizes and two ranks
    extra = {(k, r): per_node[(key, k, PREFILL_TOKENS)] - cost.matmul(k + r, k, 4, 32, True)
             for key, k, r in (("corr", _SMALL, _RANK), ("corr", _LARGE, _RANK),
                               ("corr2", _LARGE, 2 * _RANK))}
    ca = max((extra[(_LARGE, 2 * _RANK)] - extra[(_LARGE, _RANK)]) / (_LARGE * _RANK), 0.0)
    ck = max((extra[(_LARGE, _RANK)] - extra[(_SMALL, _RANK)]) / (_LARGE - _SMALL) - ca * _RANK,
             0.0)
    cost.prefill_corr = (max(extra[(_SMALL, _RANK)] - (ck + ca * _RANK) * _SMALL, 0.0), ck, ca)
    return cost


__all__ = ["DecodeCost", "decode_cost", "measure"]
