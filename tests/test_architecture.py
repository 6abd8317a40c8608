"""The package's shape: layered imports without cycles, no private names across modules, a lazy root."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import distilled_ssl

PACKAGE = Path(distilled_ssl.__file__).parent

# Every import points to the same layer or one below (lower number); same-layer cycles are caught below.
LAYERS = {"_version": 0, "errors": 0, "distributed": 0, "layout": 0, "registry": 0, "io": 0, "config": 0,
          "allocator": 0,
          "models": 1, "data": 1, "stages": 2, "sets": 2, "evaluation": 3, "pipeline": 4, "cli": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(importer, imported module, imported name or "") for every import statement, at any depth."""
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(name, a.name, "") for a in node.names if a.name.startswith("distilled_ssl")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                if not target.startswith("distilled_ssl"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((name, sub, "") if sub in modules else (name, target, alias.name))
    return found


def _edges() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for importer, target, _ in _imports(modules):
        while target not in modules:
            target = target.rsplit(".", 1)[0]
        if target != importer:
            edges[importer].add(target)
    return edges


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 99  # the root package re-exports everything


def test_import_graph_has_no_cycles() -> None:
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_imports_point_down_and_sets_never_import_stages() -> None:
    for importer, targets in _edges().items():
        for target in targets:
            assert _layer(target) <= _layer(importer), f"{importer} imports {target} from a layer above"
            assert not (importer.startswith("distilled_ssl.sets") and
                        target.startswith("distilled_ssl.stages")), f"{importer} imports {target}"


def test_no_private_name_is_imported_across_modules() -> None:
    private = [(m, t, n) for m, t, n in _imports(_modules())
               if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    assert private == []


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_loading_a_set_imports_no_training_stage() -> None:
    out = _fresh("import sys\nfrom distilled_ssl import DistilledDataset\n"
                 "print(' '.join(m for m in sys.modules if m.startswith('distilled_ssl')))").split()
    assert "distilled_ssl.sets.dataset" in out
    trainers = [m for m in out if m.startswith(("distilled_ssl.stages", "distilled_ssl.evaluation",
                                                 "distilled_ssl.pipeline", "distilled_ssl.models"))]
    assert trainers == []


def test_importing_the_package_is_cheap_and_every_public_name_resolves() -> None:
    out = _fresh("import sys\nimport distilled_ssl\nprint('torch' in sys.modules)")
    assert out.strip() == "False"
    for name in distilled_ssl.__all__:
        assert getattr(distilled_ssl, name) is not None, name
    assert set(distilled_ssl.__all__) <= set(dir(distilled_ssl))
