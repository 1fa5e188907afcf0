"""The zoo: every MNIST classifier of the reports, each with its report's training recipe.

Every model takes pixels in [0, 1] with shape (N, 1, 28, 28) and returns logits (N, 10). Input
normalisation is the model's first layer (`Normalize`), so attacks never see normalised tensors.
The reports end some nets in log_softmax or softmax before CrossEntropyLoss; here every net ends
in logits and training uses cross-entropy on them (the same loss as NLL on log_softmax, and the
correct one where a report applied softmax twice).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .errors import ModelError
from .names import PRECISIONS, SCHEDULES  # noqa: F401  (values of Recipe fields; defined without torch for the CLI)


@dataclass(frozen=True)
class Recipe:
    """How a report trained its model; `advmnist train` overrides any field."""

    optimizer: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.01  # learning rate
    momentum: float = 0.0  # SGD momentum (ignored by Adam)
    batch_size: int = 64  # training mini-batch size; the last partial batch is kept
    epochs: int = 3  # passes over the 60,000 training images
    dropout: float | None = None  # dropout probability; None where the model has no such option
    weight_decay: float = 0.0  # L2 penalty, 0 in every report
    schedule: str = "constant"  # learning rate: "constant" (every report) or "onecycle" (0 -> lr -> 0, linear)
    ema: float = 0.0  # decay of an exponential moving average of the weights, which is what is kept; 0: off
    precision: str = "fp32"  # "bf16": training passes under bfloat16 autocast; weights, tests and bounds stay fp32

    def __str__(self) -> str:
        parts = [self.optimizer, f"lr={self.lr:g}"]
        if self.optimizer == "sgd":
            parts.append(f"momentum={self.momentum:g}")
        parts += [f"batch={self.batch_size}", f"epochs={self.epochs}"]
        if self.dropout is not None:
            parts.append(f"dropout={self.dropout:g}")
        if self.weight_decay:
            parts.append(f"weight_decay={self.weight_decay:g}")
        if self.schedule != "constant":
            parts.append(f"schedule={self.schedule}")
        if self.ema:
            parts.append(f"ema={self.ema:g}")
        if self.precision != "fp32":
            parts.append(f"precision={self.precision}")
        return " ".join(parts)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    recipe: Recipe
    report: str  # which report in shared/seeds the architecture and recipe come from
    reported_accuracy: float  # the report's test accuracy (%) for the default recipe
    summary: str
    variants: dict = field(default_factory=dict)  # other rows of the report's tables: label -> accuracy


_REGISTRY: "OrderedDict[str, ModelSpec]" = OrderedDict()


class Normalize(nn.Module):
    """(x - mean) / std as a layer, so the model's input space is pixels in [0, 1]."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.item():g}, std={self.std.item():g}"


class WholeMapConv2d(nn.Conv2d):
    """A Conv2d that, when its kernel covers the whole input map, runs as one matrix product.

    The textbook net's conv 4x4 on a 4x4 map and conv 1x1 on a 1x1 map are fully connected layers;
    oneDNN's convolution kernels are several times slower than a matmul for them. Same parameters,
    same state dict, same result to float rounding; any other input size takes the ordinary path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[-2:] == self.weight.shape[-2:] and self.groups == 1 and self.padding == (0, 0)
                and self.stride == (1, 1) and self.dilation == (1, 1)):
            out = torch.nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)
            return out[:, :, None, None]
        return super().forward(x)


def register_model(*, report: str, recipe: Recipe, accuracy: float, variants: dict | None = None):
    """Add a builder to the zoo under its function name with '_' as '-'; a duplicate is an error."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__.replace("_", "-")
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = ModelSpec(name, fn, recipe, report, accuracy, summary, dict(variants or {}))
        return fn

    return decorator


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def create_model(name: str, **options) -> nn.Module:
    """Build a registered model; `options` (e.g. dropout=0.1) go to its builder, None = default."""
    spec = get_spec(name)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(spec.build).parameters
    for key in options:
        if key not in accepted:
            raise ModelError(f"model {name!r} takes no option {key!r}")
    if "dropout" in options and not 0.0 <= options["dropout"] < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {options['dropout']}")
    return spec.build(**options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _seq(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


MNIST_NORM = (0.1307, 0.3081)
HALF_NORM = (0.5, 0.5)
_ADAM_000 = Recipe(optimizer="adam", lr=0.003, batch_size=1000, epochs=20)


@register_model(report="000", recipe=_ADAM_000, accuracy=97.84)
def mlp() -> nn.Module:
    """784-512-512-512-10 perceptron with ReLU; inputs normalised with (0.5, 0.5)."""
    return _seq(("norm", Normalize(*HALF_NORM)), ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(784, 512)), ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(512, 512)), ("relu2", nn.ReLU()),
                ("fc3", nn.Linear(512, 512)), ("relu3", nn.ReLU()),
                ("fc4", nn.Linear(512, 10)))


