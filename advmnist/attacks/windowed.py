"""Logits of images that differ from known ones only inside one small window.

Square's candidates change a window of a few pixels, the same window for every image of a query,
and most of its 5,000 queries use windows of 1 to 3 pixels. A convolution's output changes only
where its receptive field meets the window, so each layer is recomputed only on the rows and columns
the window reaches, from the cached activations of the current images. A convolution is linear: where
the changed region of its input is smaller than its kernel, its new outputs are the cached ones plus
the change times a matrix that maps that region to the outputs it reaches (built once per shape of
window, from the weights), one matrix product instead of a convolution over the whole patch, about
a quarter of the multiplies. The first fully connected layer likewise adds W[:, window] times the
change of its input instead of multiplying its whole input. On `strided` a 2x2 window touches 3x3
of conv2's 7x7 outputs.

These updates accumulate rounding over accepted changes, so every cached activation is recomputed
from the current images every `REFRESH` accepts; callers confirm a result they rely on (an example broken) with the model's own forward
pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fast import _DROPOUT, _flat_layers

REFRESH = 100  # accepted updates between exact recomputations of the cached activations


def _pointwise(m: nn.Module) -> bool:
    from ..models import Normalize  # a leaf module with no dependencies

    if isinstance(m, (nn.ReLU, Normalize) + _DROPOUT):
        return True
    return isinstance(m, nn.BatchNorm2d) and not m.training and m.running_mean is not None


def _local(m: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """(kernel, stride, padding) per axis of a layer whose outputs each read one window of its input."""
    pair = nn.modules.utils._pair
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or pair(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return pair(m.kernel_size), pair(m.stride), pair(m.padding)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if m.ceil_mode or (isinstance(m, nn.MaxPool2d) and pair(m.dilation) != (1, 1)):
            return None
        if isinstance(m, nn.AvgPool2d) and (pair(m.padding) != (0, 0) or m.divisor_override is not None):
            return None
        k = pair(m.kernel_size)
        return k, pair(m.stride if m.stride is not None else k), pair(m.padding)
    return None


def _cl(t: torch.Tensor) -> torch.Tensor:
    """Channels-last: oneDNN's convolutions on small maps run several times faster in it."""
    return t.contiguous(memory_format=torch.channels_last)


