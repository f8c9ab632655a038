"""The lecture's augmented CNF dynamics, with optional RNODE accumulators.

State ``(z, L[, E, F])`` with ``z: (B, *shape)`` and per-example scalars ``(B,)``::

    d/dt z = f(z, t)                      the flow
    d/dt L = -Tr(df/dz)                   instantaneous change of variables: L tracks log p_t(z(t))
    d/dt E = ||f(z, t)||^2                RNODE kinetic energy (optional)
    d/dt F = ||df/dz||_F^2                RNODE Jacobian Frobenius norm (optional)

Integrating this system is how :func:`lightning_flows.ode.likelihood.ode_log_likelihood` turns any
velocity model into an exact log-likelihood.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from lightning_flows.ode.divergence import DIVERGENCE_KINDS, exact_divergence, hutchinson_divergence

VelocityModel = Callable[[Tensor, Tensor], Tensor]


class AugmentedDynamics(nn.Module):
    """``(state, t) -> d state / dt`` for the state ``(z, L[, E][, F])`` above.

    Args:
        velocity: ``f(x, t)``, ``x: (B, *shape)`` -> same shape; an ``nn.Module`` (its parameters then
            belong to this module, which the adjoint method needs) or any callable.
        divergence: ``exact`` (torch.func Jacobian trace) or ``hutchinson`` (needs :attr:`probe`). A velocity
            with a ``velocity_and_divergence(z, t, frobenius, chunk_size, probe=None)`` method (the closed form
            of :class:`lightning_flows.nn.ode_functions.ConcatSquashMLP`) computes either itself.
        kinetic_energy, jacobian_frobenius: append the RNODE accumulators ``E`` / ``F`` to the state.
        chunk_size: passed to :func:`exact_divergence` to bound its memory.

    A velocity with a ``divergence_colouring(shape)`` method gives the exact trace its colouring (see
    :func:`exact_divergence`).

    ``probe`` (``(B, *shape)``) is set by the caller once per solve and held fixed during it.
    """

    def __init__(self, velocity: VelocityModel, divergence: str = "exact", kinetic_energy: bool = False,
                 jacobian_frobenius: bool = False, chunk_size: int | None = None):
        super().__init__()
        if divergence not in DIVERGENCE_KINDS:
            raise ValueError(f"Unknown divergence '{divergence}'. Choose one of: {', '.join(DIVERGENCE_KINDS)}.")
        self.velocity = velocity
        self.divergence = divergence
        self.kinetic_energy = kinetic_energy
        self.jacobian_frobenius = jacobian_frobenius
        self.chunk_size = chunk_size
        self.probe: Tensor | None = None

    def forward(self, state: tuple[Tensor, ...], t: Tensor) -> tuple[Tensor, ...]:
        z = state[0]

        def field_at_t(z_: Tensor) -> Tensor:
            return self.velocity(z_, t)

        if self.divergence == "hutchinson" and (self.probe is None or self.probe.shape != z.shape):
            raise RuntimeError("Hutchinson divergence needs a probe shaped like the state; set "
                               "AugmentedDynamics.probe (e.g. with sample_probe) before solving.")
        if hasattr(self.velocity, "velocity_and_divergence"):
            # A field that knows its own Jacobian in closed form (ConcatSquashMLP): same quantities, far cheaper.
            probe = self.probe if self.divergence == "hutchinson" else None
            dz, div, fro = self.velocity.velocity_and_divergence(z, t, self.jacobian_frobenius, self.chunk_size,
                                                                 probe=probe)
        elif self.divergence == "exact":
            # A field with a structurally sparse Jacobian (ConcatConvField) names the coordinates that never
            # interact: the same exact trace in one pass per colour instead of one per coordinate.
            colouring = getattr(self.velocity, "divergence_colouring", None)
            colours = colouring(tuple(z.shape[1:])) if colouring is not None else None
            dz, div, fro = exact_divergence(field_at_t, z, self.jacobian_frobenius, self.chunk_size, colours)
        else:
            dz, div, fro = hutchinson_divergence(field_at_t, z, self.probe, self.jacobian_frobenius)
        derivatives = [dz, -div]
        if self.kinetic_energy:
            derivatives.append(dz.flatten(1).pow(2).sum(1))
        if self.jacobian_frobenius:
            derivatives.append(fro)
        return tuple(derivatives)
