"""Locate the projections a low-rank rewrite can target, and say what each one is.

A *target* is a ``MatMul(X, W)`` or ``Gemm(X, W, C)`` in the main graph whose weight ``W`` is a
constant: an initializer, possibly reached through ``Transpose(perm=[1, 0])`` (tied lm_heads,
``nn.Linear`` exported without folding) and/or one float-to-float ``Cast`` (fp16 weights a
float32 node reads: ``convert_float_to_float16(op_block_list=..., force_fp16_initializers=True)``
writes ``Cast(W_fp16, to=float)``; ``Target.cast_to`` then says what the node computes in).
Every such node is returned; the ones that cannot be
rewritten carry ``skip`` — a reason in words (3-D weight, constant on the left, Gemm transA,
weight overridable as a graph input, ...). Matrix products of two activations (attention scores)
are not targets and are not listed.

Roles (``attn.q attn.k attn.v attn.qkv attn.o ffn.up ffn.gate ffn.down head other``) come from the
module path, read in this order of preference: the torch dynamo exporter's node metadata
``pkg.torch.onnx.name_scopes`` (its weights are ``val_N`` and nodes ``node_linear_N``), the node
name (``/model/layers.0/self_attn/q_proj/MatMul`` from torch.onnx / optimum), the weight's name
(``model.layers.0.mlp.down_proj.weight``). Where no name says anything (stripped graphs), the
graph's structure is read instead: a weight shared with a ``Gather`` or a projection producing a
graph output is the head, three projections of one input are Q/K/V, two are gate/up, and so on.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field

import onnx_ir as ir

ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
         "ffn.up", "ffn.gate", "ffn.down", "head", "other")
ROLE_GROUPS = {
    "attn": ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o"),
    "ffn": ("ffn.up", "ffn.gate", "ffn.down"),
    "mlp": ("ffn.up", "ffn.gate", "ffn.down"),
    "head": ("head",),
    "other": ("other",),
}
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
FACTOR_META = "lrc.factor"  # metadata key lrc puts on the MatMuls it emits

_HEAD = {"lm_head", "embed_out", "output_projection", "classifier", "score", "qa_outputs",
         "head", "output_layer"}
_QKV = {"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv", "in_proj", "w_pack"}
_Q = {"q_proj", "query", "wq", "q_lin"}
_K = {"k_proj", "key", "wk", "k_lin"}
_V = {"v_proj", "value", "wv", "v_lin"}
_O = {"o_proj", "out_proj", "out_lin", "o_lin"}
_GATE = {"gate_proj", "wi_0", "w1", "gate"}
_UP = {"up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "wi", "wi_1", "w3", "lin1",
       "gate_up_proj"}
_DOWN = {"down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "lin2"}
_BLOCK = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|block)\.(\d+)(?:\.|$)")
_NUM = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_UNINFORMATIVE = re.compile(r"^(?:val_\d+|node_\w+|onnx::\w+|linear(?:_\d+)?|matmul(?:_\d+)?"
                            r"|gemm(?:_\d+)?|\d+|)$", re.IGNORECASE)


@dataclass
class Target:
    """One MatMul/Gemm with a constant weight. ``shape`` is the effective ``[in, out]``."""

    node: ir.Node
    name: str
    path: str
    role: str
    block: int | None
    op: str  # "MatMul" | "Gemm"
    weight: ir.Value | None
    transposed: bool  # effective W is weight.T (Transpose node or Gemm transB=1)
    shape: tuple[int, ...]
    dtype: str
    skip: str | None = None
    role_source: str = "name"  # "name" | "structure" | "none"
    shared_with: list[str] = field(default_factory=list)  # other targets using the same weight
    tied: bool = False  # weight also used by a non-projection node (e.g. embedding Gather)
    n_blocks: int | None = None  # blocks in the model (highest block index + 1) when known
    cast_to: ir.DataType | None = None  # the weight reaches the node through Cast(to=this)

    @property
    def compute_dtype(self) -> ir.DataType | None:
        """The element type the node multiplies in: the Cast's target, else the weight's."""
        if self.cast_to is not None:
            return self.cast_to
        w = self.weight.const_value if self.weight is not None else None
        return w.dtype if w is not None else None

    @property
    def eligible(self) -> bool:
        return self.skip is None

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def weight_key(self) -> tuple[str, bool]:
        """Targets with the same key can share one pair of factors."""
        return (self.weight.name if self.weight is not None else self.name, self.transposed)


def role_matches(role: str, token: str) -> bool:
    """``token`` is a role (``ffn.up``) or a group (``ffn``, ``attn``)."""
    return role == token or role in ROLE_GROUPS.get(token, ())


def is_role_token(token: str) -> bool:
    return token in ROLES or token in ROLE_GROUPS


def classify(path: str) -> tuple[str, int | None]:
    """Role and block index from a dotted module path; ``("other", None)`` when unknown."""
    p = path.lower().strip(".")
    comps = [c for c in p.split(".") if c]
    block = None
    m = _BLOCK.search(p) or _NUM.search(p)
    if m:
        block = int(m.group(1))
    if not comps:
        return "other", block
    last = comps[-1]
    parent = comps[-2] if len(comps) > 1 else ""
    in_attn = any(("attn" in c or "attention" in c) for c in comps[:-1])
    if last in _HEAD or "lm_head" in comps:
        return "head", block
    if last in _QKV:
        return "attn.qkv", block
    if last in _Q or (last == "q" and in_attn):
        return "attn.q", block
    if last in _K or (last == "k" and in_attn):
        return "attn.k", block
    if last in _V or (last == "v" and in_attn):
        return "attn.v", block
    if last in _O or (last == "o" and in_attn):
        return "attn.o", block
    if last == "dense":  # BERT family: attention.output.dense before a bare output.dense
        if p.endswith("attention.output.dense") or parent in ("self_attention", "attention", "attn"):
            return "attn.o", block
        if parent == "intermediate":
            return "ffn.up", block
        if parent == "output":
            return "ffn.down", block
        return "other", block
    if last in ("c_proj", "wo"):  # GPT-2 attn.c_proj / mlp.c_proj; T5 DenseReluDense.wo
        return ("attn.o" if parent in ("attn", "attention", "self_attn") else "ffn.down"), block
    if last in _GATE:
        return "ffn.gate", block
    if last in _UP:
        return "ffn.up", block
    if last in _DOWN:
        return "ffn.down", block
    return "other", block


def _scope_path(node: ir.Node) -> str:
    """Module path from the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return ""
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ""
    cur = ""
    for s in scopes:  # nested module scopes extend each other; the last entry is the op
        if s and (not cur or s.startswith(cur + ".")):
            cur = s
    if cur.startswith("m."):  # some exports wrap the model as attribute `m`
        cur = cur[2:]
    return cur


