"""The registry names the CLI needs before any command runs, without importing torch.

`advmnist --help`, `--version` and shell completion import only click and this module, so they
answer in a fraction of a second instead of the seconds `import torch` takes. The lists are static
copies of the real registries, in registry order (the order `--help` shows);
`tests/test_cli_fast.py` checks that they equal `advmnist.models.list_models()`,
`advmnist.attacks.list_attacks()`, `advmnist.robustness.ENSEMBLES` and friends, so adding a model or an
attack without adding its name here fails the tests.
"""

from __future__ import annotations

# advmnist.models.list_models()
MODELS: tuple[str, ...] = ("mlp", "cnn-small", "tutorial", "textbook", "improved-bn", "cnn-deep", "two-conv",
                           "lenet", "lenet-bn", "madry", "strided",
                           "trades-cnn")

# advmnist.attacks.list_attacks()
ATTACKS: tuple[str, ...] = ("fgsm", "gd", "penalty", "pgd", "apgd", "apgd-t", "square")

# advmnist.train.ADVERSARIAL_METHODS (defined here, imported there)
ADVERSARIAL_METHODS: tuple[str, ...] = ("pgd", "fgsm-rs", "fgsm", "trades", "ibp")

# advmnist.models.SCHEDULES, the values of Recipe.schedule (defined here, imported there)
SCHEDULES: tuple[str, ...] = ("constant", "onecycle")

# the keys of advmnist.robustness.ENSEMBLES
ENSEMBLES: tuple[str, ...] = ("standard", "quick", "pgd")
