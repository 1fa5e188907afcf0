"""Certified lower bounds on robust accuracy: interval bound propagation (IBP) and CROWN.

An attack that fails proves nothing; a bound does. For an input x, a label y and the Linf ball of
radius eps around x (clipped to the pixel box [0, 1]) these functions bound, from below, the margins
logit_y - logit_j for every j != y over the whole ball. When all nine lower bounds are positive, no
perturbation in the ball changes the prediction: the example is certified, whatever attack comes.

- IBP (Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
  Verifiably Robust Models") pushes a box through every layer. The margins are folded into the
  affine tail (the operations between the last ReLUs or max-pools and the logits), as they do, so
  the box is never taken around the logits themselves.
- CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General
  Activation Functions") propagates the margins backwards as linear functions, relaxing each
  unstable ReLU by two lines (upper: the chord; lower: slope 0 or 1, whichever is closer). Its
  pre-activation bounds are the tighter of IBP's and CROWN's own (backward from that node), except
  where a single affine map precedes the ReLU: there IBP is already exact.

Any module is read as its `torch.fx` graph (traced once per model and kept while the model lives;
a model fx cannot trace is a `BoundError` with fx's reason), so a network with a functional forward
and residual connections can be certified, not only an nn.Sequential. Supported: Linear and Conv2d
(zero padding; also F.linear / F.conv2d with constant weights), BatchNorm in eval mode, ReLU
(module, F.relu, torch.relu, x.relu()), average pooling, max pooling (IBP only), Flatten /
torch.flatten / view / reshape that keep the batch dimension first, Dropout and Identity modules
in eval mode, advmnist's `Normalize`, adding, subtracting, multiplying and dividing by constants
(numbers, buffers, parameters), and the sum or difference of two bounded branches (residual
connections). Nodes that depend on the input's shape only (`x.size(0)`, `x.shape[1]`) are
evaluated on an example. Anything else is a `BoundError` naming the operation and its node. The
functions never change the model or its mode.
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import AdvmnistError
from .measures import eval_mode
from .models import Normalize

TOLERANCE = 1e-4  # float32 slack: a margin bound must exceed this to certify


class BoundError(AdvmnistError):
    """A model or setting the bounds cannot handle (unsupported operation, train mode, bad eps)."""


class _Affine(nn.Module):
    """x * scale + shift with constants (inline normalisation, `x - c`, `x / c`, `c * x`, `-x`)."""

    def __init__(self, scale, shift):
        super().__init__()
        _hold(self, "scale", scale)
        _hold(self, "shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled(x, self.scale, self.shift)


class _Reshape(nn.Module):
    """view / reshape / flatten to a per-example shape (the batch dimension stays first)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), *self.shape)


class _Linear(nn.Module):
    """F.linear with constant weights."""

    def __init__(self, weight, bias):
        super().__init__()
        _hold(self, "weight", weight)
        _hold(self, "bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Conv2d(nn.Module):
    """F.conv2d with constant weights."""

    padding_mode = "zeros"

    def __init__(self, weight, bias, stride, padding, dilation, groups):
        super().__init__()
        _hold(self, "weight", weight)
        _hold(self, "bias", bias)
        self.stride, self.padding = nn.modules.utils._pair(stride), padding
        self.dilation, self.groups = nn.modules.utils._pair(dilation), groups
        if not isinstance(padding, str):
            self.padding = nn.modules.utils._pair(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, **_conv_args(self))


class _Sum(nn.Module):
    """a + weight * b for two bounded branches (a residual connection: weight 1)."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + self.weight * b


def _hold(module: nn.Module, name: str, value) -> None:
    """A constant on a synthesized module: a tensor as a buffer (so `.double()` converts it), a
    parameter as itself (gradients reach it)."""
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        module.register_buffer(name, value)
    else:
        setattr(module, name, value)


def _scaled(x: torch.Tensor, scale, shift) -> torch.Tensor:
    if scale is not None:
        x = x * scale
    return x if shift is None else x + shift


_PASS = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, _Reshape)
_DROPOUT = _PASS[2:-1]
_LINEAR, _CONV = (nn.Linear, _Linear), (nn.Conv2d, _Conv2d)
_MATRIX = _LINEAR + _CONV
_ELEMENTWISE = (Normalize, nn.BatchNorm1d, nn.BatchNorm2d, _Affine)
_AFFINE = _LINEAR + _CONV + _ELEMENTWISE + (nn.AvgPool2d,) + _PASS  # one input, affine
_WEIGHTED = _LINEAR + _CONV + (nn.AvgPool2d,)
_NONLINEAR = (nn.ReLU, nn.MaxPool2d)
_MODULES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, Normalize, nn.AvgPool2d, nn.ReLU,
            nn.MaxPool2d) + _PASS[:-1]
_SUPPORTED = ("Linear, Conv2d, BatchNorm (eval), ReLU, MaxPool2d (IBP only), AvgPool2d, flatten/view/reshape, "
              "Dropout/Identity (eval), Normalize, + - * / by constants, the sum of two branches")


@dataclass(frozen=True)
class Layer:
    """One operation of the model's graph, in topological order."""
    name: str  # module path, or fx node name for a function or method
    module: nn.Module  # the operation as a module (a function call gets an equivalent one)
    in_shape: tuple[int, ...]  # per example
    out_shape: tuple[int, ...]
    inputs: tuple[int, ...] = ()  # indices of the layers it reads (-1: the model's input); () the one before


def _inputs(layers: list[Layer], i: int) -> tuple[int, ...]:
    return layers[i].inputs or (i - 1,)


# ---------------------------------------------------------------- the model as a graph of layers

_OPS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.max_pool2d: "max_pool2d", torch.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
    F.linear: "linear", F.conv2d: "conv2d",
    torch.flatten: "reshape", torch.reshape: "reshape",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.divide: "div",
    torch.true_divide: "div", operator.neg: "neg", torch.neg: "neg", torch.negative: "neg",
}
_METHODS = {"relu": "relu", "relu_": "relu", "flatten": "reshape", "view": "reshape", "reshape": "reshape",
            "contiguous": "reshape", "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul",
            "mul_": "mul", "div": "div", "div_": "div", "neg": "neg"}
