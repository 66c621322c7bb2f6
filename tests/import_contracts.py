"""An import-linter contract that import-linter lacks: no module imports another module's ``_private`` name.

``from pkg.mod import _name`` and ``mod._name`` (``mod`` being an imported project module) are both refused
when ``_name`` is defined in another module than the importer; dunder names are public. Wired in through
``[tool.importlinter] contract_types`` in pyproject.toml, so ``make lint`` and the test suite run it."""

from __future__ import annotations

import ast
import importlib.util

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _source_file(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return origin if origin and origin.endswith(".py") else None


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_name_imports(module: str, project: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each use in ``module`` of another project module's private name."""
    path = _source_file(module)
    if path is None:
        return []
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    found: list[tuple[int, str]] = []
    aliases: dict[str, str] = {}  # local name -> project module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in project:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(module, is_package, node)
            if src not in project or src == module:
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in project:
                    aliases[a.asname or a.name] = sub
                    continue
                if _private(a.name):
                    found.append((node.lineno, f"from {src} import {a.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                target = ".".join([aliases[cur.id], *reversed(chain[1:])])
                if target in project and target != module:
                    found.append((node.lineno, f"{target}.{node.attr}"))
    return found


class PrivateNamesContract(Contract):
    """Modules in ``containers`` use no ``_private`` name of another project module."""

    type_name = "private_names"
    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        roots = {c.split(".")[0] for c in self.containers}
        project = {m for m in graph.modules if m.split(".")[0] in roots}
        broken = []
        for module in sorted(project):
            if not any(module == c or module.startswith(c + ".") for c in self.containers):
                continue
            for line, what in private_name_imports(module, project):
                broken.append(f"{module}:{line} uses {what}")
        return ContractCheck(kept=not broken, warnings=[], metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        output.print_error(
            "A module uses another module's private name (make it public in its home):", bold=False
        )
        output.new_line()
        for line in check.metadata["broken"]:
            output.print_error(f"- {line}", bold=False)
            output.new_line()
