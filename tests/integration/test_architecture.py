"""The package's import rules: its layers form a DAG, and the lower ones never import Lightning.

Every module of ``lightning_norms`` belongs to one row of this table; a module may import
(inside the package) only the layers its row lists. A new module must be given a row here.

=========  ==========================================  ==============================  =========
layer      modules (``lightning_norms.`` omitted)      may import from the package     Lightning
=========  ==========================================  ==============================  =========
core       ``_moments``, ``_shared``, ``_tracing``,    core                            never
           ``functional``, ``functional.*``
layers     ``_base``, ``_batches``, ``_kinds``,        core, layers                    never
           ``_patterns``, ``_diagnostics``,
           ``domain_bn``, ``renorm``, ``distributed``,
           ``cosine``, ``layernorm``, ``convert``,
           ``fold``, ``stats``
data       ``data``, ``data.*``                        core, layers, data              yes
plugins    ``plugins``                                 core, layers                    yes
callbacks  ``callbacks``, ``callbacks.*``              core, layers, data, callbacks   yes
root       ``lightning_norms`` (``__init__``)          core, layers, data, plugins,    never
                                                       callbacks (lazily, PEP 562)
recipes    ``recipes``, ``recipes.*``                  everything, root included       yes
=========  ==========================================  ==============================  =========

So: ``functional`` and ``_moments`` import nothing that defines an ``nn.Module``; no layer
imports Lightning, a callback, a plugin or a recipe; callbacks never import recipes; nothing but
a recipe imports a recipe; ``import lightning_norms`` does not import Lightning (``NormSync``
is resolved lazily). "Lightning" is any of ``lightning``, ``pytorch_lightning``,
``lightning_fabric`` and ``lightning_utilities``.

Two checks: a static one parses every module with :mod:`ast` (``import``/``from ... import``
at any depth, relative ones resolved, ``importlib.import_module("constant")``; imports under
``if TYPE_CHECKING:`` do not run and are skipped) and names the module, the line and the
import; a dynamic one imports each layer in a fresh interpreter with an import spy on
``sys.meta_path`` and names the package module that triggered each forbidden import.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_norms

PACKAGE = "lightning_norms"
ROOT_DIR = Path(lightning_norms.__file__).parent
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities")

LAYER_OF_TOP = {
    "_moments": "core",
    "_shared": "core",
    "_tracing": "core",
    "functional": "core",
    **dict.fromkeys(
        (
            "_base",
            "_batches",
            "_kinds",
            "_patterns",
            "_sync_guard",
            "_diagnostics",
            "domain_bn",
            "renorm",
            "distributed",
            "cosine",
            "layernorm",
            "convert",
            "fold",
            "stats",
        ),
        "layers",
    ),
    "data": "data",
    "plugins": "plugins",
    "callbacks": "callbacks",
    "recipes": "recipes",
}
"""The table's module column, by the name after ``lightning_norms.``."""

ALLOWED = {
    "core": {"core"},
    "layers": {"core", "layers"},
    "data": {"core", "layers", "data"},
    "plugins": {"core", "layers", "plugins"},
    "callbacks": {"core", "layers", "data", "callbacks"},
    "root": {"core", "layers", "data", "plugins", "callbacks"},
    "recipes": {"core", "layers", "data", "plugins", "callbacks", "root", "recipes"},
}
"""The table's "may import" column (a layer may import its own modules)."""

NO_LIGHTNING = {"core", "layers", "root"}


