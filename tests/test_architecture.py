"""The house rules of ``docs/architecture.md``, checked on the source of every module under ``xrfnb/``.

Each module is parsed with ``ast`` (nothing is imported) and checked for three rules:

(a) imports flow one way, from left to right::

        _errors -> core -> io -> physics -> fitting -> model -> maps -> ui

    a module imports only from its own room and the rooms to its left; nothing but ui imports ui. The
    front door (``xrfnb/__init__.py`` with its lazy map, and the ``xrfnb/plotting.py`` re-export) may import
    every room; a room imports nothing from it but ``__version__``. Imports under ``if TYPE_CHECKING:``
    never run and may name any room (for annotations that would otherwise make a cycle).
(b) xrfnb's own modules are imported at the top of a module. The only exception is a torch- or
    panel-bearing module imported from a lighter one, inside a function, with a comment line directly
    above the import (or its group of imports) that says why and contains the word "deferred" or "heavy",
    or inside a function whose name says so (``xrfnb/ui/cli.py::_heavy``). ``importlib.import_module`` of
    xrfnb's modules outside the front door counts as an unmarked deferred import.
(c) no private name (``_x``, not a dunder) is imported from another xrfnb module, or read from an
    imported xrfnb module as an attribute (``module._x``): a helper another module needs becomes a public
    name of its module.

Each test reports every offending line of its module (``path:line: what``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import xrfnb

PACKAGE = Path(xrfnb.__file__).resolve().parent
#: the rooms from left to right; a module may import from its own room and those to its left
ROOMS = ("_errors", "core", "io", "physics", "fitting", "model", "maps", "ui")
FRONT_DOOR = len(ROOMS)  # xrfnb/__init__.py and xrfnb/plotting.py: right of every room
MARKERS = ("deferred", "heavy")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULE_FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = sorted(MODULE_FILES)


def _rank(module: str) -> int:
    """Position of ``module``'s room in :data:`ROOMS`; the front door is right of every room."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ROOMS:
        return ROOMS.index(parts[1])
    return FRONT_DOOR


def _is_module(name: str) -> bool:
    """Whether ``name`` (``xrfnb.x.y``) is a module or package of the source tree."""
    rel = Path(*name.split("."))
    root = PACKAGE.parent
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Import:
    """One import of an xrfnb module found in the source."""

    line: int
    target: str  # the imported module, xrfnb.x.y
    names: tuple[str, ...]  # names taken from it ("from target import a, b"); () for "import target"
    in_function: str | None  # name of the enclosing function, None at module (or class) level
    type_checking: bool  # under "if TYPE_CHECKING:"
    via_importlib: bool  # importlib.import_module(...)
    bound: tuple[str, ...]  # local names bound to an imported module object


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self.functions: list[str] = []
        self.type_checking = 0
        self.attributes: list[tuple[int, str, str]] = []  # (line, local name, attribute)

    # -- scopes ------------------------------------------------------------------------------------
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        is_tc = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if not is_tc:
            self.generic_visit(node)
            return
        self.type_checking += 1
        for child in node.body:
            self.visit(child)
        self.type_checking -= 1
        for child in node.orelse:
            self.visit(child)

    # -- imports -----------------------------------------------------------------------------------
    def _add(self, node: ast.AST, target: str, names: tuple[str, ...], bound: tuple[str, ...], via=False):
        self.imports.append(
            Import(
                line=node.lineno,
                target=target,
                names=names,
                in_function=self.functions[-1] if self.functions else None,
                type_checking=self.type_checking > 0,
                via_importlib=via,
                bound=bound,
            )
        )

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "xrfnb" or alias.name.startswith("xrfnb."):
                bound = alias.asname or alias.name.split(".")[0]
                target = alias.name if alias.asname else "xrfnb"
                self._add(node, alias.name, (), (bound,) if _is_module(target) else ())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not (target == "xrfnb" or target.startswith("xrfnb.")):
            return
        names = tuple(a.name for a in node.names)
        # "from package import module": the module is what is imported
        modules = [a for a in node.names if _is_module(f"{target}.{a.name}")]
        for alias in modules:
            self._add(node, f"{target}.{alias.name}", (), (alias.asname or alias.name,))
        rest = tuple(n for n in names if not _is_module(f"{target}.{n}"))
        if rest or not modules:
            self._add(node, target, rest, ())

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                text = arg.value
                if text.startswith(".") or text == "xrfnb" or text.startswith("xrfnb."):
                    target = "xrfnb" + text if text.startswith(".") else text
                    self._add(node, target, (), (), via=True)
            else:  # a computed module name: counted, it can name any xrfnb module
                self._add(node, "xrfnb", ("<computed>",), (), via=True)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name):
            self.attributes.append((node.lineno, node.value.id, node.attr))
        self.generic_visit(node)


