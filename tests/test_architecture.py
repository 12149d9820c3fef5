"""The shape of lrc/: data flows one way, and each concern has one home.

* Every module belongs to a layer; a module imports only from its own layer or a lower one
  (imports inside functions count too: a lazy import is still a dependency), and the import
  graph has no cycle.
* Only lrc/runtime/session.py constructs ONNX Runtime sessions; only lrc/runtime/quantizers.py
  calls ONNX Runtime's quantisers; lrc/graph/ never imports onnxruntime.

README's development section describes the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lrc"

# lowest first; a module may import from its own layer or any layer before it
LAYERS = [
    ("foundations", ["lrc.errors", "lrc.factorize", "lrc.quantmath", "lrc.allocate", "lrc.data",
                     "lrc.sysmem", "lrc.version", "lrc.fields"]),
    ("graph", ["lrc.graph", "lrc.modelref"]),
    ("export", ["lrc.exporters"]),
    ("runtime", ["lrc.runtime"]),
    ("calibration", ["lrc.calibration"]),
    ("methods", ["lrc.methods"]),
    ("compress", ["lrc.config", "lrc.modifiers", "lrc.pipeline", "lrc.quantize"]),
    ("measure", ["lrc.measure"]),
    ("generate", ["lrc.generate"]),
    ("tune", ["lrc.tune"]),
    ("present", ["lrc.present"]),
    ("api", ["lrc.api", "lrc.model", "lrc"]),
    ("cli", ["lrc.cli"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def layer_of(module: str) -> int | None:
    if module == "lrc":  # the package: its lazy public names (lrc.compress, ...) sit on top
        return next(i for i, (name, _) in enumerate(LAYERS) if name == "api")
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p != "lrc" and module.startswith(p + ".")) for p in prefixes):
            return i
    return None


def _resolve(name: str) -> str | None:
    """The lrc module an import names (``lrc.graph.model`` for ``from lrc.graph import model``;
    ``lrc`` for a name the package itself holds)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """lrc modules imported anywhere in ``module`` (top level or inside functions: a lazy
    import is a dependency too); ``lrc`` itself when the package is imported (``import lrc``,
    ``from lrc import __version__``), not when a submodule is (``from lrc import methods``)."""
    tree = ast.parse(MODULES[module].read_text())
    pkg = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
            if base != "lrc":
                names.append(base)
        for n in names:
            if n != "lrc" and not n.startswith("lrc."):
                continue
            m = _resolve(n)
            if m and m != module:
                found.add(m)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if layer_of(m) is None] == []


def test_no_upward_imports():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in GRAPH.items() for d in sorted(deps)
              if layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert upward == []


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def _sources_with(text: str) -> list[str]:
    return sorted(m for m, p in MODULES.items() if text in p.read_text())


@pytest.mark.parametrize("needle, home", [
    ("InferenceSession(", ["lrc.runtime.session"]),
    ("SessionOptions(", ["lrc.runtime.session"]),
    ("quantize_dynamic(", ["lrc.runtime.quantizers"]),
    ("MatMulNBitsQuantizer(", ["lrc.runtime.quantizers"]),
    ("optimize_model(", ["lrc.runtime.quantizers"]),
])
def test_one_home(needle, home):
    assert _sources_with(needle) == home


def test_the_package_is_seen_and_its_lazy_names_resolve():
    """The package is a module of the graph (a layer below importing ``lrc`` itself would be an
    upward import and a cycle through its lazy names); each public name resolves."""
    import lrc

    assert "lrc" in GRAPH and layer_of("lrc") is not None
    assert {"lrc.api", "lrc.measure.verify", "lrc.errors", "lrc.version"} <= GRAPH["lrc"]
    for name in lrc.__all__:
        assert getattr(lrc, name) is not None


def test_graph_layer_has_no_onnxruntime():
    assert [m for m in _sources_with("onnxruntime") if m.startswith("lrc.graph")] == []
