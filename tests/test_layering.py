"""The package's architecture, checked from its source: every module imports only its own package or a
lower layer (docs/architecture.md), and no import cycle exists, counting imports inside functions too.

The edges are read from the source with `ast`, so a new import is checked the day it is written; only the
layer order below is declared. A new top-level package or module must be given its place here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "affinequant"

BASE = {"errors", "utils", "distributed"}
CONFIG = {"config", "recipe"}
# each part of affinequant -> the parts it may import besides itself
ALLOWED = {
    "errors": set(),
    "utils": {"errors"},
    "distributed": set(),
    "recipe": {"errors"},
    "config": {"errors", "recipe"},
    "models": BASE | CONFIG,
    "quant": BASE | CONFIG,
    "stages": BASE | CONFIG | {"models", "quant"},
    "pipeline": BASE | CONFIG | {"models", "quant", "stages"},
    "eval": BASE | CONFIG | {"models", "quant"},
    # the reference code's parameter files hold what the LET and AffineQuant stages learn, in their
    # parameterisation (the gradual mask's bands, the RoPE pairs): reading and writing them needs stages
    "formats": BASE | CONFIG | {"models", "quant", "stages"},
    "cli": BASE | CONFIG | {"models", "quant", "stages", "pipeline", "eval", "formats"},
    "api": BASE | CONFIG | {"models", "quant", "stages", "pipeline", "eval", "formats"},
    "convert": {"formats"},                     # `python -m affinequant.convert`, kept where users type it
    "": BASE | CONFIG | {"models", "quant", "stages", "pipeline", "eval", "formats", "api", "cli"},   # __init__
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, every import statement counted (top level and inside
    functions); `from pkg import name` counts as an import of pkg.name where that is a module."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def part_of(module: str, root: Path) -> str:
    """The layer a module belongs to: its top-level package or module under affinequant ('' for __init__)."""
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


def layer_violations(root: Path, allowed: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(import_graph(root).items()):
        part = part_of(module, root)
        if part not in allowed:
            out.append(f"{module}: {part!r} has no place in the layer order (add it to ALLOWED)")
            continue
        for target in sorted(targets):
            other = part_of(target, root)
            if other != part and other not in allowed[part]:
                out.append(f"{module} imports {target}: {part or '__init__'} may import only "
                           f"{', '.join(sorted(allowed[part])) or 'nothing'}")
    return out


def import_cycles(root: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = import_graph(root)
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_a_higher_layer():
    assert layer_violations(PACKAGE, ALLOWED) == []


def test_no_import_cycle():
    assert import_cycles(PACKAGE) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def toy(tmp_path):
    """A package shaped like ours, with one clean import per layer."""
    return _write(tmp_path / "affinequant", {
        "__init__.py": "from .api import quantize\n",
        "errors.py": "",
        "config.py": "from .errors import E\n",
        "recipe.py": "",
        "api.py": "from .pipeline.calibrate import run\n",
        "models/__init__.py": "", "models/adapters.py": "from ..config import C\n",
        "quant/__init__.py": "", "quant/quantizer.py": "",
        "stages/__init__.py": "from . import let\n", "stages/let.py": "from ..quant.quantizer import Q\n",
        "pipeline/__init__.py": "", "pipeline/calibrate.py": "from ..stages import STAGES\n",
    })


def test_the_checks_see_an_upward_import_inside_a_function_and_a_cycle(toy):
    """The checks themselves: clean on the toy package, then each planted defect is found."""
    assert layer_violations(toy, ALLOWED) == [] and import_cycles(toy) == []
    (toy / "quant/quantizer.py").write_text("def f():\n    from ..pipeline.calibrate import run\n")
    assert layer_violations(toy, ALLOWED) == [
        "affinequant.quant.quantizer imports affinequant.pipeline.calibrate: quant may import only "
        "config, distributed, errors, recipe, utils"]
    assert import_cycles(toy) == [["affinequant.pipeline.calibrate", "affinequant.quant.quantizer",
                                   "affinequant.stages", "affinequant.stages.let"]]
    (toy / "quant/quantizer.py").write_text("")
    (toy / "config.py").write_text("from .errors import E\nfrom . import recipe\n")
    (toy / "recipe.py").write_text("def f():\n    from .config import C\n")
    assert import_cycles(toy) == [["affinequant.config", "affinequant.recipe"]]
    assert layer_violations(toy, ALLOWED) == ["affinequant.recipe imports affinequant.config: recipe may import "
                                              "only errors"]
    (toy / "gguf_tools.py").write_text("")
    assert any("gguf_tools: 'gguf_tools' has no place in the layer order" in v for v in layer_violations(toy, ALLOWED))
