"""The layering, checked on the imports of every module (parsed, not run): transport ->
domain -> storage, with the domain's entities (domain/model.py) the one domain module
storage may import, and the servicers talking to the domain only.

Every import counts, at the top of a module or inside a function, under TYPE_CHECKING or
not: a lazy import runs upward all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import creditmeter

PACKAGE = Path(creditmeter.__file__).parent
MODEL = "creditmeter.domain.model"
#: The modules that translate protobuf to domain calls and back: they import nothing from
#: storage (the composition root -- server, admin, cli, workers, webhook_worker -- wires
#: storage into the domain, so it may).
SERVICERS = (
    "creditmeter.transport.credits_servicer",
    "creditmeter.transport.packs_servicer",
    "creditmeter.transport.convert",
    "creditmeter.transport.webhooks",
    "creditmeter.transport.interceptors",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(source: str, name: str, is_package: bool = False) -> set[str]:
    """The creditmeter modules a module's source imports: `from a.b import c` counts as
    a.b.c when that is a module (so `from creditmeter.domain import pages` is
    creditmeter.domain.pages), else as a.b."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, `level - 1` up
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                found.add(full if is_module(full) else origin)
    return {m for m in found if m == "creditmeter" or m.startswith("creditmeter.")}


def modules() -> dict[str, set[str]]:
    result = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name.startswith("creditmeter.api"):
            continue  # generated stubs
        result[name] = imports_of(path.read_text(), name, path.name == "__init__.py")
    return result


MODULES = modules()


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offending(layer: str, banned: str, allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        f"{m} imports {i}"
        for m, imported in MODULES.items()
        if under(m, layer)
        for i in imported
        if under(i, banned) and i not in allowed
    )


def test_every_layer_is_read() -> None:
    for layer in ("creditmeter.transport", "creditmeter.domain", "creditmeter.storage"):
        assert sum(under(m, layer) for m in MODULES) >= 5, layer
    assert all(s in MODULES for s in SERVICERS)


def test_storage_imports_only_the_domain_model() -> None:
    assert offending("creditmeter.storage", "creditmeter.domain", allowed=(MODEL,)) == []
    assert offending("creditmeter.storage", "creditmeter.transport") == []


def test_domain_imports_no_transport() -> None:
    assert offending("creditmeter.domain", "creditmeter.transport") == []


def test_the_model_is_a_leaf() -> None:
    """What storage imports of the domain imports nothing of it back (no cycle)."""
    assert MODULES[MODEL] <= {"creditmeter.constants", "creditmeter.errors"}


@pytest.mark.parametrize("servicer", SERVICERS)
def test_servicers_import_no_storage(servicer: str) -> None:
    assert sorted(i for i in MODULES[servicer] if under(i, "creditmeter.storage")) == []


def test_the_parser_sees_every_kind_of_import() -> None:
    """The checks above would see an import that runs upward, however it is written."""
    source = (
        "import creditmeter.transport.server\n"
        "from creditmeter.domain import pages, model\n"
        "from creditmeter.storage.ledger.base import Ledger\n"
        "def f() -> None:\n"
        "    from ..domain.metering import Metering\n"
        "    from . import layout\n"
    )
    assert imports_of(source, "creditmeter.storage.redis_store") == {
        "creditmeter.transport.server", "creditmeter.domain.pages", MODEL,
        "creditmeter.storage.ledger.base", "creditmeter.domain.metering",
        "creditmeter.storage.layout",
    }  # fmt: skip