@register_model(report="000", recipe=Recipe(optimizer="adam", lr=0.003, batch_size=1000, epochs=20,
                                            dropout=0.2), accuracy=98.69)
def cnn_small(dropout: float = 0.2) -> nn.Module:
    """One 3x3 conv (28 maps), max-pool, fc 4732->128, dropout, fc->10.

    The report's `dropout_conv1` sits after the hidden linear layer, not the conv; kept there.
    """
    return _seq(("norm", Normalize(*HALF_NORM)),
                ("conv1", nn.Conv2d(1, 28, 3)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(28 * 13 * 13, 128)), ("relu2", nn.ReLU()),
                ("drop", nn.Dropout(dropout)), ("fc2", nn.Linear(128, 10)))


@register_model(report="001", recipe=Recipe(lr=0.01, momentum=0.5, batch_size=64, epochs=3,
                                            dropout=0.5), accuracy=96.54)
def tutorial(dropout: float = 0.5) -> nn.Module:
    """The PyTorch tutorial net of report 001, Problem 17.1: two 5x5 convs, fc 320->50->10.

    Dropout2d after conv2 and dropout after fc1, both with the tutorial's p = 0.5.
    """
    return _seq(("norm", Normalize(*MNIST_NORM)),
                ("conv1", nn.Conv2d(1, 10, 5)), ("pool1", nn.MaxPool2d(2)), ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(10, 20, 5)), ("drop2d", nn.Dropout2d(dropout)),
                ("pool2", nn.MaxPool2d(2)), ("relu2", nn.ReLU()),
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(320, 50)), ("relu3", nn.ReLU()),
                ("drop", nn.Dropout(dropout)), ("fc2", nn.Linear(50, 10)))


def _textbook(dropout: float, batch_norm: bool) -> nn.Module:
    def block(i: int, cin: int, cout: int, k: int) -> list[tuple[str, nn.Module]]:
        layers = [(f"conv{i}", (WholeMapConv2d if i == 3 else nn.Conv2d)(cin, cout, k))]
        if batch_norm:
            layers.append((f"bn{i}", nn.BatchNorm2d(cout)))
        if dropout > 0 and i <= 2:
            layers.append((f"drop{i}", nn.Dropout2d(dropout)))
        return layers

    return _seq(("norm", Normalize(*MNIST_NORM)),
                *block(1, 1, 20, 5), ("pool1", nn.MaxPool2d(2)),
                *block(2, 20, 50, 5), ("pool2", nn.MaxPool2d(2)),
                *block(3, 50, 500, 4), ("relu3", nn.ReLU()),
                ("conv4", WholeMapConv2d(500, 10, 1)), ("flatten", nn.Flatten()))


@register_model(report="001", recipe=Recipe(lr=0.01, momentum=0.5, batch_size=64, epochs=3, dropout=0.0),
                accuracy=98.42,
                variants={"momentum 0, dropout 0": 97.93, "momentum 0.5, dropout 0": 98.42,
                          "momentum 0, dropout 0.1": 97.65, "momentum 0, dropout 0.5": 96.10,
                          "momentum 0.5, dropout 0.1": 97.94, "momentum 0.5, dropout 0.5": 97.42})
def textbook(dropout: float = 0.0) -> nn.Module:
    """The textbook net of report 001, Problem 17.2: conv 5x5 20, pool, conv 5x5 50, pool, conv 4x4 500, ReLU, conv 1x1 10.

    As in the report's code, only conv3 is followed by a ReLU (the max-pools are the other
    non-linearities). With dropout > 0, Dropout2d follows conv1 and conv2. Default momentum 0.5,
    the value the report lists among its hyperparameters; `--momentum 0` gives the table's other rows.
    """
    return _textbook(dropout, batch_norm=False)


@register_model(report="001", recipe=Recipe(lr=0.01, momentum=0.5, batch_size=64, epochs=3, dropout=0.0),
                accuracy=98.76, variants={"dropout 0": 98.76, "dropout 0.1": 98.94})
def improved_bn(dropout: float = 0.0) -> nn.Module:
    """Report 001's improved net: the textbook net with BatchNorm after every conv but the last.

    Order per block: conv, BatchNorm, Dropout2d (if dropout > 0), max-pool, as the report's
    `conv_bn` wrapped in `Sequential(conv, Dropout2d)`.
    """
    return _textbook(dropout, batch_norm=True)