_META_METHODS = {"size", "dim", "ndimension"}  # what a bounded node may be asked without its values
_META_ATTRS = {"shape", "ndim", "dtype", "device"}
_SIGNATURES = {  # argument names of the functions whose arguments matter, in order
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"),
    "linear": ("input", "weight", "bias"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}


class _Tracer(fx.Tracer):
    """Keeps the supported modules (and advmnist's, e.g. `Normalize`, `WholeMapConv2d`) as leaves,
    and the tensors a forward makes on the fly to itself (fx would store them on the model)."""

    def __init__(self):
        super().__init__()
        self.stowed: dict[str, torch.Tensor] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _MODULES) or super().is_leaf_module(m, qualname)

    def create_arg(self, a):
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a not in self.tensor_attrs \
                and not any(a is b for b in self.root.buffers()):
            name = f"_bound_constant{len(self.stowed)}"
            self.stowed[name] = a
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


@dataclass
class _Traced:
    """A model's fx graph, cut to what its output needs, with every node sorted into: the input;
    "bounded" (depends on the input's values); "meta" (on its shape only: evaluated once per input
    shape); "const" (parameters, buffers and what is computed from them: evaluated per call)."""
    nodes: list[fx.Node]
    kind: dict[fx.Node, str]
    modules: dict[str, nn.Module]  # the leaf modules on bounded nodes, by path
    stowed: dict[str, torch.Tensor]  # tensors made by the forward itself (get_attr targets)
    shapes: dict = field(default_factory=dict)  # (shape, dtype, device) -> (node shapes, meta values)


_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    name = getattr(target, "__name__", str(target))
    for prefix, namespace in (("torch", torch), ("F", F), ("operator", operator)):
        if getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    return fx.node._get_qualified_name(target) if callable(target) else str(target)


def _where(node: fx.Node) -> str:
    return f"layer '{node.target}'" if node.op == "call_module" else f"'{_op_name(node)}' at node '{node.name}'"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _trace(model: nn.Module) -> _Traced:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
        raise BoundError(f"cannot trace {type(model).__name__} with torch.fx: {_first_line(exc)}") from None
    output = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise BoundError(f"{type(model).__name__} must return one tensor of logits to be bounded")
    needed, stack = set(), [output.args[0]]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    nodes = [n for n in graph.nodes if n in needed]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    kind: dict[fx.Node, str] = {}
    modules: dict[str, nn.Module] = {}
    for node in nodes:
        inputs = {kind[n] for n in node.all_input_nodes}
        if node.op == "placeholder":
            if node is not placeholders[0] and not node.args:
                raise BoundError(f"cannot bound {type(model).__name__}: its forward takes more than one input")
            kind[node] = "input" if node is placeholders[0] else "const"
        elif node.op == "get_attr":
            kind[node] = "const"
        elif "input" in inputs or "bounded" in inputs:
            meta = (node.op == "call_method" and node.target in _META_METHODS) or (
                node.target is getattr and node.args[1] in _META_ATTRS)
            kind[node] = "meta" if meta else "bounded"
            if not meta:
                _check_supported(model, node, kind, modules)
        else:
            kind[node] = "meta" if inputs == {"meta"} else "const"
    if kind[output.args[0]] != "bounded":
        raise BoundError(f"the output of {type(model).__name__} does not go through any operation of its input")
    return _Traced(nodes, kind, modules, tracer.stowed)


def _check_supported(model: nn.Module, node: fx.Node, kind: dict, modules: dict) -> None:
    """BoundError for a node the bounds cannot handle; structural checks only (the mode is per call)."""
    bounded = [n for n in node.all_input_nodes if kind[n] in ("input", "bounded")]
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        where = f"layer '{node.target}' ({type(m).__name__})"
        if not isinstance(m, _MODULES):
            raise BoundError(f"cannot bound {where}; supported: {_SUPPORTED}")
        if len(node.args) != 1 or node.kwargs:
            raise BoundError(f"cannot bound {where}: called with more than one argument")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise BoundError(f"cannot bound layer '{node.target}': padding mode {m.padding_mode!r} (only zeros)")
        if isinstance(m, nn.MaxPool2d) and (m.dilation not in (1, (1, 1)) or m.return_indices):
            raise BoundError(f"cannot bound layer '{node.target}': dilated max pooling or return_indices")
        modules[node.target] = m
        return
    op = (_METHODS.get(node.target) if node.op == "call_method" else
          _OPS.get(node.target) if node.op == "call_function" else None)
    where = _where(node)
    if op is None:
        raise BoundError(f"cannot bound {where}; supported: {_SUPPORTED}")
    args = list(node.args[:2])
    both = len(args) == 2 and all(a in bounded for a in args)
    if op in ("add", "sub") and both:
        return  # a sum of two branches (or of one branch with itself)
    if op in ("add", "sub", "mul") and len(bounded) == 1 and bounded[0] in args and not both:
        return  # a constant added, subtracted or multiplied, on either side
    first = node.args[0] if node.args else node.kwargs.get("input")
    if len(bounded) != 1 or first is not bounded[0] or both:
        raise BoundError(f"cannot bound {where}: only its first argument may depend on the input "
                         f"(a product, quotient or argument of bounded values is not affine)")


