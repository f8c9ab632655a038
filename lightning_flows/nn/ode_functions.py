"""Smooth vector fields ``f(x, t)`` for continuous normalizing flows.

A CNF is only as cheap as its ODE is easy to solve: an adaptive solver's step count grows with how
fast ``f`` varies in ``x`` *and* in ``t``. So these fields take the raw scalar ``t`` (no
high-frequency sinusoidal embedding, which makes the field oscillate in time and multiplies the
NFE) and use smooth activations (softplus / tanh; the exact trace differentiates them once more,
so ReLU's zero second derivative would also starve the likelihood gradient).

* :class:`ConcatSquashMLP` for vectors ``(B, D)`` (FFJORD's concat-squash layer:
  ``h' = (W h + b) * sigmoid(a(t)) + c(t)``: time gates and shifts every layer). It also gives its exact
  Jacobian trace in closed form (:meth:`ConcatSquashMLP.velocity_and_divergence`): the ``D`` Jacobian
  columns pushed forward through the layers with plain matrix products, several times cheaper than
  ``torch.func``'s batched vector-Jacobian products, whose training gradient is a double backward.
* :class:`ConcatConvField` for images ``(B, C, H, W)``: 3x3 convolutions with ``t`` appended as a
  constant input channel at every layer; no normalisation layers, so examples stay independent
  (the exact trace relies on that).
* :class:`ConvPlusMLPField` for images: the sum of the two, the convolution's local prior beside the MLP's
  view of the whole image; its exact trace is the sum of theirs (coloured passes plus the closed form).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flows.nn.mlp import make_activation
from lightning_flows.nn.time_embedding import broadcast_time
from lightning_flows.ode.divergence import exact_divergence, hutchinson_divergence, local_colouring


class FastSoftplus(nn.Module):
    """``softplus(x) = log(1 + e^x)`` as ``max(x, 0) + log(1 + e^{-|x|})``, derivative ``sigmoid(x)``.

    ``log(1 + e^x)`` to float precision and finite everywhere (``nn.Softplus`` returns ``x`` above 20). Written
    with ``log`` because this CPU build's ``log1p`` (which ``F.softplus`` uses) costs ~7x ``log`` (measured on a
    (512, 64) batch: ~0.9 ms vs ~0.27 ms), and the CNF fields evaluate it in every layer of every ODE step.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _Softplus.apply(x)


class _Softplus(torch.autograd.Function):
    # The backward is written in differentiable ops, so double backward (the exact trace's training gradient
    # via torch.func) works; generate_vmap_rule lets torch.func batch it.
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clamp_min(0) + torch.log(1 + torch.exp(-x.abs()))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def make_field_activation(name: str) -> nn.Module:
    """The activations of the CNF fields: ``softplus`` is :class:`FastSoftplus`; others as ``make_activation``."""
    return FastSoftplus() if name == "softplus" else make_activation(name)


# The slope act'(pre) of each field activation (the closed-form Jacobian's), from its pre-activation and output.
_SLOPES = {
    "softplus": lambda pre, out: torch.sigmoid(pre),
    "tanh": lambda pre, out: 1 - out * out,
    "silu": lambda pre, out: torch.sigmoid(pre) * (1 + pre * (1 - torch.sigmoid(pre))),
    "relu": lambda pre, out: (pre > 0).to(pre.dtype),
}


class ConcatSquashLinear(nn.Module):
    """``(W x + b) * sigmoid(g t + g0) + (s t)``: ``x: (B, in)``, ``t``: ``()`` or ``(B,)`` -> ``(B, out)``.

    A scalar ``t`` (one time for the whole batch, as in every ODE solve) computes the gate and shift once,
    ``(out,)``, instead of once per example.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def gate_and_shift(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``sigmoid(g t + g0)`` and ``s t``: ``(out,)`` for a scalar ``t``, ``(B, out)`` for ``t: (B,)``."""
        t = t[..., None]
        return torch.sigmoid(self.gate.weight[:, 0] * t + self.gate.bias), self.shift.weight[:, 0] * t

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        gate, shift = self.gate_and_shift(t)
        return self.linear(x) * gate + shift