@register_model(report="002", recipe=Recipe(optimizer="adam", lr=1e-4, batch_size=100, epochs=50,
                                            dropout=0.4), accuracy=99.20)
def cnn_deep(dropout: float = 0.4) -> nn.Module:
    """Report 002: conv 5x5 32, pool, conv 5x5 64, pool, fc 1024->500, dropout, fc->10.

    The report's prose says 128 hidden units but its code and printout have 500; 500 is used.
    Its forward applies softmax before CrossEntropyLoss; here the net returns logits.
    """
    return _seq(("norm", Normalize(*HALF_NORM)),
                ("conv1", nn.Conv2d(1, 32, 5)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(4 * 4 * 64, 500)), ("relu3", nn.ReLU()),
                ("drop", nn.Dropout(dropout)), ("fc2", nn.Linear(500, 10)))


@register_model(report="003", recipe=Recipe(lr=0.001, momentum=0.9, batch_size=50, epochs=5),
                accuracy=98.0)
def two_conv() -> nn.Module:
    """Report 003: conv 5x5 10, pool, ReLU, conv 5x5 20, pool, ReLU, fc 320->50, ReLU, fc->10."""
    return _seq(("norm", Normalize(*MNIST_NORM)),
                ("conv1", nn.Conv2d(1, 10, 5)), ("pool1", nn.MaxPool2d(2)), ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(10, 20, 5)), ("pool2", nn.MaxPool2d(2)), ("relu2", nn.ReLU()),
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(320, 50)), ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(50, 10)))


def _lenet(batch_norm: bool, dropout: float) -> nn.Module:
    def conv(i: int, cin: int, cout: int, pad: int) -> list[tuple[str, nn.Module]]:
        layers = [(f"conv{i}", nn.Conv2d(cin, cout, 5, padding=pad))]
        if batch_norm:
            layers.append((f"bn{i}", nn.BatchNorm2d(cout)))
        return layers + [(f"relu{i}", nn.ReLU()), (f"pool{i}", nn.MaxPool2d(2))]

    def fc(i: int, cin: int, cout: int) -> list[tuple[str, nn.Module]]:
        layers = [(f"fc{i}", nn.Linear(cin, cout))]
        if batch_norm:
            layers.append((f"bnf{i}", nn.BatchNorm1d(cout)))
        layers.append((f"relu_fc{i}", nn.ReLU()))
        if dropout > 0:
            layers.append((f"drop{i}", nn.Dropout(dropout)))
        return layers

    return _seq(("norm", Normalize(0.0, 1.0)), *conv(1, 1, 6, 2), *conv(2, 6, 16, 0),
                ("flatten", nn.Flatten()), *fc(1, 400, 120), *fc(2, 120, 84), ("fc3", nn.Linear(84, 10)))


_LENET = Recipe(lr=0.01, batch_size=32, epochs=8)


@register_model(report="004", recipe=_LENET, accuracy=97.9)
def lenet() -> nn.Module:
    """Report 004's LeNet-5: conv 5x5 6 (padding 2), pool, conv 5x5 16, pool, fc 400-120-84-10.

    The report's code has no padding, but its fc1 takes 16*5*5, which only a 32x32 input, i.e.
    padding 2 on MNIST's 28x28, yields. No input normalisation, as the report (ToTensor only).
    """
    return _lenet(batch_norm=False, dropout=0.0)


@register_model(report="004", recipe=Recipe(lr=0.01, batch_size=32, epochs=8, dropout=0.2), accuracy=98.7)
def lenet_bn(dropout: float = 0.2) -> nn.Module:
    """LeNet-5 with BatchNorm after every conv and hidden fc layer, and dropout after the hidden fcs.

    Report 004 names "batch normalization and dropout" without its code; this placement and
    p = 0.2 are our choice.
    """
    return _lenet(batch_norm=True, dropout=dropout)


@register_model(report="MNIST challenge", recipe=Recipe(optimizer="adam", lr=1e-3, batch_size=128, epochs=5),
                accuracy=98.53)
def madry() -> nn.Module:
    """The MNIST-challenge network (Madry et al.): conv 5x5 32 SAME, pool, conv 5x5 64 SAME, pool, fc 3136->1024, fc->10.

    No input normalisation, as in the challenge. Its reported 98.53% is after PGD adversarial
    training (eps 0.3, 100k steps of Adam 1e-4 at batch 50); the default recipe here is a short
    standard training (Adam 1e-3, batch 128, 5 epochs) that fits a 2-core CPU.
    """
    return _seq(("norm", Normalize(0.0, 1.0)),
                ("conv1", nn.Conv2d(1, 32, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, 5, padding=2)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(7 * 7 * 64, 1024)), ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(1024, 10)))