def layer_of(module: str) -> str | None:
    """The layer of a package module (``None``: not in the table, or not in the package)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return "root"
    return LAYER_OF_TOP.get(parts[1])


def is_lightning(module: str) -> bool:
    return module.split(".")[0] in LIGHTNING


@functools.cache
def package_modules() -> list[str]:
    """Every module of the package, from its files (``pkg/__init__.py`` is ``pkg``)."""
    names = []
    for path in sorted(ROOT_DIR.rglob("*.py")):
        parts = path.relative_to(ROOT_DIR.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST, at_import: bool = False) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (its ``else`` runs).

    ``at_import``: only what runs when the module is imported (function bodies left out).
    """
    found: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if at_import and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args  # defaults and decorators run at import, the body when called
            decorators = getattr(node, "decorator_list", [])
            stack.extend(n for n in (*args.defaults, *args.kw_defaults, *decorators) if n)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <node.module> import ...`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(
    module: str, source: str, is_package: bool = False, at_import: bool = False
) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import that runs in ``source``.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a package module
    (``from lightning_norms import functional``), else as importing ``pkg``. ``at_import``:
    only the imports that run when the module is imported (not those inside functions).
    """
    known = set(package_modules())
    found: list[tuple[int, str]] = []
    for node in _runtime_nodes(ast.parse(source), at_import):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The import rules ``source`` (the text of ``module``) breaks, one message each."""
    layer = layer_of(module)
    if layer is None:
        return [
            f"{module} is not in the layer table of tests/integration/test_architecture.py: "
            "give it a row (and rules) there"
        ]
    found = []
    for line, target in imports_of(module, source, is_package):
        if is_lightning(target) and layer in NO_LIGHTNING:
            found.append(
                f"{module}:{line} imports {target} (layer {layer!r} never imports Lightning)"
            )
        target_layer = layer_of(target)
        if target.split(".")[0] == PACKAGE and target_layer not in ALLOWED[layer]:
            found.append(
                f"{module}:{line} imports {target} (layer {layer!r} may import only "
                f"{sorted(ALLOWED[layer])}, not {target_layer!r})"
            )
    return found


def _source_of(module: str) -> tuple[str, bool]:
    """The text of a package module and whether it is a package (``__init__.py``)."""
    path = ROOT_DIR.parent.joinpath(*module.split("."))
    if path.is_dir():
        return (path / "__init__.py").read_text(), True
    return path.with_suffix(".py").read_text(), False


# ---------------------------------------------------------------------------------------------
# static: every module's imports against the table


def test_every_layer_of_the_table_exists() -> None:
    layers = {layer_of(m) for m in package_modules()}
    assert layers == set(ALLOWED), layers ^ set(ALLOWED)
    assert len(package_modules()) > 20


@pytest.mark.parametrize("module", package_modules())
def test_module_follows_the_import_rules(module: str) -> None:
    source, is_package = _source_of(module)
    assert violations(module, source, is_package) == []


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (``[a, b, ..., a]``), or ``[]`` when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return []


def test_the_layer_table_is_a_dag() -> None:
    graph = {layer: allowed - {layer} for layer, allowed in ALLOWED.items()}
    assert _cycle(graph) == []


def test_no_import_cycle_between_modules_at_import_time() -> None:
    graph = {}
    for module in package_modules():
        source, is_package = _source_of(module)
        targets = {t for _, t in imports_of(module, source, is_package, at_import=True)}
        graph[module] = {t for t in targets if layer_of(t) is not None and t != module}
    assert _cycle(graph) == []


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b"}}, ["b", "b"]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], cycle: list[str]) -> None:
    assert _cycle(graph) == cycle


# The checker must be able to fail: each fake source breaks one rule, and the report names the
# module and the forbidden import.
FORBIDDEN_CASES = [
    ("lightning_norms.functional._domain", "import lightning\n", "lightning"),
    (
        "lightning_norms.functional._domain",
        "from lightning.pytorch import Trainer\n",
        "lightning.pytorch",
    ),
    (
        "lightning_norms._moments",
        "from lightning_norms import domain_bn\n",
        "lightning_norms.domain_bn",
    ),
    (
        "lightning_norms.functional._renorm",
        "from lightning_norms.renorm import BatchRenorm2d\n",
        "lightning_norms.renorm",
    ),
    (
        "lightning_norms.functional._cosine",
        "from ..cosine import CosineLinear\n",
        "lightning_norms.cosine",
    ),
    ("lightning_norms.functional", "from lightning_norms import stats\n", "lightning_norms.stats"),
    (
        "lightning_norms.domain_bn",
        "def f():\n    import pytorch_lightning as pl\n    return pl\n",
        "pytorch_lightning",
    ),
    ("lightning_norms.renorm", "import lightning_fabric\n", "lightning_fabric"),
    (
        "lightning_norms.stats",
        "from lightning_utilities import apply_func\n",
        "lightning_utilities",
    ),
    (
        "lightning_norms.convert",
        "from lightning_norms.callbacks import PreciseBN\n",
        "lightning_norms.callbacks",
    ),
    (
        "lightning_norms._base",
        "from lightning_norms.plugins import NormSync\n",
        "lightning_norms.plugins",
    ),
    (
        "lightning_norms.layernorm",
        "from .recipes import two_domain\n",
        "lightning_norms.recipes.two_domain",
    ),
    ("lightning_norms.distributed", "import lightning_norms\n", "lightning_norms"),
    (
        "lightning_norms",
        "import importlib\nimportlib.import_module('lightning.pytorch')\n",
        "lightning.pytorch",
    ),
    (
        "lightning_norms.callbacks.doctor",
        "from lightning_norms.recipes._common import build_model\n",
        "lightning_norms.recipes._common",
    ),
    (
        "lightning_norms.callbacks.precise_bn",
        "from ..recipes import report\n",
        "lightning_norms.recipes.report",
    ),
    ("lightning_norms.data.sampler", "import lightning_norms.recipes\n", "lightning_norms.recipes"),
    (
        "lightning_norms.plugins",
        "from lightning_norms.callbacks import doctor\n",
        "lightning_norms.callbacks.doctor",
    ),
    (
        "lightning_norms.data.digits",
        "from lightning_norms.callbacks import doctor\n",
        "lightning_norms.callbacks.doctor",
    ),
]


@pytest.mark.parametrize(("module", "source", "target"), FORBIDDEN_CASES)
def test_checker_reports_a_forbidden_import(module: str, source: str, target: str) -> None:
    found = violations(
        module, source, is_package=module in ("lightning_norms", "lightning_norms.functional")
    )
    assert len(found) >= 1
    assert all(msg.startswith(f"{module}:") for msg in found)
    assert any(f" imports {target} " in msg for msg in found), found


ALLOWED_CASES = [
    ("lightning_norms.functional._domain", "from lightning_norms._moments import Moments\n"),
    ("lightning_norms.functional._renorm", "from ._domain import domain_batch_norm\n"),
    ("lightning_norms.domain_bn", "from lightning_norms import functional as LF\n"),
    (
        "lightning_norms.stats",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lightning\n",
    ),
    (
        "lightning_norms.callbacks.doctor",
        "import lightning.pytorch as pl\nfrom lightning_norms.stats import x\n",
    ),
    (
        "lightning_norms.recipes.report",
        "import lightning_norms as ln\nfrom lightning_norms.callbacks import doctor\n",
    ),
    ("lightning_norms", "from lightning_norms.convert import convert_norms\n"),
]


@pytest.mark.parametrize(("module", "source"), ALLOWED_CASES)
def test_checker_accepts_an_allowed_import(module: str, source: str) -> None:
    assert violations(module, source) == []


def test_checker_refuses_a_module_without_a_row() -> None:
    (msg,) = violations("lightning_norms.brand_new", "import torch\n")
    assert "lightning_norms.brand_new is not in the layer table" in msg


# ---------------------------------------------------------------------------------------------
# dynamic: import the layers, lowest first, in one fresh interpreter and watch what gets imported

SPY = r"""
import importlib, json, sys

phases, owner = json.loads(sys.argv[1])
forbidden, hits = [], []


def importer():
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == owner or name.startswith(owner + "."):
            return name
        frame = frame.f_back
    return None


class Spy:
    def find_spec(self, name, path=None, target=None):
        inside = any(name.startswith(seen + ".") for _, seen in hits[-1])  # one per package
        if not inside and any(name == f or name.startswith(f + ".") for f in forbidden):
            hits[-1].append([importer(), name])
        return None


sys.meta_path.insert(0, Spy())
for modules, banned in phases:
    forbidden[:] = banned
    hits.append([])
    for module in modules:
        if module.startswith("getattr:"):
            getattr(importlib.import_module(owner), module[len("getattr:") :])
        else:
            importlib.import_module(module)
print(json.dumps(hits))
"""


def spy_imports(
    phases: list[tuple[list[str], list[str]]], owner: str = PACKAGE, cwd: Path | None = None
) -> list[list[tuple[str | None, str]]]:
    """Run ``phases`` of ``(modules to import, forbidden modules)`` in one fresh interpreter.

    Returns, per phase, ``(importer, module)`` for every forbidden module first imported in
    that phase (not its submodules); ``importer`` is the innermost module under ``owner`` on
    the stack at that moment. ``getattr:NAME`` in a phase's modules touches ``owner.NAME``. A
    module imported in an earlier phase is not imported again: order the phases lowest first.
    """
    proc = subprocess.run(
        [sys.executable, "-c", SPY, json.dumps([phases, owner])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd or ROOT_DIR.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [
        [(who, name) for who, name in phase] for phase in json.loads(proc.stdout.splitlines()[-1])
    ]


def _layer_modules(*layers: str) -> list[str]:
    return [m for m in package_modules() if layer_of(m) in layers]


def _outside(*layers: str) -> list[str]:
    """Every package module not in ``layers`` (the root facade excepted: parents load it)."""
    return [m for m in package_modules() if layer_of(m) not in (*layers, "root")]


PHASES = {
    "core": (_layer_modules("core"), [*LIGHTNING, *_outside("core")]),
    "layers": (
        _layer_modules("layers"),
        [*LIGHTNING, *(f"{PACKAGE}.{top}" for top in ("callbacks", "plugins", "data", "recipes"))],
    ),
    "root": (
        [PACKAGE, *(f"getattr:{name}" for name in lightning_norms.__all__ if name != "NormSync")],
        list(LIGHTNING),
    ),
    "NormSync": (["getattr:NormSync"], list(LIGHTNING)),
    "not recipes": (_outside("recipes"), [f"{PACKAGE}.recipes"]),
}
"""The dynamic rules, in import order: what each phase imports and what it must not."""


@pytest.fixture(scope="module")
def spied() -> dict[str, list[tuple[str | None, str]]]:
    return dict(zip(PHASES, spy_imports(list(PHASES.values())), strict=True))


def test_core_imports_no_lightning_and_no_module_layer(spied: dict) -> None:
    assert spied["core"] == []


def test_layers_import_no_lightning_callbacks_plugins_data_or_recipes(spied: dict) -> None:
    assert spied["layers"] == []


def test_import_lightning_norms_is_lightning_free_until_normsync(spied: dict) -> None:
    assert spied["root"] == []
    # the positive control: NormSync does import Lightning, and the spy names its importer
    assert (f"{PACKAGE}.plugins", "lightning") in spied["NormSync"]


def test_nothing_but_recipes_imports_recipes(spied: dict) -> None:
    assert spied["not recipes"] == []


def test_spy_names_the_importer_of_a_forbidden_module(tmp_path: Path) -> None:
    (tmp_path / "probe_pkg").mkdir()
    (tmp_path / "probe_pkg" / "__init__.py").write_text("")
    (tmp_path / "probe_pkg" / "core.py").write_text("import json\n")
    (tmp_path / "probe_pkg" / "layer.py").write_text(
        "import probe_pkg.core\nimport lightning_utilities\n"
    )
    phases = [(["probe_pkg.core"], list(LIGHTNING)), (["probe_pkg.layer"], list(LIGHTNING))]
    hits = spy_imports(phases, owner="probe_pkg", cwd=tmp_path)
    assert hits == [[], [("probe_pkg.layer", "lightning_utilities")]]


def _private_imports() -> list[str]:
    """``file:line name`` for every package-internal ``from lightning_norms... import _name``."""
    found = []
    for path in sorted(ROOT_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    where = path.relative_to(ROOT_DIR.parent)
                    found.append(f"{where}:{node.lineno} {node.module}.{alias.name}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    """Shared internals live under public-in-package names in internal modules (``_shared``,
    ``_tracing``, ``_kinds``, ``functional._domain``...): no module imports a ``_name``."""
    assert _private_imports() == []