@cache
def _scan(module: str) -> tuple[list[Import], list[tuple[int, str, str]], list[str]]:
    path = MODULE_FILES[module]
    text = path.read_text(encoding="utf-8")
    visitor = _Visitor(module, path.name == "__init__.py")
    visitor.visit(ast.parse(text, filename=str(path)))
    return visitor.imports, visitor.attributes, text.splitlines()


def _where(module: str, line: int) -> str:
    return f"{MODULE_FILES[module].relative_to(PACKAGE.parent)}:{line}"


def _marked(lines: list[str], line: int, function: str | None) -> bool:
    """A comment saying "deferred"/"heavy" directly above the import (or its group), or such a function."""
    if function is not None and any(m in function.lower() for m in MARKERS):
        return True
    i = line - 2  # the line above, 0-based
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            if any(m in text.lower() for m in MARKERS):
                return True
            i -= 1
        elif text.startswith(("import ", "from ")):  # the import above belongs to the same group
            i -= 1
        else:
            return False
    return False


def test_every_room_is_a_package_and_walked():
    assert len(MODULES) > 30
    for room in ROOMS[1:]:
        assert f"xrfnb.{room}" in MODULE_FILES, f"room {room} has no __init__.py"


@pytest.mark.parametrize("module", MODULES)
def test_imports_flow_left_to_right(module: str) -> None:
    imports, _, _ = _scan(module)
    here = _rank(module)
    bad = []
    for imp in imports:
        if imp.type_checking:
            continue
        if imp.target == "xrfnb":
            if here == FRONT_DOOR or (imp.names and set(imp.names) <= {"__version__"}):
                continue
            bad.append(f"{_where(module, imp.line)}: imports the front door xrfnb ({', '.join(imp.names)})")
            continue
        there = _rank(imp.target)
        if there > here:
            room = ROOMS[here] if here < FRONT_DOOR else "front door"
            bad.append(f"{_where(module, imp.line)}: {room} imports {imp.target}, a room to its right")
    assert not bad, "imports against the flow " + " -> ".join(ROOMS) + ":\n" + "\n".join(bad)


@pytest.mark.parametrize("module", MODULES)
def test_function_level_imports_are_marked_deferred(module: str) -> None:
    imports, _, lines = _scan(module)
    bad = []
    for imp in imports:
        if imp.via_importlib and _rank(module) != FRONT_DOOR:
            bad.append(f"{_where(module, imp.line)}: importlib imports {imp.target} ({', '.join(imp.names)})")
        elif imp.in_function is not None and not imp.type_checking and not imp.via_importlib:
            if not _marked(lines, imp.line, imp.in_function):
                bad.append(
                    f"{_where(module, imp.line)}: {imp.target} imported inside {imp.in_function}() without a "
                    "comment saying why it is deferred (heavy)"
                )
    assert not bad, "imports of xrfnb modules inside functions:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", MODULES)
def test_no_private_names_across_modules(module: str) -> None:
    imports, attributes, _ = _scan(module)
    bad = []
    module_aliases: dict[str, str] = {}
    for imp in imports:
        for name in imp.names:
            if _is_private(name):
                bad.append(f"{_where(module, imp.line)}: imports private {name} from {imp.target}")
        for alias in imp.bound:
            module_aliases[alias] = imp.target
    for line, name, attr in attributes:
        if name in module_aliases and _is_private(attr):
            bad.append(f"{_where(module, line)}: reads private {name}.{attr} of {module_aliases[name]}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)
