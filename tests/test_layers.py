"""The modules of ``services.ecg`` import in one direction, read from the source with ``ast``.

``LAYERS`` lists the layers bottom first; the modules of one layer are independent of each other. A
module may import only from lower layers (and, inside a package such as ``readers``, its own package's
modules); no import cycle, including imports made inside functions to dodge one.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = "services.ecg"
ROOT = Path(__file__).resolve().parents[1] / "services" / "ecg"
LAYERS: list[list[str]] = [
    ["leads"],  # lead names and aliases
    ["recording"],  # the Recording type, its checks, the request limits
    ["readers", "preprocess"],  # file formats -> Recording | Recording -> model input
    ["upload", "clinical"],  # which reader an upload goes to | measurements on a Recording
]


def _modules() -> dict[str, Path]:
    """Module name relative to the package ('readers.text', 'readers' for its __init__) -> file."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            modules[".".join(parts)] = path
    return modules


def _imports(path: Path) -> set[str]:
    """The modules of the package that ``path`` imports anywhere in its code, relative to the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                found.add(name.removeprefix(PACKAGE + "."))
    modules = _modules()
    return {name for name in found if name in modules}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_every_module_has_a_layer() -> None:
    tops = {name.split(".")[0] for name in _modules()}
    declared = {name for layer in LAYERS for name in layer}
    assert tops == declared


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_module_imports_only_lower_layers(module: str) -> None:
    own = module.split(".")[0]
    for imported in _imports(_modules()[module]):
        if imported.split(".")[0] == own:
            continue  # inside one package: checked for cycles below
        assert _layer(imported) < _layer(module), f"{module} imports {imported}, which is not below it"


def test_no_import_cycle() -> None:
    graph = {module: _imports(path) for module, path in _modules().items()}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(module) :], module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