def _strided_net(c1: int, c2: int, hidden: int) -> nn.Sequential:
    """Wong et al.'s small MNIST net at a given width: conv 4x4/2 c1, conv 4x4/2 c2, fc hidden, fc 10."""
    return _seq(("norm", Normalize(0.0, 1.0)),
                ("conv1", nn.Conv2d(1, c1, 4, stride=2, padding=1)), ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(c1, c2, 4, stride=2, padding=1)), ("relu2", nn.ReLU()),
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(7 * 7 * c2, hidden)), ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(hidden, 10)))


@register_model(report="Wong 2020", recipe=Recipe(optimizer="adam", lr=1e-3, batch_size=100, epochs=5), accuracy=98.5)
def strided() -> nn.Module:
    """Conv 4x4/2 24, conv 4x4/2 48, fc 2352->128, fc->10: strided convs, no pooling.

    The small MNIST net of Wong et al. ("Fast is better than free", 2020; 16 and 32 maps, fc 100),
    widened 1.5x: a net cheap enough for adversarial training on 2 CPU cores (no max-pool, whose
    CPU kernels dominate the zoo's attack steps), wide enough to learn eps = 0.3 robustness. No
    reported number of its own: 98.5% is the clean accuracy of Wong et al.'s FGSM-RS-trained net.
    """
    return _strided_net(24, 48, 128)


@register_model(report="Wong 2020", recipe=Recipe(optimizer="adam", lr=1e-3, batch_size=100, epochs=5), accuracy=98.5)
def strided_wide() -> nn.Module:
    """Conv 4x4/2 32, conv 4x4/2 64, fc 3136->200, fc->10: Wong et al.'s small net, twice as wide.

    `strided` with more capacity for robust and certified training (Gowal et al. 2018 find IBP's
    verified accuracy grows with width) at about 1.8x its multiplies per image, still without
    max-pool. No reported number of its own: 98.5% is the clean accuracy of Wong et al.'s
    FGSM-RS-trained small net.
    """
    return _strided_net(32, 64, 200)


@register_model(report="Wong 2020", recipe=Recipe(optimizer="adam", lr=1e-3, batch_size=100, epochs=5), accuracy=98.5)
def strided_large() -> nn.Module:
    """Conv 4x4/2 64, conv 4x4/2 128, fc 6272->256, fc->10: Wong et al.'s small net, four times the channels.

    For certified training on both cores: IBP-trained nets underfit (the clean accuracy on their own
    training images stays near 98%), and Gowal et al. 2018 gain clean and verified accuracy with
    width. 3.5x the multiplies of `strided-wide` (an IBP training epoch takes 2.4x as long), still
    without max-pool. No reported number of its own: 98.5% is the clean accuracy of Wong et al.'s
    FGSM-RS-trained small net.
    """
    return _strided_net(64, 128, 256)


@register_model(report="TRADES 2019", recipe=Recipe(lr=0.01, momentum=0.9, batch_size=128, epochs=10, dropout=0.5),
                accuracy=99.48)
def trades_cnn(dropout: float = 0.5) -> nn.Module:
    """Conv 3x3 32, 32, pool, 64, 64, pool, fc 1024->200, 200->200, ->10: the MNIST net of TRADES.

    Zhang et al. ("Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019)
    train it with TRADES (eps 0.3, 40 steps of 0.01, beta 6, SGD 0.01 momentum 0.9, 100 epochs) to
    99.48% clean and 92.81% under AutoAttack at eps 0.3; 99.48% is that clean accuracy. The default
    recipe here is a short standard training. Dropout 0.5 after the first fc layer, as in their code.
    """
    return _seq(("norm", Normalize(0.0, 1.0)),
                ("conv1", nn.Conv2d(1, 32, 3)), ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(32, 32, 3)), ("relu2", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                ("conv3", nn.Conv2d(32, 64, 3)), ("relu3", nn.ReLU()),
                ("conv4", nn.Conv2d(64, 64, 3)), ("relu4", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(4 * 4 * 64, 200)), ("relu5", nn.ReLU()),
                ("drop", nn.Dropout(dropout)), ("fc2", nn.Linear(200, 200)), ("relu6", nn.ReLU()),
                ("fc3", nn.Linear(200, 10)))
