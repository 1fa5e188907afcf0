"""advmnist: train the classic MNIST networks, attack them in pixel space, measure and show."""

__version__ = "0.1.0"

from .data import MNIST, load_mnist  # noqa: E402
from .errors import AdvmnistError  # noqa: E402
from .models import Recipe, create_model, list_models, register_model  # noqa: E402

__all__ = ["MNIST", "load_mnist", "AdvmnistError", "Recipe", "create_model", "list_models",
           "register_model", "__version__"]
