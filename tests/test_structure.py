"""The package's shape, measured: layers only import downwards, no import cycle, short functions.

The layer order is the one docs/ARCHITECTURE.md states; change both together.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1] / "zsq"

# bottom to top; a module may import its own package and packages of lower layers (lazy imports too)
LAYERS: List[Set[str]] = [
    {"errors"},                                    # the one exception type
    {"registry", "hooks", "progress", "assets", "budget_names", "compute", "distributed", "runstate", "runlock", "options"},  # leaves
    {"quant", "models"},                           # the core
    {"data"},                                      # real images
    {"evaluation", "synth", "export", "run_report"},  # uses of a model: accuracy, synthetic images, files, the run report
    {"methods"},                                   # the method registry and the calibration baselines
    {"ptq", "qat"},                                # the method families
    {"run"},                                       # the one pipeline (Run -> execute -> steps)
    {"api", "bench", "cli", "__main__", ""},       # entry points ("" = zsq/__init__)
]


def _modules() -> Dict[str, ast.Module]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(f.read_text(), str(f))
    return out


MODULES = _modules()


def _targets(node: ast.AST, importer: str) -> List[str]:
    """zsq modules one import statement loads (``from pkg import sub`` counts as pkg.sub)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "zsq"]
    if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("zsq"):
        return []
    subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
    return subs if len(subs) == len(node.names) else subs + [node.module]


def _imports(tree: ast.Module, name: str, top_level_only: bool) -> Set[str]:
    nodes = tree.body if top_level_only else ast.walk(tree)
    return {t for n in nodes for t in _targets(n, name)}


def _layer(module: str) -> int:
    parts = module.split(".")
    package = parts[1] if len(parts) > 1 else ""
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"{module}: package {package!r} is in no layer; add it to LAYERS and ARCHITECTURE.md")


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_import_goes_down_the_layers():
    bad = []
    for name, tree in MODULES.items():
        for target in _imports(tree, name, top_level_only=False):
            if target not in MODULES or _package(target) == _package(name):
                continue
            if _layer(target) > _layer(name) or (_layer(target) == _layer(name) < len(LAYERS) - 1):
                bad.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(bad)


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle, or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n: str) -> List[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_no_import_cycle_at_import_time():
    graph = {n: {t for t in _imports(tree, n, top_level_only=True) if t in MODULES}
             for n, tree in MODULES.items()}
    assert _cycle(graph) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    """A lazy import hides a cycle from Python, not from the design: modules that need each other are one
    module, or one of them holds what both need (zsq.quant.inventory)."""
    graph = {n: {t for t in _imports(tree, n, top_level_only=False) if t in MODULES and t != n}
             for n, tree in MODULES.items()}
    assert _cycle(graph) == []


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_benchmarks_use_only_public_names():
    """The scripts in benchmarks/ are users of zsq: they import no private name and call no private
    attribute of what zsq gives them (their own self._x is theirs)."""
    bad = []
    for f in sorted(BENCHMARKS.glob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zsq"):
                bad += [f"{f.name}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                bad.append(f"{f.name}:{node.lineno} uses .{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_cycles_and_upward_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _layer("zsq.methods.registry") < _layer("zsq.ptq.reconstruction_methods") < _layer("zsq.cli.synthesize")
    tree = ast.parse("def f():\n    from zsq.ptq import reconstruction_methods\n")
    assert _imports(tree, "zsq.methods", top_level_only=False) == {"zsq.ptq.reconstruction_methods"}
    assert _imports(tree, "zsq.methods", top_level_only=True) == set()



# file names that may repeat: each package's registry module holds that package's Registry instance
SHARED_FILE_NAMES = {"__init__", "registry"}


def test_module_file_names_do_not_repeat():
    seen: Dict[str, List[str]] = {}
    for name in MODULES:
        stem = "__init__" if (ROOT.parent / name.replace(".", "/")).is_dir() else name.split(".")[-1]
        seen.setdefault(stem, []).append(name)
    assert {s: m for s, m in seen.items() if len(m) > 1 and s not in SHARED_FILE_NAMES} == {}


def test_no_package_attribute_shadows_a_submodule():
    """``zsq.evaluate`` once was both a module and the function the package exported in its place."""
    import importlib
    import sys

    shadowed = []
    for name in MODULES:
        if "." not in name or name == "zsq.__main__":
            continue
        importlib.import_module(name)
        parent, leaf = name.rsplit(".", 1)
        if getattr(sys.modules[parent], leaf) is not sys.modules[name]:
            shadowed.append(f"{parent}.{leaf} is {getattr(sys.modules[parent], leaf)!r}")
    assert shadowed == []


MAX_FUNCTION_LINES = 80


def _long_functions(limit: int) -> List[Tuple[str, int]]:
    out = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append((f"{name}.{node.name} (line {node.lineno})", length))
    return sorted(out, key=lambda t: -t[1])


def test_no_function_over_80_lines():
    assert _long_functions(MAX_FUNCTION_LINES) == []


def test_top_level_all_names_what_exists():
    import zsq

    assert len(set(zsq.__all__)) == len(zsq.__all__)
    assert all(hasattr(zsq, name) for name in zsq.__all__)
    assert {"quantize", "quantize_model", "evaluate", "load_quantized", "ZsqError"} <= set(zsq.__all__)
