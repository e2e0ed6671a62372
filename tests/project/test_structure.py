"""The package's import structure: arrows point down, no cycle, no private name across modules, one import path.

Read from the source with ``ast`` (nothing is imported), so a failure names the file and line:

* the graph of imports between the package's modules, at module level and inside functions, has
  no cycle, and no module imports one of a higher layer (``LAYERS``);
* no module takes a private name (``_x``) from another module of the package, by ``from ... import
  _x`` or by ``module._x``;
* every name in a module's ``__all__`` is defined there (the package's ``__init__`` alone
  re-exports), so each public name has one import path besides the package's.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tplora_kernels"
PACKAGE = "tplora_kernels"

# Layer of each module (lower imports nothing higher). Modules of one layer may import each other
# as long as the graph has no cycle. ``testing`` serves tests, bench and examples: nothing imports it.
LAYERS = {
    0: ["config", "mask", "distributed", "layout", "mode", "naming", "multi", "rng"],
    1: ["ops.kernels", "ops.configs", "ops.registry"],
    2: ["ops.triton_backend", "ops.torch_backend", "ops.cublas_backend", "ops.select", "ops.launch", "ops"],
    3: ["mappings", "autograd", "base"],
    4: ["functional", "reference", "adapters", "dora"],
    5: ["modules"],
    6: ["peft", "adapter_io.collect", "adapter_io.peft_format", "adapter_io.hf_format"],
    # dispatch imports peft only when handed a PEFT config (peft is an optional dependency).
    7: ["dispatch", "adapter_io.api", "adapter_io.checkpoint", "adapter_io"],
    8: [""],
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(name: str) -> int | None:
    for layer, names in LAYERS.items():
        if name in names:
            return layer
    return None


def _resolve(module: str, level: int, target: str | None, is_package: bool) -> str:
    """The package-relative name an import ``from <level dots><target>`` in ``module`` means."""
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join([*base, *(target.split(".") if target else [])])


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken, line)`` for every import of the package in module ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve(name, node.level, node.module, path.name == "__init__.py")
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module[len(PACKAGE) + 1:]
            else:
                continue
            taken = [a.name for a in node.names]
            # ``from . import x`` imports module x when x is one.
            subs = [f"{target}.{t}" if target else t for t in taken]
            if all(s in MODULES for s in subs):
                out += [(s, [], node.lineno) for s in subs]
            else:
                out.append((target, taken, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + "."):
                    out.append((a.name[len(PACKAGE) + 1:], [], node.lineno))
    return out


def test_every_module_has_a_layer():
    missing = sorted(n for n in MODULES if _layer(n) is None and not n.startswith("testing"))
    assert not missing, f"modules without a layer in tests/project/test_structure.py: {missing}"


def test_imports_point_down_and_form_no_cycle():
    edges: dict[str, set[str]] = {n: set() for n in MODULES}
    upward = []
    for name in MODULES:
        for target, _, line in _imports(name):
            if target not in MODULES or target == name:
                continue
            edges[name].add(target)
            if name.startswith("testing"):
                continue
            if target.startswith("testing"):
                upward.append(f"{name}:{line} imports {target} (the package never imports testing)")
            elif _layer(target) > _layer(name):
                upward.append(f"{name}:{line} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(MODULES):
        if n not in state:
            cycle = visit(n)
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_private_name_crosses_a_module():
    crossings = []
    for name, path in MODULES.items():
        for target, taken, line in _imports(name):
            crossings += [f"{name}:{line} imports {t} from {target}" for t in taken if t.startswith("_")
                          and not t.startswith("__")]
        aliases = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossings.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not crossings, "private names used across modules:\n" + "\n".join(crossings)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n), ids=str)
def test_all_names_are_defined_where_they_are_listed(name):
    tree = ast.parse(MODULES[name].read_text())
    listed: list[str] = []
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    defined.add(t.id)
                    if t.id == "__all__":
                        listed = list(ast.literal_eval(node.value))
    reexported = sorted(set(listed) - defined)
    assert not reexported, f"{name}: __all__ lists names defined elsewhere {reexported} (only the package re-exports)"