def _fetch(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run(node: fx.Node, env: dict, model: nn.Module, traced: _Traced):
    """One node of the graph, on the values in env (the model's own forward, node by node)."""
    if node.op == "placeholder":
        return node.args[0]
    if node.op == "get_attr":
        return traced.stowed[node.target] if node.target in traced.stowed else _fetch(model, node.target)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _traced(model: nn.Module) -> _Traced:
    """The model's graph, traced once while the model lives (again if one of its layers was replaced)."""
    if not isinstance(model, nn.Module):
        raise BoundError(f"bounds need an nn.Module, got {type(model).__name__}")
    traced = _TRACED.get(model)
    if traced is None or any(_fetch(model, path) is not m for path, m in traced.modules.items()):
        traced = _TRACED[model] = _trace(model)
    return traced


def _shapes(traced: _Traced, model: nn.Module, example: torch.Tensor):
    """Per-example output shapes of the bounded nodes and the values of the meta nodes, from one
    forward pass on two examples of x's shape (two: an operation that mixes the batch shows)."""
    key = (tuple(example.shape[1:]), example.dtype, example.device)
    if key not in traced.shapes:
        env: dict = {}
        probe = torch.zeros(2, *key[0], dtype=example.dtype, device=example.device)
        with torch.no_grad(), eval_mode(model):  # the probe moves no BatchNorm's running statistics
            for node in traced.nodes:
                env[node] = probe if traced.kind[node] == "input" else _run(node, env, model, traced)
                value = env[node]
                if traced.kind[node] == "bounded" and (not isinstance(value, torch.Tensor) or value.dim() == 0
                                                       or len(value) != 2):
                    raise BoundError(f"cannot bound {_where(node)}: it does not keep the batch dimension first")
        traced.shapes[key] = ({n: tuple(v.shape[1:]) for n, v in env.items() if traced.kind[n] in ("input", "bounded")},
                              {n: v for n, v in env.items() if traced.kind[n] == "meta"})
    return traced.shapes[key]


def bound_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[Layer]:
    """The model as a list of supported layers in topological order, with their shapes and inputs
    (a Sequential gives a chain); BoundError for anything else."""
    traced = _traced(model)
    for path, m in traced.modules.items():
        if m.training and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d) + _DROPOUT) and m not in _TRAINING:
            raise BoundError(f"layer '{path}' ({type(m).__name__}) is in training mode; call model.eval() first")
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_var is None and m not in _TRAINING:
            raise BoundError(f"layer '{path}' ({type(m).__name__}) normalises by batch statistics (no running ones)")
    if example is None:
        example = torch.zeros(1, 1, 28, 28)
    shapes, env = _shapes(traced, model, example)
    env = dict(env)
    index: dict[fx.Node, int] = {}
    layers: list[Layer] = []
    for node in traced.nodes:
        kind = traced.kind[node]
        if kind == "input":
            index[node] = -1
        elif kind == "const":
            env[node] = _run(node, env, model, traced)
        elif kind == "bounded":
            module, inputs = _layer(node, traced, env, shapes)
            in_shape = shapes[inputs[0]]
            layers.append(Layer(node.target if node.op == "call_module" else node.name, module, in_shape,
                                shapes[node], tuple(index[n] for n in inputs)))
            index[node] = len(layers) - 1
    return layers


def _bind(op: str, node: fx.Node, env: dict) -> dict:
    names = _SIGNATURES[op]
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return {k: (env[v] if isinstance(v, fx.Node) and k != "input" else v) for k, v in args.items()}


