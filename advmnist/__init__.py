"""advmnist: train the classic MNIST networks, attack them in pixel space, measure and show."""

__version__ = "0.1.0"

from .errors import AdvmnistError  # noqa: E402

# `from advmnist import load_mnist, create_model` imports torch on first use, not on `import advmnist`:
# the CLI's --help, --version and shell completion never need it (PEP 562).
_LAZY = {"MNIST": "data", "load_mnist": "data", "Recipe": "models", "create_model": "models",
         "list_models": "models", "register_model": "models", "robust_accuracy": "evaluation",
         "load_module": "foreign", "load_model_file": "foreign",
         "pretrained": "shipped", "list_pretrained": "shipped"}

__all__ = ["MNIST", "load_mnist", "AdvmnistError", "Recipe", "create_model", "list_models",
           "register_model", "robust_accuracy", "load_module", "load_model_file", "pretrained", "list_pretrained",
           "__version__"]


def __getattr__(name: str):
    from importlib import import_module
    from importlib.util import find_spec

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        return import_module(f"{__name__}.{name}")  # `import advmnist; advmnist.models.lenet` as before
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
