"""The package's layers as a reader sees them: subpackages by layer, imports pointing down, no cycles."""

import grimp
import pytest
from helpers import REPO

PACKAGE = REPO / "src" / "d2retrain"
LAYERS = ("core", "data", "model", "train", "infer", "workflow")  # workflow: on top, beside cli.py
TOP = {"__init__.py", "cli.py", "commands.py", "report.py", "card.py", "compare.py"}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("d2retrain", include_external_packages=False)


def _cycle(graph) -> list[str] | None:
    """One import cycle among the package's modules (lazy imports inside functions count), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_package_has_no_import_cycle(graph):
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_found_when_there_is_one(graph):
    graph.add_import(importer="d2retrain.core.errors", imported="d2retrain.core.fileio")
    cycle = _cycle(graph)  # found from whichever of the two a module reached first
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 3
    assert set(cycle) == {"d2retrain.core.errors", "d2retrain.core.fileio"}


def test_every_module_lives_in_a_layer_or_on_top():
    flat = {path.name for path in PACKAGE.glob("*.py")}
    assert flat == TOP, f"modules outside the layers: {sorted(flat - TOP)}"
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and not path.name.startswith("__")}
    assert folders == set(LAYERS)
    for layer in LAYERS:
        docstring = (PACKAGE / layer / "__init__.py").read_text()
        assert docstring.startswith('"""') and len(docstring) > 200, (
            f"{layer}/__init__.py needs its paragraph"
        )