def _constant(value, shape: tuple[int, ...], node: fx.Node):
    """A constant operand as a number or a tensor that broadcasts to the per-example shape."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    while value.dim() > len(shape):
        if value.shape[0] != 1:
            raise BoundError(f"cannot bound {_where(node)}: its constant operand has a batch dimension")
        value = value[0]
    if tuple(torch.broadcast_shapes(value.shape, shape)) != shape:
        raise BoundError(f"cannot bound {_where(node)}: its constant operand broadcasts the input to another shape")
    return value


def _layer(node: fx.Node, traced: _Traced, env: dict, shapes: dict) -> tuple[nn.Module, list[fx.Node]]:
    """The module and the bounded input nodes of one bounded node."""
    bounded = [n for n in node.all_input_nodes if traced.kind[n] in ("input", "bounded")]
    if node.op == "call_module":
        return traced.modules[node.target], bounded
    op = _METHODS[node.target] if node.op == "call_method" else _OPS[node.target]
    where = _where(node)
    if op == "relu":
        return nn.ReLU(), bounded
    if op == "reshape":
        return _Reshape(shapes[node]), bounded
    if op == "max_pool2d":
        a = _bind(op, node, env)
        if a.get("dilation", 1) not in (1, (1, 1)) or a.get("return_indices"):
            raise BoundError(f"cannot bound {where}: dilated max pooling or return_indices")
        a.pop("dilation", None), a.pop("return_indices", None), a.pop("input")
        return nn.MaxPool2d(**a), bounded
    if op == "avg_pool2d":
        a = _bind(op, node, env)
        a.pop("input")
        return nn.AvgPool2d(**a), bounded
    if op == "linear":
        a = _bind(op, node, env)
        return _Linear(a["weight"], a.get("bias")), bounded
    if op == "conv2d":
        a = _bind(op, node, env)
        return _Conv2d(a["weight"], a.get("bias"), a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1),
                       a.get("groups", 1)), bounded
    if op == "neg":
        return _Affine(-1.0, None), bounded
    kwargs = dict(node.kwargs)
    alpha = kwargs.pop("alpha", 1) if op in ("add", "sub") else 1
    if op == "div" and kwargs.pop("rounding_mode", None) is not None:
        raise BoundError(f"cannot bound {where}: rounding division")
    if kwargs or len(node.args) != 2:
        raise BoundError(f"cannot bound {where}: unexpected arguments {sorted(kwargs)}")
    a, b = node.args
    weight = float(alpha) * (-1.0 if op == "sub" else 1.0)
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and traced.kind.get(a) in ("input", "bounded") \
            and traced.kind.get(b) in ("input", "bounded"):
        if shapes[a] != shapes[b]:
            raise BoundError(f"cannot bound {where}: it adds branches of shapes {shapes[a]} and {shapes[b]}")
        return _Sum(weight), [a, b]
    value = (lambda v: env[v] if isinstance(v, fx.Node) else v)
    shape = shapes[node]
    if op in ("add", "sub"):
        if a is bounded[0]:  # x + weight * c
            return _Affine(None, _constant(value(b), shape, node) * weight), bounded
        return _Affine(weight, _constant(value(a), shape, node)), bounded  # c + weight * x
    c = _constant(value(b if a is bounded[0] else a), shape, node)
    return _Affine(c if op == "mul" else 1.0 / c, None), bounded


# ---------------------------------------------------------------- interval bound propagation


def input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linf ball around x intersected with the pixel box [0, 1]."""
    if not math.isfinite(eps) or eps < 0:
        raise BoundError(f"eps must be a finite number >= 0, got {eps}")
    return (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)


_TRAINING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its batch's (mean, var), or None


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Within it, bounds of a model in training mode normalise each BatchNorm by the mean and variance
    of the batch its last forward pass saw, as that pass did: the clean and the bound loss of certified
    training then see one network (Shi et al. 2021, "Fast Certified Robust Training with Short Warmup").
    Dropout is bounded as the identity, as in eval mode: the bounds are those of the net that is certified."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training]
    drops = [m for m in model.modules() if isinstance(m, _DROPOUT) and m.training]

    def record(m: nn.Module, args: tuple) -> None:
        if not m.training:  # the bounds' own shape probe
            return
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        _TRAINING[m] = (x.mean(dims), x.var(dims, unbiased=False))

    handles = [m.register_forward_pre_hook(record) for m in norms]
    for m in norms + drops:
        _TRAINING[m] = None
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in norms + drops:
            _TRAINING.pop(m, None)


