"""The import rule of docs/architecture.md: no module imports from a layer above its own.

Imports are read with `ast` from every file under advmnist/ (function-level imports too: the CLI
imports its commands' modules lazily), so nothing is run. A new module must be given a layer here
and in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "advmnist"

#: Lowest first; a module may import from its own layer and the layers below it. A package
#: (attacks/, experiments/) is one unit: its files import each other freely.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("__init__", "errors", "names", "validate", "memory", "devices")),
    ("data and models", ("data", "models")),
    ("attacks", ("attacks",)),
    ("measures", ("measures", "execution", "robustness", "bounds", "branching", "exact")),
    ("records", ("runs", "records", "foreign", "shipped")),
    ("pictures", ("pictures",)),
    ("jobs", ("train", "attacking", "evaluation", "leaderboard")),
    ("experiments", ("experiments",)),
    ("cli", ("cli", "cli_types")),
]
LAYER = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}

#: Stricter than the layers: an attack is a pure function that can be lifted into another project.
#: (models: only the fast gradient path, which recognises the zoo's Normalize layer to fold it.)
ATTACKS_MAY_IMPORT = {"errors", "memory", "models", "attacks"}


def _unit(path: Path) -> str:
    """The layer unit of a file: its top-level module under advmnist/ (a package counts as one)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, unit) of every advmnist module the file imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["advmnist", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            # `from . import x`: x is a module of the package, or a name its __init__ defines
            targets = [module] if node.module else [module + [alias.name] for alias in node.names]
        else:
            continue
        for parts in targets:
            if parts[:1] != ["advmnist"]:
                continue
            if len(parts) == 1 or not ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
                found.append((node.lineno, "__init__"))
            else:
                found.append((node.lineno, parts[1]))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    units = {_unit(f) for f in FILES}
    assert units - set(LAYER) == set(), "give the new module a layer here and in docs/architecture.md"


@pytest.mark.parametrize("path", FILES, ids=[f.relative_to(PACKAGE).as_posix() for f in FILES])
def test_no_import_from_a_layer_above(path):
    source = _unit(path)
    above = [(line, unit) for line, unit in _imports(path) if unit != source and LAYER[unit] > LAYER[source]]
    assert above == [], (f"{path.relative_to(PACKAGE)} (layer {LAYERS[LAYER[source]][0]!r}) imports from above: "
                         + ", ".join(f"{unit} ({LAYERS[LAYER[unit]][0]}) at line {line}" for line, unit in above))


def test_attacks_import_no_training_records_pictures_or_cli():
    for path in (PACKAGE / "attacks").glob("*.py"):
        wrong = [(line, unit) for line, unit in _imports(path) if unit not in ATTACKS_MAY_IMPORT]
        assert wrong == [], f"attacks/{path.name} imports {wrong}: training, records, pictures and the CLI are above it"


def test_only_the_cli_reads_command_line_options():
    for path in FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        if _unit(path) not in ("cli", "cli_types"):
            assert not modules & {"click", "argparse"}, f"{path.relative_to(PACKAGE)} reads command-line options"


def test_the_rule_sees_imports():
    """The reader resolves the relative forms the package uses."""
    assert {"errors", "memory"} <= {u for _, u in _imports(PACKAGE / "attacks" / "core.py")}  # `from ..errors`
    units = {u for _, u in _imports(PACKAGE / "cli.py")}
    assert {"attacking", "experiments", "train", "evaluation", "names", "errors"} <= units
    assert "__init__" in {u for _, u in _imports(PACKAGE / "runs.py")}  # `from . import __version__`
