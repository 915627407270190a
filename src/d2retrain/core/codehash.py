"""Hash of the package code a workflow script runs: the modules of its import closure, never a list.

A rule's ``code`` param is :func:`code_hash` of its entry script, so editing any module the job can
import reruns the job (and what depends on its outputs), and editing any other module reruns nothing.
The closure follows every ``import`` of a package module, module-level or inside a function (lazy
imports run too); imports under ``if TYPE_CHECKING:`` never run and are not followed. Imports built
from strings (``importlib.import_module(name)``) cannot be seen: the package does not use them.
"""

import ast
import functools
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["PACKAGE_ROOT", "code_hash", "import_closure", "imported_names"]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/d2retrain


def code_hash(script: str | Path, package_root: Path = PACKAGE_ROOT) -> str:
    """A short hash of the package modules in the import closure of SCRIPT (paths and contents).

    Args:
        script: A Python file (a rule's entry script, or a module of the package).
        package_root: The package's folder (``src/d2retrain``).

    Returns:
        16 hex digits; equal for two scripts exactly when their closures hold equal files.
    """
    digest = hashlib.sha256()
    for module in import_closure(script, package_root):
        digest.update(module.relative_to(package_root.parent).as_posix().encode() + b"\0")
        digest.update(module.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def import_closure(script: str | Path, package_root: Path = PACKAGE_ROOT) -> list[Path]:
    """The package's module files SCRIPT imports, directly or through each other, sorted.

    Packages count with their ``__init__.py`` (importing a submodule runs its parents' too).
    """
    seen: set[Path] = set()
    pending = [Path(script).resolve()]
    while pending:
        path = pending.pop()
        for name in imported_names(path, _module_name(path, package_root)):
            for module in _files_of(name, package_root):
                if module not in seen:
                    seen.add(module)
                    pending.append(module)
    return sorted(seen)


@functools.cache
def imported_names(path: Path, module_name: str | None = None) -> tuple[str, ...]:
    """Dotted names the file at PATH may import: ``a.b`` for ``import a.b``, and both ``a`` and
    ``a.b`` for ``from a import b`` (b may be a submodule). Parsed once per process.

    Args:
        path: The Python file.
        module_name: Its dotted name, to resolve relative imports (None: a script, no package).
    """
    tree = ast.parse(path.read_bytes(), filename=str(path))
    names: list[str] = []
    for node in _executed_nodes(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path, module_name)
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return tuple(names)


def _executed_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except the bodies of ``if TYPE_CHECKING:`` blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending += node.orelse
            continue
        pending += ast.iter_child_nodes(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(node: ast.ImportFrom, path: Path, module_name: str | None) -> str:
    if not node.level:
        return node.module or ""
    if module_name is None:
        raise ValueError(f"{path}: relative import outside a package")
    package = module_name.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _module_name(path: Path, package_root: Path) -> str | None:
    try:
        relative = path.relative_to(package_root.parent).with_suffix("")
    except ValueError:
        return None
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _files_of(name: str, package_root: Path) -> list[Path]:
    """The files importing NAME runs, if it is in the package: its own and its packages' __init__."""
    parts = name.split(".")
    if parts[0] != package_root.name:
        return []
    files = []
    for end in range(1, len(parts) + 1):
        folder = package_root.parent.joinpath(*parts[:end])
        if (folder / "__init__.py").is_file():
            files.append(folder / "__init__.py")
        elif end == len(parts) and folder.with_suffix(".py").is_file():
            files.append(folder.with_suffix(".py"))
    return files