def _scale_shift(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize or BatchNorm as per-channel (scale, shift)."""
    if isinstance(m, Normalize):
        return 1.0 / m.std, -m.mean / m.std
    mean, var = m.running_mean, m.running_var
    if m.training and m in _TRAINING:
        if _TRAINING[m] is None:
            raise BoundError("a BatchNorm in training mode is bounded before any batch passed through it")
        mean, var = _TRAINING[m]
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    return scale, shift


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(-1, *([1] * (ndim - 2))) if t.dim() == 1 and ndim > 2 else t


def _conv_args(m: nn.Module) -> dict:
    padding = m.padding
    if isinstance(padding, str):  # "valid" or "same" (stride 1), as numbers for the transpose
        total = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(m.dilation, m.weight.shape[2:])]
        if any(t % 2 for t in total):
            raise BoundError("cannot bound a convolution with padding 'same' that pads one side more")
        padding = tuple(t // 2 for t in total)
    return dict(stride=m.stride, padding=padding, dilation=m.dilation, groups=m.groups)


def interval(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise bounds of layer(z) over lo <= z <= hi (one IBP step, one-input layers)."""
    if isinstance(layer, _MATRIX):
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        if isinstance(layer, _LINEAR):
            m, r = F.linear(mid, layer.weight, layer.bias), F.linear(rad, layer.weight.abs())
        else:
            kw = _conv_args(layer)
            m, r = F.conv2d(mid, layer.weight, layer.bias, **kw), F.conv2d(rad, layer.weight.abs(), None, **kw)
        return m - r, m + r
    if isinstance(layer, _ELEMENTWISE):
        if isinstance(layer, _Affine):
            a, b = _scaled(lo, layer.scale, layer.shift), _scaled(hi, layer.scale, layer.shift)
            if layer.scale is None:
                return a, b
        else:
            scale, shift = _scale_shift(layer)
            scale, shift = _channel_view(scale, lo.dim()), _channel_view(shift, lo.dim())
            a, b = lo * scale + shift, hi * scale + shift
        return torch.minimum(a, b), torch.maximum(a, b)
    if isinstance(layer, _DROPOUT):  # the identity in eval mode, and so bounded in training (`batch_statistics`)
        return lo, hi
    # ReLU, max and average pooling, reshapes: monotone, so the ends map to the ends
    return layer(lo), layer(hi)


def _ibp_step(layers: list[Layer], i: int, boxes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    layer, inputs = layers[i], _inputs(layers, i)
    if isinstance(layer.module, _Sum):
        (alo, ahi), (blo, bhi) = boxes[inputs[0]], boxes[inputs[1]]
        w = layer.module.weight
        if w == 1.0:
            return alo + blo, ahi + bhi
        return (alo + w * blo, ahi + w * bhi) if w >= 0 else (alo + w * bhi, ahi + w * blo)
    return interval(layer.module, *boxes[inputs[0]])


def _last_uses(layers: list[Layer]) -> dict[int, int]:
    return {j: i for i in range(len(layers)) for j in _inputs(layers, i)}


def _ancestors(layers: list[Layer], tops) -> set[int]:
    """The layers the given ones are computed from, themselves included (not the input, -1)."""
    seen, stack = set(), [t for t in tops if t >= 0]
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(j for j in _inputs(layers, i) if j >= 0)
    return seen


def margin_spec(y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """C (N, classes-1, classes) with rows e_y - e_j for j != y: C @ logits are the margins."""
    eye = torch.eye(classes, device=y.device)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (N, classes, classes); row j is e_y - e_j
    others = torch.arange(classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)
    return rows[others].view(len(y), classes - 1, classes)


def _spec(layers: list[Layer], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = layers[-1].out_shape
    if len(out) != 1:
        raise BoundError(f"the model's output must be (N, classes) logits, got per-example shape {out}")
    return margin_spec(y.to(x.device), out[0]).to(x.dtype)


# ---------------------------------------------------------------- backwards: linear bounds


def _transpose(layer: Layer, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam A, lam . c) for the affine layer f(z) = A z + c and coefficients lam (B, S, *out_shape)."""
    m, (b, s) = layer.module, lam.shape[:2]
    if isinstance(m, _PASS):
        return lam.reshape(b, s, *layer.in_shape), lam.new_zeros(b, s)
    if isinstance(m, _LINEAR):
        const = lam.new_zeros(b, s) if m.bias is None else lam @ m.bias
        if const.dim() > 2:  # a Linear on more than one dimension per example
            const = const.flatten(2).sum(-1)
        return lam @ m.weight, const
    if isinstance(m, _CONV):
        flat = lam.reshape(b * s, *layer.out_shape)
        back = torch.nn.grad.conv2d_input((b * s, *layer.in_shape), m.weight, flat, **_conv_args(m))
        const = (lam.sum((3, 4)) @ m.bias) if m.bias is not None else lam.new_zeros(b, s)
        return back.view(b, s, *layer.in_shape), const
    if isinstance(m, _Affine):
        const = lam.new_zeros(b, s) if m.shift is None else (lam * m.shift).flatten(2).sum(-1)
        return (lam if m.scale is None else lam * m.scale), const
    if isinstance(m, _ELEMENTWISE):
        scale, shift = _scale_shift(m)
        if scale.dim() == 0:  # Normalize: one mean and std
            return lam * scale, lam.flatten(2).sum(-1) * shift
        per_channel = lam.flatten(3).sum(-1) if lam.dim() > 3 else lam
        return lam * scale.view(-1, *([1] * (lam.dim() - 3))), per_channel @ shift
    # average pooling: linear, no constant; its transpose by autograd
    z = torch.zeros(b * s, *layer.in_shape, dtype=lam.dtype, device=lam.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(m(z), z, grad_outputs=lam.reshape(b * s, *layer.out_shape))
    return g.view(b, s, *layer.in_shape), lam.new_zeros(b, s)


def _relu_lines(lo: torch.Tensor, hi: torch.Tensor):
    """CROWN's relaxation of relu on [lo, hi]: lower slope, upper slope, upper intercept."""
    active, unstable = lo >= 0, (lo < 0) & (hi > 0)
    width = (hi - lo).clamp_min(1e-12)
    upper = torch.where(unstable, hi / width, active.to(lo.dtype))
    intercept = torch.where(unstable, -upper * lo, torch.zeros_like(lo))
    lower = torch.where(unstable, (hi > -lo).to(lo.dtype), active.to(lo.dtype))
    return lower, upper, intercept


def _concretize(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min of lam . z over the box lo <= z <= hi, per (example, spec)."""
    mid, rad = ((hi + lo) / 2).flatten(1).unsqueeze(2), ((hi - lo) / 2).flatten(1).unsqueeze(2)
    flat = lam.flatten(2)
    return (flat @ mid).squeeze(2) - (flat.abs() @ rad).squeeze(2)


def _back(layers: list[Layer], pending: dict, const: torch.Tensor, relus: dict | None,
          frontier: dict | None = None) -> tuple[dict, torch.Tensor]:
    """Moves linear coefficients backwards, in reverse topological order: `pending` maps a layer to
    lam (B, S, *its out_shape), the bound so far being sum of lam . output + const. A layer's
    coefficients go to its inputs (a sum sends them to both; a layer read twice adds up what it
    gets); ReLUs are relaxed by their `relus` lines, or left pending when relus is None; at a
    `frontier` layer the coefficients are concretised on its box. Returns what reached the input
    (-1) or was left pending, and the constant."""
    frontier = frontier or {}
    for i in range(max(pending), -1, -1):
        if i not in pending:
            continue
        layer = layers[i]
        m = layer.module
        if i in frontier:
            const = const + _concretize(pending.pop(i), *frontier[i])
            continue
        if isinstance(m, _NONLINEAR) and relus is None:
            continue
        lam = pending.pop(i)
        if isinstance(m, nn.MaxPool2d):
            raise BoundError(f"CROWN does not handle max pooling (layer '{layer.name}'); use IBP for this model")
        if isinstance(m, nn.ReLU):
            lower, upper, intercept = relus[i]
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            const = const + (neg * intercept.unsqueeze(1)).flatten(2).sum(-1)
            sent = (pos * lower.unsqueeze(1) + neg * upper.unsqueeze(1),)
        elif isinstance(m, _Sum):
            sent = (lam, lam if m.weight == 1.0 else lam * m.weight)
        else:
            lam, c = _transpose(layer, lam)
            const, sent = const + c, (lam,)
        for j, part in zip(_inputs(layers, i), sent):
            pending[j] = pending[j] + part if j in pending else part
    return pending, const


def _bound(layers: list[Layer], pending: dict, const: torch.Tensor, relus: dict, box,
           frontier: dict | None = None) -> torch.Tensor:
    """Lower bound over the input box of sum of pending lam . (layer output) + const."""
    pending, const = _back(layers, pending, const, relus, frontier)
    return const + _concretize(pending[-1], *box) if -1 in pending else const


def ibp_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """IBP lower bounds (N, classes-1) on logit_y - logit_j over the eps-ball, margins folded into the tail.

    Differentiable in the weights (certified training, `train --adv ibp`); wrap in no_grad to evaluate.
    """
    layers = bound_layers(model, x)
    box = input_box(x, eps)
    spec = _spec(layers, x, y)
    frontier, stack, seen = set(), [len(layers) - 1], set()  # the nonlinear layers the affine tail reads
    while stack:
        i = stack.pop()
        if i in seen or i < 0:
            continue
        seen.add(i)
        if isinstance(layers[i].module, _NONLINEAR):
            frontier.add(i)
        else:
            stack.extend(_inputs(layers, i))
    boxes, last = {-1: box}, _last_uses(layers)
    for i in sorted(_ancestors(layers, frontier)):
        boxes[i] = _ibp_step(layers, i, boxes)
        for j in _inputs(layers, i):
            if last[j] == i and j not in frontier and j in boxes:
                del boxes[j]
    return _bound(layers, {len(layers) - 1: spec}, spec.new_zeros(spec.shape[:2]), {}, box,
                  {i: boxes[i] for i in frontier})


# ---------------------------------------------------------------- CROWN


def _exact_ibp(layers: list[Layer], top: int) -> bool:
    """True when layers[top] is a chain of affine layers with at most one weighted one from the
    input: IBP is exact there."""
    weighted, i = 0, top
    while i >= 0:
        m = layers[i].module
        if not isinstance(m, _AFFINE):
            return False
        weighted += isinstance(m, _WEIGHTED)
        i = _inputs(layers, i)[0]
    return weighted <= 1


def _preactivation_nodes(layers: list[Layer]) -> dict[int, int]:
    """ReLU layer -> the layer whose output it reads (-1: the input)."""
    return {i: _inputs(layers, i)[0] for i, l in enumerate(layers) if isinstance(l.module, nn.ReLU)}


def _needs_crown(layers: list[Layer], j: int) -> bool:
    """Whether CROWN can tighten IBP's bounds of layers[j]'s output: not where IBP is exact, nor on
    a ReLU's output (IBP's relu of the bounds it read is exact there too)."""
    return j >= 0 and not isinstance(layers[j].module, _NONLINEAR) and not _exact_ibp(layers, j)


def crown_cost(layers: list[Layer]) -> int:
    """Elements of coefficient tensors, per example, that full CROWN builds (its memory and time)."""
    total = 0
    for j in sorted(set(_preactivation_nodes(layers).values())):
        if _needs_crown(layers, j):
            below = sum(len(_inputs(layers, a)) * math.prod(layers[a].in_shape) for a in _ancestors(layers, [j]))
            total += math.prod(layers[j].out_shape) * below
    return total


def crown_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                  intermediate: str = "crown", memory: int = 2 ** 27) -> torch.Tensor:
    """CROWN lower bounds (N, classes-1) on logit_y - logit_j over the eps-ball.

    `intermediate="crown"` bounds every pre-activation by CROWN too (tighter, costs `crown_cost`
    coefficient elements per example, built in chunks of at most `memory` elements);
    `"ibp"` takes IBP's pre-activation bounds (CROWN-IBP's bound, Zhang et al. 2020: one backward pass).
    """
    with torch.no_grad():
        layers = bound_layers(model, x)
        box = input_box(x, eps)
        pre = _preactivations(layers, box, intermediate, memory)
        relus = {i: _relu_lines(lo, hi) for i, (lo, hi) in pre.items()}
        spec = _spec(layers, x, y)
        return _bound(layers, {len(layers) - 1: spec}, spec.new_zeros(spec.shape[:2]), relus, box)


def alpha_crown_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 40,
                       lr: float = 0.1, memory: int = 2 ** 27) -> torch.Tensor:
    """alpha-CROWN lower bounds (N, classes-1) on logit_y - logit_j over the eps-ball (Xu et al. 2021,
    "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and Massively Parallel
    Incomplete Verifiers").

    CROWN may relax an unstable ReLU from below by any line through the origin with a slope in [0, 1];
    each slope gives a valid bound, so the slopes can be chosen by gradient ascent on the bound itself,
    one set per example and margin (Adam, `steps` steps, projected onto [0, 1]). Every step's bound is
    a certificate and each margin keeps its best; the first is CROWN's, so the result is never looser
    than `crown_margins`. The pre-activation bounds are full CROWN's and are not re-optimised. Costs
    what `crown_margins` does plus `steps` backward passes per margin: meant for the few images
    cheaper bounds leave open (`advmnist evaluate --robust --bound alpha-crown`).
    """
    if steps < 0:
        raise BoundError(f"alpha-CROWN steps must be >= 0, got {steps}")
    layers, rows, pre, box = margin_rows(model, x, y, eps, memory)
    best, _ = slope_bound(layers, pre, rows, box, steps=steps, lr=lr)
    return best.view(len(x), -1)


def margin_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, memory: int = 2 ** 27):
    """The layers and, one row per (example, margin), the margin's spec (R, 1, classes), full CROWN's
    pre-activation bounds of every ReLU and the input box: what `slope_bound` takes, so that each
    margin gets its own slopes (alpha-CROWN) or its own parts (`branching.branch_margins`)."""
    layers = bound_layers(model, x)
    box = input_box(x, eps)
    with torch.no_grad():
        pre = _preactivations(layers, box, "crown", memory)
    spec = _spec(layers, x, y)
    k = spec.shape[1]
    each = {i: (lo.repeat_interleave(k, 0), hi.repeat_interleave(k, 0)) for i, (lo, hi) in pre.items()}
    return layers, spec.reshape(-1, 1, spec.shape[2]), each, (box[0].repeat_interleave(k, 0),
                                                             box[1].repeat_interleave(k, 0))


def slope_bound(layers: list[Layer], pre: dict, rows: torch.Tensor, box, *, steps: int = 40, lr: float = 0.1,
                scores: bool = False, splits: dict | None = None) -> tuple[torch.Tensor, dict | None]:
    """alpha-CROWN's inner loop: lower bounds (R,) of rows . logits, rows (R, 1, classes), over the
    input box (R, ...), each row with its own lower ReLU slopes, optimised from CROWN's. `pre` maps
    each ReLU layer to its pre-activation bounds per row. With `scores`, also what each unstable
    ReLU's relaxation costs the final bound (the upper line's intercept times the coefficient that
    meets it, the intercept score of BaBSR, Bunel et al. 2020), per ReLU layer (R, ...).

    `splits` maps ReLU layers to signs (R, ...): +1 where the row's part of the ball has that
    ReLU's input >= 0, -1 where <= 0, 0 elsewhere. Each split adds beta * (its input) with the sign
    that makes the term <= 0 on the part, beta >= 0 optimised with the slopes (beta-CROWN, Wang et
    al. 2021): the bound then holds on the part, and the split's constraint tightens it."""
    r = len(rows)
    lines, slopes, betas = {}, {}, {}
    for i, (lo, hi) in pre.items():
        lower, upper, intercept = _relu_lines(lo, hi)
        lines[i] = (lower, upper, intercept.requires_grad_(scores), (lo < 0) & (hi > 0))
        slopes[i] = lower.clone().requires_grad_(True)
    reads = _preactivation_nodes(layers)
    for i, sign in (splits or {}).items():
        if bool((sign != 0).any()):
            betas[i] = torch.zeros(sign.shape, dtype=rows.dtype, device=rows.device, requires_grad=True)
    params = list(slopes.values()) + list(betas.values())
    opt = torch.optim.Adam(params, lr=lr)
    best = rows.new_full((r,), -math.inf)
    for step in range(steps + 1):
        with torch.enable_grad():
            relus = {i: (torch.where(unstable, slopes[i], lower), upper, intercept)
                     for i, (lower, upper, intercept, unstable) in lines.items()}
            pending = {len(layers) - 1: rows}
            for i, beta in betas.items():  # -beta * sign * z: <= 0 wherever the part's split holds
                term = (-beta * splits[i].to(rows.dtype)).unsqueeze(1)
                pending[reads[i]] = pending[reads[i]] + term if reads[i] in pending else term
            bound = _bound(layers, pending, rows.new_zeros(r, 1), relus, box)[:, 0]
        best = torch.maximum(best, bound.detach())
        if step == steps or not params or bool((best > TOLERANCE).all()):
            break
        grads = torch.autograd.grad(-bound.sum(), params, allow_unused=True)
        for s, g in zip(params, grads):  # autograd.grad, not backward: the weights' .grad stay untouched
            s.grad = torch.zeros_like(s) if g is None else g
        opt.step()
        with torch.no_grad():
            for s in slopes.values():
                s.clamp_(0.0, 1.0)
            for b in betas.values():
                b.clamp_(min=0.0)
    if not scores or not lines:
        return best, None
    meets = torch.autograd.grad(bound.sum(), [line[2] for line in lines.values()], allow_unused=True)
    cost = {i: torch.zeros_like(line[2]) if g is None else -(g * line[2]).detach()
            for (i, line), g in zip(lines.items(), meets)}
    return best, cost


def preactivation_bounds(model: nn.Module, x: torch.Tensor, eps: float, *, intermediate: str = "crown",
                         memory: int = 2 ** 27) -> tuple[list[Layer], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """The layers and, for every ReLU (by layer index), elementwise bounds of its input over the ball."""
    with torch.no_grad():
        layers = bound_layers(model, x)
        return layers, _preactivations(layers, input_box(x, eps), intermediate, memory)


def _preactivations(layers: list[Layer], box, intermediate: str, memory: int) -> dict:
    if intermediate not in ("crown", "ibp"):
        raise BoundError(f"intermediate bounds are 'crown' or 'ibp', not {intermediate!r}")
    for layer in layers:
        if isinstance(layer.module, nn.MaxPool2d):
            raise BoundError(f"CROWN does not handle max pooling (layer '{layer.name}'); use IBP for this model")
    reads = _preactivation_nodes(layers)
    tighten = {j for j in reads.values() if intermediate == "crown" and _needs_crown(layers, j)}
    keep = set(reads.values())
    pre: dict = {}
    relus: dict = {}
    boxes, last = {-1: box}, _last_uses(layers)
    for i in sorted(_ancestors(layers, reads)):
        lo, hi = _ibp_step(layers, i, boxes)
        if i in tighten:
            c_lo, c_hi = _neuron_bounds(layers, i, relus, box, memory)
            lo, hi = torch.maximum(lo, c_lo), torch.minimum(hi, c_hi)
        boxes[i] = lo, hi
        if i in reads:
            pre[i] = boxes[reads[i]]
            relus[i] = _relu_lines(*pre[i])
        for j in _inputs(layers, i):
            if last[j] == i and j not in keep and j in boxes:
                del boxes[j]
    return pre


def _neuron_bounds(layers: list[Layer], top: int, relus: dict, box, memory: int):
    """CROWN bounds of every neuron of layers[top]'s output, in chunks of neurons.

    The coefficients start as the identity and stay the same for every example until a ReLU: that
    stretch (usually the costliest transpose) is computed once, with batch dimension 1, and shared
    by the lower and the upper bound.
    """
    shape = layers[top].out_shape
    n, width = box[0].shape[0], math.prod(shape)
    widest = max(math.prod(layers[a].in_shape) for a in _ancestors(layers, [top]))
    chunk = max(1, memory // max(1, n * max(widest, width)))
    eye = torch.eye(width, dtype=box[0].dtype, device=box[0].device)
    lows, highs = [], []
    for start in range(0, width, chunk):
        lam = eye[start:start + chunk].view(1, -1, *shape)
        shared, const = _back(layers, {top: lam}, lam.new_zeros(lam.shape[:2]), None)
        lows.append(_bound(layers, dict(shared), const, relus, box).expand(n, -1))
        highs.append(-_bound(layers, {j: -v for j, v in shared.items()}, -const, relus, box).expand(n, -1))
    return torch.cat(lows, 1).view(n, *shape), torch.cat(highs, 1).view(n, *shape)


@contextlib.contextmanager
def full_precision():
    """No TF32 in CUDA matmuls and convolutions while bounds are computed: TF32 keeps 10 bits of
    mantissa, and its rounding can exceed the TOLERANCE a certificate relies on."""
    cuda, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = cuda, cudnn


def certified_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                      method: str = "auto", batch_size: int = 500, budget: int = 10 ** 6) -> tuple[torch.Tensor, str]:
    """The best available lower margin bounds (N, 9) and the method that gave them.

    `method`: "ibp", "crown", "crown-ibp" or "auto" (IBP, and CROWN where the model has no max
    pooling, with CROWN intermediate bounds when `crown_cost` is below `budget` per example (only
    tiny nets: full CROWN costs hundreds of forward passes on the zoo's, see benchmarks/results.md), else
    IBP's; the elementwise best of the bounds computed).
    """
    layers = bound_layers(model, x)
    has_pool = any(isinstance(l.module, nn.MaxPool2d) for l in layers)
    if method == "auto":
        methods = ["ibp"] if has_pool else ["ibp", "crown" if crown_cost(layers) <= budget else "crown-ibp"]
    elif method in ("ibp", "crown", "crown-ibp"):
        methods = [method]
    else:
        raise BoundError(f"unknown bound method {method!r}; use auto, ibp, crown or crown-ibp")
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.no_grad(), full_precision():
            bounds = [ibp_margins(model, xb, yb, eps) if m == "ibp" else
                      crown_margins(model, xb, yb, eps, intermediate="crown" if m == "crown" else "ibp")
                      for m in methods]
        out.append(torch.stack(bounds).max(0).values)
    return torch.cat(out), "+".join(methods)


def certified(margins: torch.Tensor, tolerance: float = TOLERANCE) -> torch.Tensor:
    """Which examples the margin bounds certify (every lower bound above the float tolerance)."""
    return margins.min(1).values > tolerance