def _name_path(name: str) -> str:
    """``/model/layers.0/self_attn/q_proj/MatMul`` -> ``model.layers.0.self_attn.q_proj``."""
    if "/" in name:
        parts = [p for p in name.split("/") if p]
        if len(parts) > 1:
            parts = parts[:-1]  # the last component is the op (MatMul, Gemm, MatMul_1)
        return ".".join(parts)
    return "" if _UNINFORMATIVE.match(name) else name


def _weight_path(name: str) -> str:
    if _UNINFORMATIVE.match(name) or name.startswith("onnx::"):
        return ""
    for suffix in (".weight", "_weight", ".kernel"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def node_path(node: ir.Node, weight: ir.Value | None) -> tuple[str, str, int | None]:
    """(path, role, block) from the first name source that yields a role."""
    candidates = [_scope_path(node), _name_path(node.name or "")]
    if weight is not None and weight.name:
        candidates.append(_weight_path(weight.name))
    first = next((c for c in candidates if c), "")
    for c in candidates:
        if c:
            role, block = classify(c)
            if role != "other":
                return c, role, block
    role, block = classify(first) if first else ("other", None)
    return first, role, block


def _const_weight(v: ir.Value | None) -> tuple[ir.Value | None, bool, str | None,
                                                 ir.DataType | None]:
    """(initializer value, transposed, why-not, cast-to) for a MatMul/Gemm operand: an
    initializer, reached through at most one ``Transpose`` and at most one float-to-float
    ``Cast`` (in either order)."""
    transposed, cast_to, why = False, None, None
    for _ in range(3):
        if v is None:
            return None, False, None, None
        if v.const_value is not None and v.is_initializer():
            dims = len(v.const_value.shape)
            if (transposed or cast_to is not None) and why is None and dims != 2:
                why = f"weight reached through Transpose/Cast of a {dims}-D initializer"
            if cast_to is not None and why is None and v.const_value.dtype not in FLOAT_TYPES:
                why = f"weight is Cast from {v.const_value.dtype.name.lower()} (not a float)"
            return v, transposed, why, cast_to
        prod = v.producer()
        if prod is None or prod.domain not in ("", "ai.onnx"):
            return None, False, None, None
        if prod.op_type == "Transpose" and not transposed:
            perm = prod.attributes.get("perm")
            perm = list(perm.as_ints()) if perm is not None else None
            if perm not in (None, [1, 0]):
                why = f"weight reached through Transpose(perm={perm})"
            transposed = True
        elif prod.op_type == "Cast" and cast_to is None:
            to = prod.attributes.get("to")
            to = ir.DataType(to.as_int()) if to is not None else None
            if to not in FLOAT_TYPES:
                return None, False, None, None
            cast_to = to
        elif prod.op_type == "Constant" and not transposed and cast_to is None:
            return None, False, "weight is a Constant node (lift it to an initializer first)", None
        else:
            return None, False, None, None
        v = prod.inputs[0] if prod.inputs else None
    return None, False, None, None


def locate(model: ir.Model) -> list[Target]:
    """Every MatMul/Gemm with a constant weight, in graph order (subgraphs included)."""
    graph = model.graph
    targets: list[Target] = []
    # Subgraphs too: merged decoders (optimum's If on use_cache_branch) hold their projections
    # in If branches, reading weights from the main graph's initializers.
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        t = _make_target(node)
        if t is not None:
            targets.append(t)
    _mark_sharing(targets)
    _structural_roles(graph, targets)
    blocks = [t.block for t in targets if t.block is not None]
    for t in targets:
        if t.block is not None:
            t.n_blocks = max(blocks) + 1
    return targets


def _make_target(node: ir.Node) -> Target | None:
    name = node.name or (node.outputs[0].name if node.outputs else "")
    x = node.inputs[0] if node.inputs else None
    w_in = node.inputs[1] if len(node.inputs) > 1 else None
    weight, transposed, why, cast_to = _const_weight(w_in)
    skip = why
    if weight is None:
        left, _, _, _ = _const_weight(x)
        if left is not None and node.op_type == "MatMul":
            skip = "constant is on the left (W·X); only X·W is rewritten"
            weight = left
        elif why is None:
            return None  # activation x activation: not a projection
    if node.metadata_props.get(FACTOR_META):
        skip = "already a low-rank factor written by lrc"
    shape: tuple[int, ...] = ()
    dtype = "?"
    if weight is not None and weight.const_value is not None:
        shape = tuple(int(d) for d in weight.const_value.shape)
        dtype = weight.const_value.dtype.name.lower()
        if transposed and len(shape) == 2:
            shape = (shape[1], shape[0])
    if node.op_type == "Gemm" and skip is None:
        ta = node.attributes.get("transA")
        if ta is not None and ta.as_int():
            skip = "Gemm with transA=1 (X transposed) is not rewritten"
        tb = node.attributes.get("transB")
        if tb is not None and tb.as_int() and len(shape) == 2:
            transposed = not transposed
            shape = (shape[1], shape[0])
    if skip is None and weight is not None:
        if len(shape) != 2:
            skip = f"weight is {len(shape)}-D {list(shape)}: batched/3-D weights are not factorised"
        elif weight.const_value.dtype not in FLOAT_TYPES:
            skip = f"weight dtype {dtype} is not floating point"
        elif weight.is_graph_input():
            skip = "weight initializer is also a graph input (can be overridden at run time)"
    path, role, block = node_path(node, weight)
    return Target(node=node, name=name, path=path, role=role, block=block, op=node.op_type,
                  weight=weight, transposed=transposed, shape=shape, dtype=dtype, skip=skip,
                  role_source="name" if role != "other" else "none",
                  cast_to=cast_to if weight is not None and cast_to is not None
                  and cast_to != weight.const_value.dtype else None)


def _mark_sharing(targets: list[Target]) -> None:
    by_weight: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        if t.weight is not None:
            by_weight[t.weight.name].append(t)
    target_nodes = {id(t.node) for t in targets}
    for group in by_weight.values():
        names = [t.name for t in group]
        w = group[0].weight
        other_users = []
        for user, _ in w.uses():
            if not _feeds_only(user, target_nodes):
                other_users.append(user)
        for t in group:
            t.shared_with = [n for n in names if n != t.name]
            t.tied = bool(other_users)
            if t.tied and t.role == "other" and any(u.op_type == "Gather" for u in other_users):
                t.role, t.role_source = "head", "structure"


def _feeds_only(node: ir.Node, target_nodes: set[int], depth: int = 2) -> bool:
    """``node`` is a target, or a Transpose / Cast whose output reaches targets only."""
    if id(node) in target_nodes:
        return True
    if depth == 0 or node.op_type not in ("Transpose", "Cast") or node.outputs[0].is_graph_output():
        return False
    return all(_feeds_only(u, target_nodes, depth - 1) for u, _ in node.outputs[0].uses())


_ACTIVATIONS = {"Sigmoid", "Relu", "Gelu", "Tanh", "Erf", "Softplus", "HardSigmoid", "Elu",
                "FastGelu", "QuickGelu", "BiasGelu"}


def _structural_roles(graph: ir.Graph, targets: list[Target]) -> None:
    """Roles from graph structure for targets whose names say nothing (stripped exports)."""
    unnamed = [t for t in targets if t.role == "other" and not t.path and t.eligible]
    if not unnamed:
        return
    outputs = {id(v) for v in graph.outputs}
    by_input: dict[int, list[Target]] = defaultdict(list)
    for t in targets:
        if t.eligible:
            by_input[id(t.node.inputs[0])].append(t)
    block = -1
    for t in [t for t in targets if t.eligible]:
        group = by_input[id(t.node.inputs[0])]
        assign = t in unnamed
        m, n = t.shape
        if len(group) == 3 and group[0] is t:
            block += 1
        elif len(group) == 1 and n == 3 * m and t.role in ("other", "attn.qkv"):
            block += 1
        if t.block is None and block >= 0:
            t.block = block
        if not assign:
            continue
        role = "other"
        if any(id(v) in outputs for v in t.node.outputs) and n > 4 * m:
            role = "head"
        elif len(group) == 3:
            role = ("attn.q", "attn.k", "attn.v")[group.index(t)]
        elif len(group) == 2 and n > m:
            feeds_act = any(u.op_type in _ACTIVATIONS for u, _ in t.node.outputs[0].uses())
            role = "ffn.gate" if feeds_act else "ffn.up"
        elif len(group) == 1:
            if n == 3 * m:
                role = "attn.qkv"
            elif n > m:
                role = "ffn.up"
            elif m > n:
                role = "ffn.down"
            elif _after_attention(t.node):
                role = "attn.o"
        if role != "other":
            t.role, t.role_source = role, "structure"
    # gate/up pairs where neither feeds an activation directly: leave both as ffn.up


def _after_attention(node: ir.Node, depth: int = 4) -> bool:
    """X comes (through reshapes/transposes) from a product of two activations: attention·V."""
    v = node.inputs[0]
    for _ in range(depth):
        p = v.producer() if v is not None else None
        if p is None:
            return False
        if p.op_type == "MatMul":
            return all(i is not None and i.const_value is None for i in p.inputs)
        if p.op_type not in ("Reshape", "Transpose", "Cast", "Identity"):
            return False
        v = p.inputs[0]
    return False


# --------------------------------------------------------------------------------------------
# Weight MatMuls of any graph (float, quantised, fused), read from the protobuf
# --------------------------------------------------------------------------------------------

MATMUL_OPS = {
    "MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "QGemm", "QLinearMatMul", "MatMulFpQ4",
    "MatMulBnb4", "GemmFastGelu",
}
# ops through which a constant stays a constant (a tied head reads Transpose(embedding))
_PASS_THROUGH = {"Transpose", "Cast", "Reshape", "Identity", "DequantizeLinear", "Squeeze",
                 "Unsqueeze", "Flatten"}


@dataclass(frozen=True)
class WeightMatMul:
    """A MatMul-like node of a graph whose weight is a constant."""

    name: str
    op: str
    output: str
    weight: str | None      # the constant input it reads (None for MatMulNBits' packed weight)
    params: int             # weight elements (K x N for MatMulNBits)
    direct: bool            # an initializer or Constant read as is (no Transpose/Cast between)
    weight_index: int       # which input the weight is


def weight_matmul_nodes(proto) -> list[WeightMatMul]:
    """Every MatMul-like node (``MATMUL_OPS``) of an ``onnx.ModelProto``'s main graph whose
    weight is a constant: an initializer or Constant, possibly through Transpose / Cast /
    Reshape / DequantizeLinear. The one weight-MatMul finder for bench's parameter counts, the
    quantisers' node lists and ``lrc eval --layers``. Weights are not loaded."""
    import numpy as np

    g = proto.graph
    const: dict[str, int] = {}
    direct = {t.name for t in g.initializer}
    direct |= {n.output[0] for n in g.node if n.op_type == "Constant"}
    for init in g.initializer:
        const[init.name] = int(np.prod(init.dims)) if len(init.dims) else 1
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t is not None:
                    const[node.output[0]] = int(np.prod(a.t.dims)) if len(a.t.dims) else 1
    out: list[WeightMatMul] = []
    for node in g.node:  # topological order
        ins = [i for i in node.input if i]
        if node.op_type in _PASS_THROUGH and ins and all(i in const for i in ins):
            for o in node.output:
                const[o] = const[ins[0]]
            continue
        if node.op_type not in MATMUL_OPS:
            continue
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            out.append(WeightMatMul(node.name, node.op_type, node.output[0], None,
                                    int(attrs.get("K", 0) * attrs.get("N", 0)), False, 1))
            continue
        if node.op_type == "QLinearMatMul":
            cands = [node.input[3]] if len(node.input) > 3 else []
        elif node.op_type in ("Gemm", "FusedGemm", "QGemm"):
            cands = [node.input[1] if node.op_type != "QGemm" else node.input[3]]
        else:
            cands = list(node.input[:2])
        ws = [c for c in cands if c in const]
        if len(ws) == 1 or (ws and node.op_type in ("Gemm", "QGemm", "FusedGemm")):
            out.append(WeightMatMul(node.name, node.op_type, node.output[0], ws[-1],
                                    const[ws[-1]], ws[-1] in direct,
                                    list(node.input).index(ws[-1])))
    return out


_GATHERS = {"Gather", "GatherBlockQuantized", "GatherND", "GatherElements"}


def bytes_read_per_token(proto) -> int:
    """Bytes of the constants a decode step reads: every initializer of the main graph except
    tables only ``Gather``-like nodes read (an embedding lookup reads one row). Decode at batch
    1 is bound by these bytes, so ``dense bytes / these`` bounds a quantised model's decode
    speedup the way Amdahl's law bounds a low-rank one. External data is not read (sizes come
    from dims and types). An initializer only ``Cast`` s read (lrc's float16 scales on disk)
    counts as what its Casts make, read by their readers: ONNX Runtime folds them."""
    import numpy as np
    from onnx import helper

    users: dict[str, set[str]] = {}
    casts: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
        if node.op_type == "Cast" and node.input:
            casts.setdefault(node.input[0], []).append(node)
    total = 0
    for t in proto.graph.initializer:
        ops = users.get(t.name, set())
        dtype = t.data_type
        if ops == {"Cast"}:
            made = casts[t.name]
            ops = set().union(*(users.get(n.output[0], set()) for n in made))
            dtype = next(a.i for a in made[0].attribute if a.name == "to")
        if not ops or ops <= _GATHERS:
            continue
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        total += size * np.dtype(helper.tensor_dtype_to_np_dtype(dtype)).itemsize
    return total


def weight_matmuls(proto) -> dict[str, int]:
    """Node name -> weight parameter count, for every MatMul-like node with a constant weight."""
    return {w.name: w.params for w in weight_matmul_nodes(proto)}
