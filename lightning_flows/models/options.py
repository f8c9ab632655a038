"""Grouped constructor options: small dataclasses a family takes instead of a flat list of parameters.

A family groups related options (its network, its noise, its time sampling...) the way
:class:`lightning_flows.ode.SolverConfig` groups an ODE solve. Each group is accepted as the dataclass, as
its dict form (YAML configs, ``--model.init_args.<group>.<field>`` on the command line, checkpoints) or as
None (the defaults): :func:`as_options`. Checkpoints store every group as a plain dict
(:func:`store_plain_hyperparameters`), so loading one with ``weights_only=True`` never unpickles a class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

Options = TypeVar("Options")


def as_options(cls: type[Options], value: Options | dict | None, name: str = "") -> Options:
    """``value`` as an instance of the dataclass ``cls``: itself, built from its dict form, or the defaults.

    An unknown key is a ``ValueError`` naming the known ones (``name``: the constructor argument, for the
    message)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name or cls.__name__} must be a {cls.__name__} or a dict of its fields, got "
                         f"{type(value).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"Unknown {name or cls.__name__} option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}.")
    return cls(**value)


def plain(value: Any) -> Any:
    """A dataclass (also nested, e.g. a :class:`SolverConfig` inside a group) as a dict; anything else as is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def store_plain_hyperparameters(model, **groups: Any) -> None:
    """Record ``groups`` (the resolved option groups) as dicts in ``model.hparams``, which Lightning writes into
    checkpoints and the logger's hparams file; call after ``save_hyperparameters()``."""
    for key, value in groups.items():
        model.hparams[key] = plain(value)
        if key in getattr(model, "_hparams_initial", {}):
            model._hparams_initial[key] = plain(value)


__all__ = ["as_options", "plain", "store_plain_hyperparameters"]
