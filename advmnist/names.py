"""The registry names the CLI needs before any command runs, without importing torch.

`advmnist --help`, `--version` and shell completion import only click and this module, so they
answer in a fraction of a second instead of the seconds `import torch` takes.

The attacks are read from their own source: `read_attacks()` parses `advmnist/attacks/*.py` with
`ast` (nothing there is imported or run) and finds every `@register_attack` function, in the order
`advmnist/attacks/__init__.py` imports their files, with its keyword-only parameters, their
defaults and annotations. The `attack` command builds its options from that, so adding an attack
needs no edit here or in `cli.py`. The other lists are static copies of their registries, in
registry order (the order `--help` shows). `tests/test_cli_fast.py` checks all of them against the
live registries (`advmnist.models.list_models()`, `advmnist.attacks.list_attacks()` and each
attack's signature, `advmnist.robustness.ENSEMBLES` and friends).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# advmnist.models.list_models()
MODELS: tuple[str, ...] = ("mlp", "cnn-small", "tutorial", "textbook", "improved-bn", "cnn-deep", "two-conv",
                           "lenet", "lenet-bn", "madry", "strided",
                           "strided-wide", "strided-large", "trades-cnn")


@dataclass(frozen=True)
class AttackParam:
    """One keyword-only parameter of an attack, as its signature gives it."""

    name: str
    kind: str  # "float", "int", "bool", "choice" (a Literal of strings), or "other" (no command-line option)
    default: Any  # the literal default; None where it is not a literal
    choices: tuple[str, ...] = ()  # kind "choice": the Literal's values


@dataclass(frozen=True)
class AttackInfo:
    name: str  # the registry name
    always_targeted: bool  # y holds target labels (penalty, gd)
    params: tuple[AttackParam, ...]


def _kind(annotation: ast.expr | None, default: Any) -> tuple[str, tuple[str, ...]]:
    """An annotation's command-line kind: a Literal of strings wins, then bool, int, float."""
    if annotation is None:
        names = {type(default).__name__} if default is not None else set()
    else:
        names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
        for node in ast.walk(annotation):
            if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
                items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
                values = tuple(i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str))
                if values:
                    return "choice", values
    for kind in ("bool", "int", "float"):
        if kind in names:
            return kind, ()
    return "other", ()


def _literal(node: ast.expr | None) -> Any:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None


@functools.cache
def read_attacks() -> tuple[AttackInfo, ...]:
    """Every `@register_attack` function under advmnist/attacks/, in registry order, read with `ast`."""
    folder = Path(__file__).with_name("attacks")
    init = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
    modules = list(dict.fromkeys(node.module for node in init.body
                                 if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module))
    found = []
    for module in modules:
        tree = ast.parse((folder / f"{module}.py").read_text(encoding="utf-8"))
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            for dec in fn.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "register_attack":
                    options = {k.arg: _literal(k.value) for k in dec.keywords}
                    params = []
                    for arg, default in zip(fn.args.kwonlyargs, fn.args.kw_defaults):
                        value = _literal(default)
                        kind, choices = _kind(arg.annotation, value)
                        params.append(AttackParam(arg.arg, kind, value, choices))
                    found.append(AttackInfo(options.get("name") or fn.name, bool(options.get("always_targeted")),
                                            tuple(params)))
    return tuple(found)


# advmnist.attacks.list_attacks()
ATTACKS: tuple[str, ...] = tuple(a.name for a in read_attacks())

# advmnist.train.ADVERSARIAL_METHODS: the training methods with their own recipe (Madry et al.'s PGD,
# Wong et al.'s FGSM with random start, plain FGSM, TRADES, IBP), then every other registered attack
# that is untargeted and takes an eps, as the inner maximiser under its own name
_TRAINING_METHODS: tuple[str, ...] = ("pgd", "fgsm-rs", "fgsm", "trades", "ibp")
ADVERSARIAL_METHODS: tuple[str, ...] = _TRAINING_METHODS + tuple(
    a.name for a in read_attacks() if a.name not in _TRAINING_METHODS and not a.always_targeted
    and any(p.name == "eps" for p in a.params))

# advmnist.models.SCHEDULES, the values of Recipe.schedule (defined here, imported there)
SCHEDULES: tuple[str, ...] = ("constant", "onecycle")

# advmnist.models.PRECISIONS, the values of Recipe.precision
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

# advmnist.evaluation.BOUNDS, the certified bounds of `evaluate --robust --bound`
BOUNDS: tuple[str, ...] = ("auto", "ibp", "crown-ibp", "crown", "alpha-crown", "bab")

# the keys of advmnist.robustness.ENSEMBLES
ENSEMBLES: tuple[str, ...] = ("standard", "autoattack", "quick", "pgd")
