"""Python API mirroring the CLI: ``lrc.analyse`` and ``lrc.compress``.

    model, report = lrc.compress("model.onnx", rank=64, include=["ffn"])
    lrc.model.save(model, "small.onnx")

``lrc.compress`` takes every option of ``lrc compress`` by name (:mod:`lrc.config`); so does
``lrc.analyse`` for the low-rank ones.
"""

from __future__ import annotations

from lrc.config import LowRankConfig
from lrc.factorize import break_even_rank, energy_ranks, singular_values
from lrc.graph.locate import ROLES, locate
from lrc.modelref import resolve
from lrc.pipeline import compress


def analyse(model_or_path, *, rank=None, energy=None, ratio=None, include=(), exclude=(),
            policy=None, align: int = 1, allow_larger: bool = False, spectrum: bool = False):
    """Every projection with its spectrum summary and what the setting would do to it."""
    cfg = LowRankConfig(rank=rank, energy=energy, ratio=ratio, include=list(include or []),
                        exclude=list(exclude or []), policy=policy, align=align,
                        allow_larger=allow_larger)
    cfg.validate()
    pol = cfg.build()
    model = resolve(model_or_path).load()
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


__all__ = ["analyse", "compress", "quantize_rest"]