class ConcatSquashMLP(nn.Module):
    """A smooth time-dependent field on vectors of any shape: ``(B, *shape)`` -> ``(B, *shape)``.

    Args:
        data_shape: shape of one example (flattened internally, so ``(1, 8, 8)`` works too).
        hidden: width; depth: number of hidden layers; activation: ``softplus`` or ``tanh`` advised.
        num_classes: ``K > 0`` makes the field class-conditional, ``f(x, t, y)``: a learned shift per class is
            added to every layer's pre-activation (the one-hot label through a linear map, as the conditional
            couplings read it). The shifts start at zero, so the conditional field starts as the unconditional
            one, and they do not depend on ``x``, so the closed-form Jacobian below is unchanged.
        dropout: probability of zeroing a hidden unit in training (0: off). A CNF's ODE must stay one ODE through a
            solve, so the masks are drawn once per solve (:meth:`draw_dropout_masks`, one per example and hidden
            layer) and passed in, never redrawn per evaluation: each training example then follows the exact ODE of
            its own sub-network, whose divergence the closed form below still gives. Without masks (evaluation,
            sampling) the full field runs; the masks are scaled by ``1 / (1 - dropout)`` so its units see the same
            mean input.
    """

    def __init__(self, data_shape: Sequence[int], hidden: int = 64, depth: int = 3, activation: str = "softplus",
                 num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        self.dropout = float(dropout)
        self.hidden, self.depth = hidden, depth
        self.data_shape = tuple(data_shape)
        dim = 1
        for s in self.data_shape:
            dim *= s
        widths = [dim] + [hidden] * depth + [dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation
        self.act = make_field_activation(activation)
        self.num_classes = int(num_classes)
        # Created after the layers and from zeros: no random draws, so the layers' initialisation is that of
        # the unconditional field (and num_classes = 0 keeps its state dict).
        self.class_shifts = nn.ParameterList(nn.Parameter(torch.zeros(self.num_classes, width))
                                             for width in widths[1:]) if self.num_classes else None

    def _shifted(self, i: int, pre: Tensor, y: Tensor | None) -> Tensor:
        """Layer ``i``'s pre-activation ``(B, width)`` plus the shift of labels ``y: (B,)``; unchanged (no extra op
        in the ODE function of an unconditional field) without labels. The shift is gathered here, inside the
        field, so that the adjoint method differentiates it."""
        if y is None:
            return pre
        if self.class_shifts is None:
            raise ValueError("this field is unconditional (num_classes=0): call it without class labels.")
        return pre + self.class_shifts[i][y]

    def draw_dropout_masks(self, batch: int, like: Tensor) -> list[Tensor] | None:
        """One training solve's dropout masks: ``depth`` tensors ``(batch, hidden)`` of 0 and ``1 / (1 - p)``, in
        ``like``'s dtype and device; None when ``dropout`` is 0."""
        if not self.dropout:
            return None
        keep = 1.0 - self.dropout
        return [torch.bernoulli(like.new_full((batch, self.hidden), keep)) / keep for _ in range(self.depth)]

    def _masked(self, i: int, h: Tensor, masks: list[Tensor] | None) -> Tensor:
        """Hidden layer ``i``'s output ``(B, hidden)`` times its dropout mask (unchanged without masks)."""
        if masks is None:
            return h
        if masks[i].shape != h.shape:
            raise ValueError(f"dropout masks of shape {tuple(masks[i].shape)} do not match the hidden layer "
                             f"{tuple(h.shape)}: draw them for the solve's batch with draw_dropout_masks.")
        return h * masks[i]

    @staticmethod
    def _time(t: Tensor | float, x: Tensor) -> Tensor:
        """``()`` for one time shared by the batch (every ODE solve), else ``(B,)``."""
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        return t.reshape(()) if t.numel() == 1 else broadcast_time(t, x.shape[0], x)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None,
                masks: list[Tensor] | None = None) -> Tensor:
        """``f(x, t)``, or ``f(x, t, y)`` for class labels ``y: (B,)`` (a field built with ``num_classes``); ``masks``
        from :meth:`draw_dropout_masks` select one solve's sub-network."""
        t = self._time(t, x)
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            h = self._shifted(i, layer(h, t), y)
            if i < len(self.layers) - 1:
                h = self._masked(i, self.act(h), masks)
        return h.reshape(x.shape)

    def velocity_and_divergence(self, x: Tensor, t: Tensor | float, frobenius: bool = False,
                                chunk_size: int | None = None, probe: Tensor | None = None,
                                y: Tensor | None = None,
                                masks: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``f(x, t)``, ``Tr(df/dx)`` and (``frobenius``) ``||df/dx||_F^2`` per example, in closed form.

        ``x: (B, *shape)`` -> ``((B, *shape), (B,), (B,) or None)``. Forward-mode differentiation by hand: tangents
        ``T = dh/dx``, ``(B, k, width)``, go through each layer as ``T <- (T W^T) * gate * act'(pre)``, plain
        batched products that first-order autograd differentiates for training (the torch.func trace's training
        gradient is a double backward).

        * Without ``probe``: exact, the same values as :func:`lightning_flows.ode.exact_divergence`; the ``D``
          columns of the Jacobian are carried ``chunk_size`` at a time (memory ``~ B * chunk_size * width``).
        * With ``probe`` ``v: (B, *shape)``: Hutchinson's unbiased ``v^T J v`` and ``||J v||^2`` from one tangent
          (:func:`lightning_flows.ode.hutchinson_divergence` computes ``v^T J`` instead: the same trace estimate,
          and an equally unbiased Frobenius estimate).
        """
        t = self._time(t, x)
        batch, dim = x.shape[0], x[0].numel()
        h = x.reshape(batch, dim)
        gates, slopes = [], []
        for i, layer in enumerate(self.layers):
            gate, shift = layer.gate_and_shift(t)
            pre = self._shifted(i, layer.linear(h) * gate + shift, y)
            gates.append(gate if gate.ndim == 1 else gate[:, None, :])  # broadcast over the tangents
            if i < len(self.layers) - 1:
                h = self.act(pre)
                slope = _SLOPES[self.activation](pre, h)
                if masks is not None:  # a dropped unit's output is a constant 0: it carries no tangent
                    h, slope = self._masked(i, h, masks), slope * masks[i]
                slopes.append(slope[:, None, :])
            else:
                h = pre

        def push(tangents: Tensor) -> Tensor:  # d(first pre-activation)/dx along k directions -> df/dx along them
            tangents = tangents * gates[0]
            for layer, gate, slope in zip(self.layers[1:], gates[1:], slopes):
                tangents = (tangents * slope) @ layer.linear.weight.t() * gate
            return tangents.expand(batch, *tangents.shape[-2:])  # (B, k, D); one layer: the same for every example

        if probe is not None:
            v = probe.reshape(batch, 1, dim)
            jv = push(v @ self.layers[0].linear.weight.t())[:, 0]  # (B, D)
            return h.reshape(x.shape), (jv * v[:, 0]).sum(1), jv.pow(2).sum(1) if frobenius else None
        chunk = dim if chunk_size is None else max(1, min(int(chunk_size), dim))
        divergence = x.new_zeros(batch)
        fro = x.new_zeros(batch) if frobenius else None
        for start in range(0, dim, chunk):
            columns = torch.arange(start, min(start + chunk, dim), device=x.device)
            jac_columns = push(self.layers[0].linear.weight.t()[columns])  # (B, c, D): df/dx_j for the chunk's j
            divergence = divergence + jac_columns[:, torch.arange(len(columns), device=x.device), columns].sum(1)
            if fro is not None:
                fro = fro + jac_columns.pow(2).sum(dim=(1, 2))
        return h.reshape(x.shape), divergence, fro


class LabelledField(nn.Module):
    """A field with class labels ``y: (B,)`` fixed for one solve: ``(x, t) -> field(x, t, y)``.

    The ODE solvers and :class:`lightning_flows.ode.AugmentedDynamics` call fields as ``f(x, t)``; the labels are one
    per row of the solve's state. Fields without a closed-form divergence (:class:`ConcatConvField`) get theirs from
    the generic traces. The field is a submodule, so the adjoint method finds its parameters.
    """

    def __init__(self, field: nn.Module, y: Tensor | None = None):
        super().__init__()
        self.field, self.y = field, y

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.field(x, t, self.y)

    def divergence_colouring(self, shape: Sequence[int]) -> Tensor | None:
        """The field's own colouring for the exact trace (labels do not couple pixels), or None."""
        colouring = getattr(self.field, "divergence_colouring", None)
        return colouring(shape) if colouring is not None else None


class BoundField(nn.Module):
    """A :class:`ConcatSquashMLP` with its per-row inputs fixed for one solve: ``(x, t) -> field(x, t, y, masks)``.

    As :class:`LabelledField`, binding class labels ``y: (B,)`` and/or dropout masks (one per row of the solve's
    state; either may be None), and keeping the field's closed-form divergence.
    """

    def __init__(self, field: ConcatSquashMLP, y: Tensor | None = None, masks: list[Tensor] | None = None):
        super().__init__()
        self.field, self.y, self.masks = field, y, masks

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.field(x, t, self.y, self.masks)

    def velocity_and_divergence(self, x: Tensor, t: Tensor | float, frobenius: bool = False,
                                chunk_size: int | None = None, probe: Tensor | None = None):
        return self.field.velocity_and_divergence(x, t, frobenius, chunk_size, probe=probe, y=self.y,
                                                  masks=self.masks)


class ConcatConvField(nn.Module):
    """A smooth time-dependent field on images: ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Every layer is a same-size 3x3 convolution of ``[h, t]`` (``t`` as a constant channel), so the
    receptive field grows by 2 pixels per layer; ``depth`` hidden layers of ``channels`` channels.
    ``num_classes = K > 0`` makes it class-conditional, ``f(x, t, y)``, as :class:`ConcatSquashMLP` is: a learned
    shift per class and channel is added to every layer's output before its activation, starting at zero.
    """

    def __init__(self, data_shape: Sequence[int], channels: int = 32, depth: int = 3, activation: str = "softplus",
                 num_classes: int = 0):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"ConcatConvField needs image data of shape (C, H, W), got {tuple(data_shape)}; "
                             f"use field: mlp for vector data.")
        c = data_shape[0]
        widths = [c] + [channels] * depth + [c]
        self.convs = nn.ModuleList(nn.Conv2d(a + 1, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_field_activation(activation)
        self.num_classes = int(num_classes)
        # From zeros after the convolutions: no random draws, so the convolutions start as the unconditional
        # field's do (and num_classes = 0 keeps its state dict).
        self.class_shifts = nn.ParameterList(nn.Parameter(torch.zeros(self.num_classes, width))
                                             for width in widths[1:]) if self.num_classes else None

    def divergence_colouring(self, shape: Sequence[int]) -> Tensor:
        """Colours for :func:`lightning_flows.ode.exact_divergence`: each 3x3 convolution (padding 1) widens what an
        output pixel sees by one pixel each way, so pixels ``len(convs) + 1`` apart never interact (25 colours
        instead of 64 passes on 8x8 digits). The time channel and class shifts do not depend on ``x``."""
        return local_colouring(tuple(shape), radius=len(self.convs))

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``f(x, t)``, or ``f(x, t, y)`` for class labels ``y: (B,)`` (a field built with ``num_classes``)."""
        if y is not None and self.class_shifts is None:
            raise ValueError("this field is unconditional (num_classes=0): call it without class labels.")
        t = broadcast_time(t, x.shape[0], x)[:, None, None, None]
        ones = x.new_ones(1, 1, *x.shape[2:])
        h = x
        for i, conv in enumerate(self.convs):
            # conv([h, t]) with t a constant channel is conv_h(h) + t * conv_t(ones): the same layer without the
            # (B, 1, H, W) channel in every pass (oneDNN runs 16 input channels faster than 17 on CPU), the time map
            # one 1-channel convolution per layer instead of one channel per example. On the digits CNF, one
            # thread: the exact trace ~1.2x and a training step ~1.05x faster
            # (experiments/benchmarks/conv_time_channel.py). The weights keep the concatenated layout.
            time_map = F.conv2d(ones, conv.weight[:, -1:], padding=1)  # (1, out, H, W)
            h = F.conv2d(h, conv.weight[:, :-1], conv.bias, padding=1) + t * time_map
            if y is not None:
                h = h + self.class_shifts[i][y][:, :, None, None]
            if i < len(self.convs) - 1:
                h = self.act(h)
        return h


class ConvPlusMLPField(nn.Module):
    """``f(x, t) = conv(x, t) + mlp(x, t)`` on images ``(B, C, H, W)``: :class:`ConcatConvField` (each pixel's
    velocity from its neighbourhood, the prior that bounds digits' likelihood) plus :class:`ConcatSquashMLP` (every
    pixel's velocity from the whole image, the global structure samples need).

    The trace of a sum is the sum of the traces, so the exact divergence stays cheap: the convolution's in
    coloured passes (:meth:`ConcatConvField.divergence_colouring`), the MLP's in closed form. Hutchinson's estimate
    and the Frobenius norm (which does not split over a sum) go through the whole field.
    """

    def __init__(self, data_shape: Sequence[int], channels: int = 16, hidden: int = 256, depth: int = 3,
                 activation: str = "softplus", num_classes: int = 0):
        super().__init__()
        self.conv = ConcatConvField(data_shape, channels=channels, depth=depth, activation=activation,
                                    num_classes=num_classes)
        self.mlp = ConcatSquashMLP(data_shape, hidden=hidden, depth=depth, activation=activation,
                                   num_classes=num_classes)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``f(x, t)``, or ``f(x, t, y)`` for class labels ``y: (B,)`` (a field built with ``num_classes``)."""
        return self.conv(x, t, y) + self.mlp(x, t, y)

    def velocity_and_divergence(self, x: Tensor, t: Tensor | float, frobenius: bool = False,
                                chunk_size: int | None = None, probe: Tensor | None = None,
                                y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """As :meth:`ConcatSquashMLP.velocity_and_divergence`: ``x: (B, C, H, W)`` -> ``((B, C, H, W), (B,), (B,)
        or None)``; exact without ``probe``, Hutchinson's estimate with it."""
        def whole(z: Tensor) -> Tensor:
            return self(z, t, y)

        if probe is not None:
            return hutchinson_divergence(whole, x, probe, frobenius)
        if frobenius:  # ||J_conv + J_mlp||_F^2 needs the summed Jacobian's rows
            return exact_divergence(whole, x, True, chunk_size)
        colouring = self.conv.divergence_colouring(tuple(x.shape[1:]))
        conv_velocity, conv_divergence, _ = exact_divergence(lambda z: self.conv(z, t, y), x, False, chunk_size,
                                                             colouring)
        mlp_velocity, mlp_divergence, _ = self.mlp.velocity_and_divergence(x, t, False, chunk_size, y=y)
        return conv_velocity + mlp_velocity, conv_divergence + mlp_divergence, None