def _span(lo: int, hi: int, size_in: int, size_out: int, k: int, s: int, p: int) -> tuple[int, int, int, int]:
    """Outputs [o_lo, o_hi) whose windows meet inputs [lo, hi), and the inputs [i_lo, i_hi) they read."""
    o_lo = max(0, -((-(lo + p - k + 1)) // s))
    o_hi = min(size_out, (hi - 1 + p) // s + 1)
    return o_lo, o_hi, o_lo * s - p, (o_hi - 1) * s - p + k


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as (N, H * W * C), in the channels-last order the caches are stored in."""
    return t.permute(0, 2, 3, 1).reshape(len(t), -1)


def _change_map(weight: torch.Tensor, rows: int, cols: int, top: int, left: int, out_rows: int, out_cols: int,
                stride: tuple[int, int]) -> torch.Tensor:
    """(rows * cols * C_in, out_rows * out_cols * C_out), channels last: what a change of the input
    on a rows x cols region adds to the outputs that read it, the region starting `top`, `left` into
    the input span of the first of those outputs. The conv (no bias) of one-hot inputs."""
    c_in, (kh, kw) = weight.shape[1], weight.shape[-2:]
    k = c_in * rows * cols
    basis = weight.new_zeros(k, c_in, (out_rows - 1) * stride[0] + kh, (out_cols - 1) * stride[1] + kw)
    eye = torch.eye(k, dtype=weight.dtype, device=weight.device).view(k, rows, cols, c_in)
    basis[:, :, top:top + rows, left:left + cols] = eye.permute(0, 3, 1, 2)
    return _flat(F.conv2d(basis, weight, stride=stride))


class WindowedLogits:
    """Cached activations of a batch, and the logits of that batch changed inside one window.

    `start(x)` computes and caches; `propose(patch, row, col)` returns the logits of the batch with
    `patch` written at (row, col), and a proposal; `accept(proposal, mask)` makes the proposal the
    cached state of the examples in `mask`; `keep(mask)` drops the others. Build with `build`, which
    returns None for a model it cannot follow (then use whole forward passes).
    """

    def __init__(self, spatial: list[tuple[nn.Module, tuple | None]], dense: tuple | None, tail: list[nn.Module]):
        self.spatial, self.tail = spatial, tail
        self.w, self.b, self.z_shape = dense if dense is not None else (None, None, None)
        self.acts: list[torch.Tensor] = []
        self.z: torch.Tensor | None = None
        self.accepted = 0
        self.conv_maps: dict[tuple, torch.Tensor] = {}  # per layer and shape of window (`_change_map`)
        self.dense_maps: dict[tuple, torch.Tensor] = {}  # W[:, region] of the first dense layer, per region

    @classmethod
    def build(cls, model: nn.Module, example: torch.Tensor) -> WindowedLogits | None:
        """Split the model into layers that read windows, a first dense layer (a Linear after Flatten,
        or a conv whose kernel covers its whole input map) and the rest; None if it has other layers."""
        layers = _flat_layers(model)
        if layers is None or any(m.training for m in layers):
            return None
        spatial, h = [], example[:1]
        with torch.no_grad():
            for i, m in enumerate(layers):
                if isinstance(m, nn.Flatten):
                    if m.start_dim != 1 or m.end_dim != -1:
                        return None
                    rest = layers[i + 1:]
                    if rest and isinstance(rest[0], nn.Linear):
                        return cls(spatial, (rest[0].weight, rest[0].bias, (rest[0].out_features,)), rest[1:])
                    return cls(spatial, None, rest)
                geometry = _local(m)
                if (isinstance(m, nn.Conv2d) and geometry is not None and geometry[2] == (0, 0)
                        and tuple(h.shape[-2:]) == geometry[0]):
                    return cls(spatial, (m.weight.flatten(1), m.bias, (m.out_channels, 1, 1)), layers[i + 1:])
                if not _pointwise(m) and geometry is None:
                    return None
                spatial.append((m, geometry))
                h = m(h)
        return None

    def start(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self._compute(_cl(x.clone()))
            return self._tail(self.z if self.w is not None else self.acts[-1].flatten(1))

    @property
    def images(self) -> torch.Tensor:
        """The current images: the batch given to `start`, with every accepted proposal written in."""
        return self.acts[0]

    def _compute(self, x: torch.Tensor) -> None:
        self.acts = [x]
        for m, _ in self.spatial:
            self.acts.append(_cl(m(self.acts[-1])))
        self.z = self._dense(self.acts[-1])

    def _dense(self, last: torch.Tensor) -> torch.Tensor | None:
        return None if self.w is None else F.linear(last.flatten(1), self.w, self.b)

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        if self.w is not None:
            h = h.view(len(h), *self.z_shape)
        for m in self.tail:
            h = m(h)
        return h

    def propose(self, patch: torch.Tensor, row: int, col: int):
        """Logits of the cached batch with `patch` (N, C, s, s) in place at (row, col), and the proposal."""
        with torch.no_grad():
            region = (row, row + patch.shape[-2], col, col + patch.shape[-1])
            new, parts = patch, [(region, patch)]
            for layer, ((m, geometry), a_in, a_out) in enumerate(zip(self.spatial, self.acts, self.acts[1:])):
                if geometry is None:
                    new = m(new)
                else:
                    changed = self._conv_change(layer, m, geometry, a_in, a_out, region, new)
                    region, new = changed or self._local(m, geometry, a_in, a_out.shape[-2:], region, new)
                    if new is None:  # no output of this layer reads the change: the logits stay
                        unchanged = self.z if self.w is not None else self.acts[-1].flatten(1)
                        return self._tail(unchanged), (parts, self.z)
                parts.append((region, new))
            last = self.acts[-1]
            r0, r1, c0, c1 = region
            whole = region == (0, last.shape[-2], 0, last.shape[-1])
            if self.w is None:
                full = new if whole else self._overlay(last, region, new)
                return self._tail(full.flatten(1)), (parts, None)
            if whole:
                z = self._dense(new)
            else:
                if region not in self.dense_maps:
                    w = self.w.view(len(self.w), *last.shape[1:])[:, :, r0:r1, c0:c1]
                    self.dense_maps[region] = _flat(w).t().contiguous()
                z = torch.addmm(self.z, _flat(new - last[:, :, r0:r1, c0:c1]), self.dense_maps[region])
            return self._tail(z), (parts, z)

    @staticmethod
    def _overlay(cached: torch.Tensor, region, values: torch.Tensor) -> torch.Tensor:
        r0, r1, c0, c1 = region
        out = cached.clone()
        out[:, :, r0:r1, c0:c1] = values
        return out

    def _conv_change(self, layer: int, m: nn.Conv2d, geometry, a_in: torch.Tensor, a_out: torch.Tensor, region,
                     new: torch.Tensor):
        """The conv's outputs that `new` (its input on `region`) reaches: cached outputs plus the
        change of the input times the matrix of this window's shape. None where a convolution over
        the patch is cheaper (a region larger than the kernel) or the region reaches inputs that no
        output reads (kernel smaller than stride, or cut off at the border)."""
        (kh, kw), (sh, sw), (ph, pw) = geometry
        r0, r1, c0, c1 = region
        if not isinstance(m, nn.Conv2d) or (r1 - r0) * (c1 - c0) > kh * kw:
            return None
        o_r0, o_r1, i_r0, i_r1 = _span(r0, r1, a_in.shape[-2], a_out.shape[-2], kh, sh, ph)
        o_c0, o_c1, i_c0, i_c1 = _span(c0, c1, a_in.shape[-1], a_out.shape[-1], kw, sw, pw)
        if not (i_r0 <= r0 and r1 <= i_r1 and i_c0 <= c0 and c1 <= i_c1 and o_r0 < o_r1 and o_c0 < o_c1):
            return None
        key = (layer, r1 - r0, c1 - c0, r0 - i_r0, c0 - i_c0, o_r1 - o_r0, o_c1 - o_c0)
        if key not in self.conv_maps:
            self.conv_maps[key] = _change_map(m.weight, *key[1:], (sh, sw))
        change = _flat(new - a_in[:, :, r0:r1, c0:c1]) @ self.conv_maps[key]
        out = a_out[:, :, o_r0:o_r1, o_c0:o_c1] + change.view(len(new), *key[-2:], -1).permute(0, 3, 1, 2)
        return (o_r0, o_r1, o_c0, o_c1), out

    @staticmethod
    def _local(m: nn.Module, geometry, a_in: torch.Tensor, out_hw, region, new: torch.Tensor):
        (kh, kw), (sh, sw), (ph, pw) = geometry
        h, w = a_in.shape[-2:]
        r0, r1, c0, c1 = region
        o_r0, o_r1, i_r0, i_r1 = _span(r0, r1, h, out_hw[0], kh, sh, ph)
        o_c0, o_c1, i_c0, i_c1 = _span(c0, c1, w, out_hw[1], kw, sw, pw)
        if o_r0 >= o_r1 or o_c0 >= o_c1:
            return region, None
        a, b, c, d = max(i_r0, 0), min(i_r1, h), max(i_c0, 0), min(i_c1, w)
        patch = a_in[:, :, a:b, c:d].clone(memory_format=torch.channels_last)
        ra, rb, ca, cb = max(r0, a), min(r1, b), max(c0, c), min(c1, d)
        if ra < rb and ca < cb:
            patch[:, :, ra - a:rb - a, ca - c:cb - c] = new[:, :, ra - r0:rb - r0, ca - c0:cb - c0]
        pad = (c - i_c0, i_c1 - d, a - i_r0, i_r1 - b)
        if any(pad):
            patch = F.pad(patch, pad, value=float("-inf") if isinstance(m, nn.MaxPool2d) else 0.0)
        if isinstance(m, nn.Conv2d):
            out = F.conv2d(patch, m.weight, m.bias, stride=(sh, sw))
        elif isinstance(m, nn.MaxPool2d):
            out = F.max_pool2d(patch, (kh, kw), (sh, sw))
        else:
            out = F.avg_pool2d(patch, (kh, kw), (sh, sw))
        return (o_r0, o_r1, o_c0, o_c1), out

    def accept(self, proposal, mask: torch.Tensor) -> None:
        """The proposal becomes the cached state of the examples where `mask` is true."""
        parts, z = proposal
        idx = mask.nonzero().flatten()
        if not len(idx):
            return
        for act, ((r0, r1, c0, c1), values) in zip(self.acts, parts):
            act[:, :, r0:r1, c0:c1].index_copy_(0, idx, values.index_select(0, idx))
        if self.w is not None:
            self.z.index_copy_(0, idx, z.index_select(0, idx))
        self.accepted += 1
        if self.accepted % REFRESH == 0:
            self._compute(self.acts[0])

    def keep(self, mask: torch.Tensor) -> None:
        self.acts = [a[mask] for a in self.acts]
        if self.z is not None:
            self.z = self.z[mask]
