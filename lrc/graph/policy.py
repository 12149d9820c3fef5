"""Which projections to factorise, and at what rank.

A setting is one of ``rank: N`` (or ``rank: full``), ``energy: 0.95`` (smallest rank keeping that
fraction of the spectral energy ``Σσ²``), ``ratio: 0.5`` (fraction of the matrix's parameters the
factors may hold) or ``skip``. A policy has a default setting, include/exclude filters and
overrides; the most specific override wins: ``nodes`` (glob on node name or module path) >
``blocks`` (``"0"``, ``"0-3"``, ``"1,5,7"``, ``"0,-1"``: negative counts from the end) > ``roles`` (a role such as ``ffn.down`` or a group
``ffn``/``attn``) > default.

Policy file (YAML or JSON)::

    ratio: 0.8              # default setting (or rank / energy)
    include: [ffn, attn]    # roles, groups, or name globs containing * ? [
    exclude: [head]
    align: 8                # round ratio/energy ranks down to a multiple of 8
    group_inputs: true      # projections reading one input (Q/K/V, gate/up) share one A
    roles:   {attn.o: {ratio: 0.9}, ffn.down: {rank: 128}}
    blocks:  {"0,-1": skip, "1": {ratio: 0.95}}   # first and last blocks dense
    nodes:   {"*lm_head*": skip}
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from lrc.errors import LrcError, opt, render
from lrc.factorize import break_even_rank, rank_for_energy, rank_for_ratio
from lrc.graph.locate import ROLE_GROUPS, ROLES, Target, is_role_token, role_matches

_GLOB = set("*?[")
MAX_BLOCK_RANGE = 100_000  # a block range wider than this is a typo, not a model


def _names(keys) -> list[str]:
    """Keys for a message, sorted as text (YAML keys may be ints, None, ...)."""
    return sorted(str(k) for k in keys)


@dataclass(frozen=True)
class Setting:
    rank: int | str | None = None  # int or "full"
    energy: float | None = None
    ratio: float | None = None
    skip: bool = False

    @property
    def needs_spectrum(self) -> bool:
        return self.energy is not None

    def describe(self) -> str:
        if self.skip:
            return "skip"
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.energy is not None:
            return f"energy {self.energy:g}"
        return f"ratio {self.ratio:g}"


def make_setting(rank=None, energy=None, ratio=None, where: str = "") -> Setting:
    given = [k for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio)) if v is not None]
    at = f" in {where}" if where else ""
    if len(given) > 1:
        raise LrcError(f"give only one of {opt('rank')}, {opt('energy')}, {opt('ratio')}{at} "
                       f"(got {', '.join(given)})")
    if rank is not None:
        if isinstance(rank, str):
            if rank.strip().lower() == "full":
                rank = "full"
            else:
                try:
                    rank = int(rank)
                except ValueError:
                    raise LrcError(f"rank must be a positive integer or 'full'{at}, got {rank!r}")
        if isinstance(rank, bool) or (rank != "full" and (not isinstance(rank, int) or rank <= 0)):
            raise LrcError(f"rank must be a positive integer or 'full'{at}, got {rank!r}")
    for key, v in (("energy", energy), ("ratio", ratio)):  # bool is an int: refuse true/false
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not 0 < v <= 1):
            raise LrcError(f"{key} must be a number in (0, 1]{at}, got {v!r}")
    return Setting(rank=rank, energy=energy, ratio=ratio)


def _parse_setting(value, where: str) -> Setting:
    if isinstance(value, str) and value.strip().lower() in ("skip", "dense"):
        return Setting(skip=True)
    if not isinstance(value, dict):
        raise LrcError(f"bad policy: {where} must be a mapping like {{ratio: 0.8}} or 'skip', "
                       f"got {value!r}")
    unknown = set(value) - {"rank", "energy", "ratio", "skip"}
    if unknown:
        raise LrcError(f"bad policy: unknown key(s) {_names(unknown)} in {where}")
    if not isinstance(value.get("skip", False), bool):
        raise LrcError(f"bad policy: skip in {where} must be true or false, "
                       f"got {value['skip']!r}")
    if value.get("skip"):
        return Setting(skip=True)
    s = make_setting(value.get("rank"), value.get("energy"), value.get("ratio"), where)
    if s.rank is None and s.energy is None and s.ratio is None:
        raise LrcError(f"bad policy: {where} needs one of rank, energy, ratio or skip")
    return s


def check_selector(token: str) -> str:
    """A role, a group, or a glob; anything else is an unknown role."""
    token = token.strip()
    if token.startswith("name:") or _GLOB & set(token) or is_role_token(token):
        return token
    raise LrcError(f"unknown role {token!r}: use one of {', '.join(ROLES)}, a group "
                   f"({', '.join(sorted(ROLE_GROUPS))}) or a name glob such as '*down_proj*'")


def selector_matches(token: str, t: Target) -> bool:
    """Whether ``t`` is selected by ``token`` (a role, a group, ``name:X`` or a glob)."""
    if token.startswith("name:"):
        pat = token[5:]
    elif is_role_token(token):
        return role_matches(t.role, token)
    else:
        pat = token
    return fnmatch.fnmatchcase(t.name, pat) or (bool(t.path) and fnmatch.fnmatchcase(t.path, pat))


def _parse_blocks(key) -> set[int]:
    """Block indices; negative ones count from the end (``-1`` is the last block)."""
    out: set[int] = set()
    for part in str(key).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else ("", "")
                lo, hi = int(lo), int(hi)
                if not 0 <= hi - lo < MAX_BLOCK_RANGE:
                    raise LrcError(f"bad policy: block range {part!r} in key {key!r} is empty "
                                   f"or wider than {MAX_BLOCK_RANGE:,} blocks")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise LrcError(f"bad policy: block key {key!r} must look like '3', '0-5', '1,4' or "
                           "'0,-1' (negative: from the end)")
    return out


@dataclass
class Decision:
    rank: int | None  # None: left dense
    reason: str | None  # why dense (or a note)
    setting: Setting
    kind: str = "rewrite"  # rewrite | excluded | unprofitable


@dataclass
class Policy:
    default: Setting = field(default_factory=lambda: Setting(ratio=0.8))
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    roles: dict[str, Setting] = field(default_factory=dict)
    blocks: list[tuple[set[int], Setting]] = field(default_factory=list)
    nodes: list[tuple[str, Setting]] = field(default_factory=list)
    align: int = 1
    allow_larger: bool = False
    # factor projections that read the same tensor (Q/K/V, gate/up) jointly: one A, one B each
    group_inputs: bool = False

    def __post_init__(self):
        self.include = [check_selector(s) for s in self.include]
        self.exclude = [check_selector(s) for s in self.exclude]
        for r in self.roles:
            if not is_role_token(r):
                raise LrcError(f"bad policy: unknown role {r!r} under roles "
                               f"(use one of {', '.join(ROLES)} or a group)")
        if self.align < 1:
            raise LrcError("align must be >= 1")

    @property
    def needs_spectrum(self) -> bool:
        return any(s.needs_spectrum for s in self._all_settings())

    def _all_settings(self):
        yield self.default
        yield from self.roles.values()
        yield from (s for _, s in self.blocks)
        yield from (s for _, s in self.nodes)

    def setting_for(self, t: Target) -> tuple[Setting | None, str | None]:
        """(setting, None) or (None, why excluded)."""
        if self.include and not any(selector_matches(s, t) for s in self.include):
            return None, render(f"not selected by {opt('include', ','.join(self.include))}")
        for s in self.exclude:
            if selector_matches(s, t):
                return None, f"excluded by {s!r}"
        for pat, s in self.nodes:
            if selector_matches(pat if _GLOB & set(pat) else "name:" + pat, t):
                return (None, f"skipped by policy nodes[{pat!r}]") if s.skip else (s, None)
        if t.block is not None:
            from_end = t.block - t.n_blocks if t.n_blocks else None  # -1: the last block
            for blocks, s in self.blocks:
                if t.block in blocks or (from_end is not None and from_end in blocks):
                    return (None, f"skipped by policy for block {t.block}") if s.skip else (s, None)
        best = None
        for r, s in self.roles.items():  # an exact role beats its group
            if role_matches(t.role, r) and (best is None or r == t.role):
                best = (r, s)
        if best is not None:
            r, s = best
            return (None, f"skipped by policy for role {r}") if s.skip else (s, None)
        if self.default.skip:
            return None, "skipped by the policy's default"
        return self.default, None

    def decide(self, t: Target, sigma=None) -> Decision:
        setting, why = self.setting_for(t)
        if setting is None:
            return Decision(None, why, Setting(skip=True), "excluded")
        m, n = t.shape
        full = min(m, n)
        if setting.rank == "full":
            return Decision(full, "full rank (verification)", setting)
        if setting.rank is not None:
            r = int(setting.rank)
        elif setting.energy is not None:
            r = rank_for_energy(sigma, setting.energy)
        else:
            r = rank_for_ratio(m, n, setting.ratio)
        if setting.rank is None and self.align > 1:
            r = max(self.align, (r // self.align) * self.align)
        if r >= full:
            return Decision(None, f"rank {r} >= min(in, out) = {full}: left dense", setting,
                            "unprofitable")
        be = break_even_rank(m, n)
        if r > be and not self.allow_larger:
            return Decision(None, f"rank {r} would not shrink {m}x{n} (break-even rank {be}): "
                                  "left dense", setting, "unprofitable")
        return Decision(r, None, setting)


def load_policy(path: str | Path, base: Policy | None = None) -> Policy:
    """Read a YAML/JSON policy file; CLI values in ``base`` fill what the file leaves out."""
    p = Path(path)
    if not p.is_file():
        raise LrcError(f"policy file {str(p)!r} not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LrcError(f"bad policy file {str(p)!r}: {first}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LrcError(f"bad policy file {str(p)!r}: top level must be a mapping")
    allowed = {"rank", "energy", "ratio", "include", "exclude", "align", "roles", "blocks",
               "nodes", "allow_larger", "group_inputs"}
    unknown = set(data) - allowed
    if unknown:
        raise LrcError(f"bad policy file {str(p)!r}: unknown key(s) {_names(unknown)}; "
                       f"allowed: {sorted(allowed)}")
    base = base or Policy()
    default = base.default
    if any(k in data for k in ("rank", "energy", "ratio")):
        default = make_setting(data.get("rank"), data.get("energy"), data.get("ratio"), str(p))

    def _list(key):
        v = data.get(key, [])
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise LrcError(f"bad policy file {str(p)!r}: {key} must be a list of roles, "
                           f"groups or name globs, got {v!r}")
        return v

    def _map(key):
        v = data.get(key, {}) or {}
        if not isinstance(v, dict):
            raise LrcError(f"bad policy file {str(p)!r}: {key} must be a mapping")
        return v

    roles = {str(k): _parse_setting(v, f"roles.{k}") for k, v in _map("roles").items()}
    blocks = [(_parse_blocks(k), _parse_setting(v, f"blocks.{k}")) for k, v in _map("blocks").items()]
    nodes = [(str(k), _parse_setting(v, f"nodes.{k}")) for k, v in _map("nodes").items()]
    align = data.get("align", base.align)
    if not isinstance(align, int) or isinstance(align, bool):
        raise LrcError(f"bad policy file {str(p)!r}: align must be an integer")
    for key in ("allow_larger", "group_inputs"):  # bool("no") would be True
        if not isinstance(data.get(key, False), bool):
            raise LrcError(f"bad policy file {str(p)!r}: {key} must be true or false, "
                           f"got {data[key]!r}")
    return Policy(default=default, include=base.include + _list("include"),
                  exclude=base.exclude + _list("exclude"), roles=roles, blocks=blocks,
                  nodes=nodes, align=align,
                  allow_larger=bool(data.get("allow_larger", base.allow_larger)),
                  group_inputs=bool(data.get("group_inputs", base.group_inputs)))
