"""Python API mirroring the CLI: ``lrc.analyse`` and ``lrc.compress``.

    model, report = lrc.compress("model.onnx", rank=64, include=["ffn"])
    lrc.model.save(model, "small.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrc.errors import LrcError
from lrc.factorize import asvd_factor, break_even_rank, energy_ranks, singular_values, whiten_factor
from lrc.graph.model import as_model
from lrc.graph.locate import ROLES, locate
from lrc.graph.passes.lowrank import LowRankPass, Progress, plain_svd
from lrc.graph.policy import Policy, Setting, load_policy, make_setting


def build_policy(rank=None, energy=None, ratio=None, include=(), exclude=(), policy=None,
                 align: int = 1, allow_larger: bool = False, group_inputs: bool = False,
                 dense_edges: bool = False) -> Policy:
    """CLI/API options -> Policy. With nothing given the default is ``ratio 0.8``.

    ``dense_edges``: leave the first and the last transformer block dense (before any block rule
    of a policy file); with a budget (``target_params`` ...) the cut goes to the other blocks."""
    pol = _build_policy(rank, energy, ratio, include, exclude, policy, align, allow_larger,
                        group_inputs)
    if dense_edges and not any(b == EDGE_BLOCKS for b, _ in pol.blocks):
        pol.blocks.insert(0, (set(EDGE_BLOCKS), Setting(skip=True)))
    return pol


EDGE_BLOCKS = {0, -1}


def _build_policy(rank, energy, ratio, include, exclude, policy, align, allow_larger,
                  group_inputs) -> Policy:
    if isinstance(policy, Policy):
        if group_inputs:
            policy.group_inputs = True
        return policy
    given = any(v is not None for v in (rank, energy, ratio))
    default = make_setting(rank, energy, ratio) if given else make_setting(ratio=0.8)
    base = Policy(default=default, include=list(include or []), exclude=list(exclude or []),
                  align=align, allow_larger=allow_larger, group_inputs=group_inputs)
    if policy is not None:
        pol = load_policy(policy, base)
        if given:  # explicit CLI flags beat the file's default
            pol.default = default
        return pol
    return base


METHODS = ("auto", "svd", "asvd", "svd-llm")


def source_path(model_or_path) -> Path | None:
    """The .onnx file behind a path, or behind a model ``lrc.model.load`` read; None in memory."""
    from lrc.graph.model import resolve_model_path

    if isinstance(model_or_path, ir.Model):
        src = model_or_path.meta.get("lrc.source_path")
        return Path(src) if src else None
    if isinstance(model_or_path, (str, os.PathLike)):
        return resolve_model_path(model_or_path)
    return None


def resolve_method(model_or_path, method: str, rank=None, tokenizer=None) -> tuple[str, str]:
    """``auto`` -> the best measured method the input allows: ``svd-llm`` (whitening by
    calibration activations; orders of magnitude better than plain SVD on every model we
    measured) when the model's file, a tokenizer and the packaged calibration text are at hand;
    plain ``svd`` otherwise, and for ``--rank full`` (a verification of the rewrite itself)."""
    if method != "auto":
        return method, f"{method} (requested)"
    if rank == "full":
        return "svd", "svd: --rank full verifies the rewrite itself"
    src = source_path(model_or_path)
    if src is None:
        return "svd", "svd: no model file to calibrate on (in-memory model)"
    tok = Path(tokenizer) if tokenizer else src.parent / "tokenizer.json"
    if not tok.is_file():
        return "svd", f"svd: no tokenizer.json beside {src.name} for calibration text"
    try:
        from lrc.data import calibration_texts

        calibration_texts(n_tokens=1024)
    except LrcError as e:
        return "svd", f"svd: calibration text unavailable ({e})"
    return "svd-llm", "svd-llm: best measured; calibrated on the packaged mixed-domain text"


def compress(model_or_path, *, rank=None, energy=None, ratio=None, include=(), exclude=(),
             policy=None, align: int = 1, allow_larger: bool = False, group_inputs: bool = False,
             int8: bool | str = False,
             method: str = "auto", calib=None, calib_tokens: int = 16384, calib_seq: int = 256,
             calib_default: bool = True, tokenizer=None, alpha: float = 0.5,
             update: bool = False, update_damp: float = 0.1,
             target_params: float | None = None, target_size_mb: float | None = None,
             target_speedup: float | None = None, ep: str = "cpu", dense_edges: bool = False,
             factorizer=None, progress: Progress | None = None, calib_progress=None):
    """Rewrite the model's projections into low-rank pairs. Returns ``(ir.Model, report)``.

    ``report`` is a dict: ``rewritten`` and ``skipped`` records (every node with a reason),
    ``notes`` and ``totals``. The input model object is modified in place when one is given.
    ``int8``: False, True / "dynamic" (CPU EP), or "qdq" (GPU EPs) — see lrc.passes.int8."""
    pol = build_policy(rank, energy, ratio, include, exclude, policy, align, allow_larger,
                       group_inputs, dense_edges)
    if method not in METHODS:
        raise LrcError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    method, method_note = resolve_method(model_or_path, method, rank, tokenizer)
    if update and method != "svd-llm":
        raise LrcError("--update needs --method svd-llm")
    model = as_model(model_or_path)
    budget = None
    if sum(v is not None for v in (target_params, target_size_mb, target_speedup)) > 1:
        raise LrcError("give one budget: --target-params, --target-size or --target-speedup")
    speed = None
    if target_speedup is not None:
        speed = speedup_budget(model_or_path, target_speedup, ep)
        target_params = speed["params_fraction"]
    if target_params is not None or target_size_mb is not None:
        if any(v is not None for v in (rank, energy, ratio)):
            raise LrcError("give either a budget (--target-params/--target-size/--target-speedup)"
                           " or --rank/--energy/--ratio, not both")
        budget = solve_budget(model, pol, target_params, target_size_mb)
        if speed:
            budget.update(speed)
        pol.default = make_setting(ratio=budget["ratio"])
    calib_info = None
    if method != "svd" and factorizer is None:
        factorizer, calib_info = data_aware_factorizer(
            model, model_or_path, pol, method, calib=calib, n_tokens=calib_tokens,
            seq_len=calib_seq, use_default=calib_default, tokenizer=tokenizer, alpha=alpha,
            progress=calib_progress, update=update, damp=update_damp)
    lr = LowRankPass(pol, factorizer=factorizer, progress=progress)
    lr(model)
    record = lr.record
    report = record.to_dict()
    if int8 and record.rewritten:
        from lrc.graph.passes.int8 import Int8FactorsPass

        q = Int8FactorsPass("dynamic" if int8 is True else int8)
        q(model)
        report["int8"] = q.record
    RemoveUnusedNodesPass()(model)
    report["summary"] = record.summary_line()
    report["method"] = method + ("+update" if update else "")
    report["method_note"] = method_note
    if budget:
        report["budget"] = budget
    if calib_info:
        report["calibration"] = calib_info
    report["policy"] = {"default": pol.default.describe(), "include": pol.include,
                        "exclude": pol.exclude, "align": pol.align,
                        "group_inputs": pol.group_inputs,
                        "dense_blocks": sorted({i for b, s in pol.blocks if s.skip for i in b})}
    return model, report


def speedup_budget(model_or_path, speedup: float, ep: str = "cpu") -> dict:
    """Fraction of projection parameters to keep for a target speedup, from a cost model
    measured once with ONNX Runtime: the dense model is profiled at batch 1 x 128 tokens and
    ``f`` is the fraction of kernel time in weight MatMuls; Amdahl's law
    ``S = 1 / ((1 - f) + f·ρ)`` gives ``ρ = (1/S - (1 - f)) / f``. Measured low-rank speedups
    reach 0.9-1.0 of this bound (BENCHMARKS.md), so treat the target as an upper estimate."""
    import tempfile

    from lrc.measure.bench import profile_matmul_fraction, resolve_ep

    path = source_path(model_or_path)
    if path is None:
        raise LrcError("--target-speedup needs the model's file (it profiles it in ONNX Runtime)")
    if not speedup > 1:
        raise LrcError(f"--target-speedup must be > 1, got {speedup}")
    provider = resolve_ep(ep)
    with tempfile.TemporaryDirectory() as work:
        prof = profile_matmul_fraction(path, provider, None, 1, 128, 0, 5, Path(work))
    f = float(prof["matmul_fraction"][prof["phase"]])  # prefill (decoders) or encoder
    limit = 1 / (1 - f) if f < 1 else float("inf")
    rho = (1 / speedup - (1 - f)) / f if f > 0 else -1
    if rho <= 0:
        raise LrcError(f"--target-speedup {speedup:g} is beyond what shrinking the projections can "
                       f"give: they take {f:.0%} of the time, so the limit is {limit:.2f}x")
    return {"target_speedup": speedup, "matmul_time_fraction": round(f, 4),
            "params_fraction": round(rho, 6), "ep": provider,
            "speedup_note": "Amdahl bound from an ORT profile at batch 1 x 128; measured speedups "
                            "reach 0.9-1.0 of it"}


def solve_budget(model, pol: Policy, target_params=None, target_size_mb=None) -> dict:
    """The uniform ratio for the selected projections that meets a global budget.

    ``target_params``: fraction of all eligible projection parameters kept overall (matrices not
    selected count at full size). ``target_size_mb``: size of all initializers in MB. Ranks are
    allocated uniformly: on SmolLM2 every automatic per-layer allocator we measured (normalised
    whitened energy, raw energy, measured sensitivity) lost to uniform, so uniform is what ships.
    A hand-written policy does beat it there: the first and last blocks dense, a uniform ratio
    elsewhere (benchmarks/allocation.md; benchmarks/policies/smollm2-0.78.yaml)."""
    seen: dict = {}
    for t in locate(model):
        if t.eligible and t.weight_key not in seen:
            seen[t.weight_key] = t
    sel = [t for t in seen.values() if pol.setting_for(t)[0] is not None]
    total = sum(t.params for t in seen.values())
    chosen = sum(t.params for t in sel)
    if not chosen:
        raise LrcError("the budget selects no eligible projection")
    if target_params is not None:
        if not 0 < target_params <= 1:
            raise LrcError(f"--target-params must be in (0, 1], got {target_params}")
        ratio = (target_params * total - (total - chosen)) / chosen
        want = f"{target_params:g} of {total:,} projection parameters"
    else:
        itemsize = {t.weight_key: t.weight.const_value.dtype.itemsize for t in sel}
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                   if v.const_value is not None)
        sel_bytes = sum(t.params * itemsize[t.weight_key] for t in sel)
        tied = sum(t.params * itemsize[t.weight_key] for t in sel if t.tied)
        # the selected matrices' bytes scale with the ratio; tied ones add their factors
        ratio = (target_size_mb * 1e6 - (size - sel_bytes + tied)) / sel_bytes
        want = f"{target_size_mb:g} MB of weights (now {size / 1e6:.1f} MB)"
    if ratio <= 0:
        raise LrcError(f"budget {want} cannot be met by factorising the selected projections")
    if ratio >= 1:
        raise LrcError(f"budget {want} needs no compression of the selected projections")
    return {"ratio": round(float(ratio), 6), "target": want, "allocation": "uniform",
            "selected_params": int(chosen), "all_params": int(total)}


def data_aware_factorizer(model, model_or_path, pol: Policy, method: str, *, calib=None,
                          n_tokens: int = 16384, seq_len: int = 256, use_default: bool = True,
                          tokenizer=None, alpha: float = 0.5, progress=None,
                          update: bool = False, damp: float = 0.1):
    """A factoriser using activation statistics of each target's input, collected by running
    the original ONNX model in ONNX Runtime on calibration text (cached on disk).

    Calibration text: lrc's bundled mixed-domain set (news, wiki markup, forum dialogue, Python
    code; disjoint from the evaluation texts) plus the user's files in ``calib``; ``use_default=False`` keeps
    only the user's. Mixing domains matters: statistics from one domain make the factors drop
    directions other domains use."""
    from lrc.calibration.stats import cached_stats

    src = source_path(model_or_path)
    if src is None:
        raise LrcError(f"--method {method} needs the model's file (it runs ONNX Runtime on "
                       "calibration text): pass a path")
    texts: list[str] = []
    sources = []
    for f in ([calib] if isinstance(calib, (str, Path)) else list(calib or [])):
        p = Path(f)
        if not p.is_file():
            raise LrcError(f"calibration file {str(p)!r} not found")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
        sources.append(str(p))
    if use_default or not texts:
        from lrc.data import calibration_texts

        texts.extend(calibration_texts(n_tokens=int(n_tokens * 1.2)))
        sources.append("bundled mix: news (Lee corpus, calibration half), wiki markup, forum posts, "
                       "Python code")
    if update:  # sequential joint fit (lrc/update.py): two forward passes over the text
        from lrc.calibration.sequential import sequential_factorizer

        factor, info = sequential_factorizer(model, str(src), pol, texts, n_tokens=n_tokens,
                                             seq_len=seq_len, tokenizer=tokenizer, damp=damp,
                                             progress=progress)
        if info is not None:
            info["sources"] = sources
        return factor, info
    names = sorted({t.node.inputs[0].name for t in locate(model)
                    if t.eligible and pol.setting_for(t)[0] is not None})
    if not names:
        return None, None
    stats = cached_stats(str(src), names, texts, n_tokens=n_tokens, seq_len=seq_len,
                         tokenizer=tokenizer, progress=progress)
    info = {"method": method, "tokens": int(n_tokens), "seq_len": seq_len, "sources": sources,
            "inputs": len(names)}

    def factor(t, w, rank):
        st = stats.get(t.node.inputs[0].name)
        if st is None:
            return plain_svd(t, w, rank)
        if method == "asvd":
            return asvd_factor(w, st.abs_mean, rank, alpha=alpha)
        return whiten_factor(w, st.xtx, rank)

    return factor, info


def analyse(model_or_path, *, rank=None, energy=None, ratio=None, include=(), exclude=(),
            policy=None, align: int = 1, allow_larger: bool = False, spectrum: bool = False):
    """Every projection with its spectrum summary and what the setting would do to it."""
    pol = build_policy(rank, energy, ratio, include, exclude, policy, align, allow_larger)
    model = as_model(model_or_path)
    rows = []
    sigmas: dict = {}
    for t in locate(model):
        row = {"name": t.name, "role": t.role, "role_source": t.role_source, "block": t.block,
               "path": t.path, "op": t.op, "shape": list(t.shape), "params": t.params,
               "dtype": t.dtype, "shared_with": t.shared_with, "tied": t.tied}
        if not t.eligible:
            row.update(eligible=False, reason=t.skip)
            rows.append(row)
            continue
        m, n = t.shape
        if t.weight_key not in sigmas:
            w = t.weight.const_value.numpy()
            sigmas[t.weight_key] = singular_values(w)
        s = sigmas[t.weight_key]
        er = energy_ranks(s)
        d = pol.decide(t, s)
        after = d.rank * (m + n) if d.rank else m * n
        row.update(eligible=True, rank90=er[0.90], rank95=er[0.95], rank99=er[0.99],
                   break_even=break_even_rank(m, n), rank=d.rank, reason=d.reason,
                   params_after=after, saved=m * n - after)
        if d.rank:
            e = s ** 2
            row["energy_kept"] = float(e[: d.rank].sum() / e.sum()) if e.sum() > 0 else 1.0
        if spectrum:
            row["spectrum"] = [float(x) for x in s]
        rows.append(row)
    totals: dict = {}
    seen = set()
    for r in rows:
        if not r.get("eligible"):
            continue
        tot = totals.setdefault(r["role"], {"count": 0, "params": 0, "params_after": 0})
        tot["count"] += 1
        wkey = tuple(sorted([r["name"], *r["shared_with"]]))  # a shared weight counts once
        if wkey in seen:
            continue
        seen.add(wkey)
        tot["params"] += r["params"]
        tot["params_after"] += r["params_after"]
    model_tot = {"count": sum(v["count"] for v in totals.values()),
                 "params": sum(v["params"] for v in totals.values()),
                 "params_after": sum(v["params_after"] for v in totals.values())}
    all_params = sum(v.const_value.size for v in model.graph.initializers.values()
                     if v.const_value is not None)
    return {"nodes": rows, "roles": {r: totals[r] for r in ROLES if r in totals},
            "totals": model_tot, "model_params": int(all_params),
            "setting": pol.default.describe(),
            "ineligible": sum(1 for r in rows if not r.get("eligible"))}


def quantize_rest(model_path, out, mode: str = "int8", exclude_factors: bool = True,
                  per_channel: bool = True, block_size: int = 32, **kw) -> dict:
    """ONNX Runtime's quantisers on what low rank left dense (file or folder in, same out):
    ``mode`` 'int8' (quantize_dynamic) or 'int4' (MatMulNBits). See lrc.quantize."""
    from lrc.quantize import quantize_rest as run

    return run(model_path, out, mode, exclude_factors=exclude_factors,
               per_channel=per_channel, block_size=block_size, **kw)


def tune(model, **kw) -> dict:
    """Measure INT8, 4-bit and low-rank candidates (alone and stacked) and write the fastest
    (or smallest) within the quality budget. See lrc.tune.tune for the arguments."""
    from lrc.tune import tune as run

    return run(model, **kw)


__all__ = ["analyse", "build_policy", "compress", "ir", "quantize_rest", "tune"]
