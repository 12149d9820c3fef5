"""What a decode step's weight MatMuls cost on this machine: ONNX Runtime's ``MatMulNBits`` at
one token (M = 1), per node and per weight, for each bits / block size target-size may choose,
and what a concat-form correction adds (its ``X·A`` node, the ``Concat``, the ``rank`` rows
stacked under each member's codes). Measured once per machine, ORT version and thread count on
synthetic chains of nodes whose weights do not fit in the caches (as a decoder's do not), and
kept in ``$LRC_CACHE_DIR/decode`` (``~/.cache/lrc/decode``).

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
VERSION = 2
#: the (bits, block) kinds measured; "f32": a float MatMul (a float correction's A)
KINDS = ((4, 32), (4, 64), (4, 128), (8, 32))  # what target-size chooses from
_SMALL, _LARGE = 256, 1024  # the square shapes a node's fixed and per-weight time come from
_CHAIN = 32  # nodes in a chain of small nodes
#: bytes of weights a chain of large nodes reads: several times a server's last-level cache, so
#: its weights stream from memory as a decoder's do (a chain that fits in the cache measured
#: 8-bit codes and corrections at a third of what they cost in SmolLM2's decode)
STREAM_BYTES = 192e6
_RANK = 64  # the correction measured


@dataclass
class DecodeCost:
    """Seconds per decode step: ``node[kind] = (fixed, per weight)`` with ``kind`` "4/32",
    "8/32", ..., "f32"; ``concat`` the correction's Concat (and what else it costs beyond its
    two MatMuls)."""

    node: dict = field(default_factory=dict)
    concat: float = 0.0
    threads: int = 0
    where: str = ""

    def matmul(self, k: int, n: int, bits: int, block: int) -> float:
        """One [k, n] weight's MatMul at one token: ``bits`` 32 is a float MatMul."""
        key = "f32" if bits >= 32 else f"{bits}/{block}"
        if key not in self.node:  # a kind not measured: its bits at block 32
            key = f"{bits}/32" if f"{bits}/32" in self.node else "4/32"
        c0, c1 = self.node[key]
        return c0 + c1 * k * n

    def group(self, k: int, ns: list[int], bits: int, block: int, rank: int = 0,
              a_bits: int = 32) -> float:
        """A group of weights ``[k, n_i]`` reading one input, with a concat correction of
        ``rank`` (A in ``a_bits`` codes of block 32, or float): the seconds its MatMuls take."""
        t = sum(self.matmul(k + rank, n, bits, block) for n in ns)
        if rank:
            t += self.matmul(k, rank, a_bits, 32) + self.concat
        return t

    def describe(self) -> str:
        us = {k: f"{v[0] * 1e6:.0f} us + {v[1] * 1e12:.2f} ps/weight" for k, v in self.node.items()}
        return (f"ORT CPU MatMulNBits at one token, {self.threads} threads ({self.where}): "
                + "; ".join(f"{k}: {v}" for k, v in us.items())
                + f"; a correction's Concat {self.concat * 1e6:.0f} us")


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


def _chain(k: int, bits, block: int, n: int, rank: int = 0, seed: int = 0) -> bytes:
    """``n`` square [k, k] MatMuls in a chain (``bits`` 32: float MatMul), each with its own
    weights; with ``rank``, each node's input carries a concat correction (4-bit A)."""
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
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, k])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def measure(threads: int, runs: int = 15, stream_bytes: float = STREAM_BYTES) -> DecodeCost:
    """Time the chains, interleaved (medians of ``runs``): per kind a chain of small and one of
    large nodes (``stream_bytes`` of weights in all) give its fixed and per-weight seconds; a
    chain with a rank-64 correction on every node, beside the plain 4/32 chain, gives the
    Concat's share."""
    from lrc.runtime.session import open_session

    def large(bits):  # nodes of [_LARGE, _LARGE] whose weights add up to stream_bytes
        per_weight = bits / 8 + (4 / 32 if bits < 32 else 0)  # codes + a float scale per 32
        return max(int(stream_bytes // (_LARGE * _LARGE * per_weight)), 4)

    plans = {}
    for bits, block in KINDS:
        plans[(f"{bits}/{block}", _SMALL)] = (_SMALL, bits, block, _CHAIN, 0)
        plans[(f"{bits}/{block}", _LARGE)] = (_LARGE, bits, block, large(bits), 0)
    plans[("f32", _SMALL)] = (_SMALL, 32, 0, _CHAIN, 0)
    plans[("f32", _LARGE)] = (_LARGE, 32, 0, large(32), 0)
    plans[("corr", _SMALL)] = (_SMALL, 4, 32, _CHAIN, _RANK)
    sessions = {key: open_session(_chain(*p, seed=i), threads=threads)
                for i, (key, p) in enumerate(plans.items())}
    feeds = {key: {"x": np.random.default_rng(1).standard_normal(
        (1, 1, plans[key][0])).astype(np.float32)} for key in plans}
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
    node = {}
    for kind in [f"{b}/{bl}" for b, bl in KINDS] + ["f32"]:
        ts, tl = per_node[(kind, _SMALL)], per_node[(kind, _LARGE)]
        c1 = max((tl - ts) / (_LARGE ** 2 - _SMALL ** 2), 0.0)
        node[kind] = (max(ts - c1 * _SMALL ** 2, 0.0), c1)
    cost = DecodeCost(node=node, threads=threads, where=f"{_cpu_name()}, measured "
                      f"{time.strftime('%Y-%m-%d')}")
    # the corrected chain's node, less what its two MatMuls predict: the Concat's share (from
    # small nodes, where the fixed costs it is made of are not lost among the weights' bytes)
    corr = per_node[("corr", _SMALL)]
    cost.concat = max(corr - cost.matmul(_SMALL + _RANK, _SMALL, 4, 32)
                      - cost.matmul(_SMALL, _RANK, 4, 32), 0.0)
    return cost


__all__ = ["DecodeCost", "decode_cost", "measure"]
