"""Facts the DataModule knows that a model may need to be built, linked by name so configs never repeat them.

A model *accepts* a fact by having a constructor parameter of the fact's name; nothing else is
declared. :data:`MODEL_DATA_FACTS` maps each such parameter to the DataModule attribute that holds
it. Every path that builds a model reads this one table:

* the command line (:func:`link_data_facts`, called by ``FlowsCLI``) links each fact from the
  instantiated DataModule into ``model.init_args``; a model without the parameter is skipped;
* a checkpoint (``lightning_flows.checkpoints``) rebuilds the model from its saved hyperparameters,
  which hold the facts it was trained with; :func:`fill_data_facts` adds any a checkpoint predates and
  refuses a checkpoint whose facts contradict its own DataModule.

Adding a fact (as ``num_classes`` for class-conditional models) is one line here plus the DataModule
property; a model that wants it names the parameter.
"""

from __future__ import annotations

import inspect
from typing import Any

# model constructor parameter -> GenerativeDataModule attribute
MODEL_DATA_FACTS: dict[str, str] = {
    "data_shape": "data_shape",  # one example's shape in model space
    "data_levels": "levels",     # quantisation levels L of discrete data (None for continuous data)
    "num_classes": "num_classes",  # classes of a `conditional: true` DataModule's labels (0: unconditional)
}


def accepted_data_facts(model_cls: type) -> tuple[str, ...]:
    """The facts of :data:`MODEL_DATA_FACTS` that ``model_cls.__init__`` takes, in table order."""
    params = inspect.signature(model_cls.__init__).parameters
    return tuple(name for name in MODEL_DATA_FACTS if name in params)


def _normalise(value: Any) -> Any:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else value


def data_facts_for(model_cls: type, datamodule) -> dict[str, Any]:
    """``{parameter: value}`` of every fact ``model_cls`` accepts, read from ``datamodule``."""
    return {name: _normalise(getattr(datamodule, MODEL_DATA_FACTS[name])) for name in accepted_data_facts(model_cls)}


def fill_data_facts(model_cls: type, kwargs: dict[str, Any], datamodule) -> dict[str, Any]:
    """``kwargs`` plus every fact ``model_cls`` accepts that they lack, read from ``datamodule``, and
    without the facts it does not accept (LightningCLI records every linked fact in a run's
    hyperparameters, also for a model that does not take it).

    Raises ``ValueError`` naming the fact when ``kwargs`` give a value that contradicts the DataModule.
    """
    accepted = accepted_data_facts(model_cls)
    filled = {k: v for k, v in kwargs.items() if k not in MODEL_DATA_FACTS or k in accepted}
    for name, value in data_facts_for(model_cls, datamodule).items():
        if name not in filled or filled[name] is None:
            filled[name] = value
        elif _normalise(filled[name]) != value:
            raise ValueError(f"{model_cls.__name__} was built with {name}={filled[name]!r} but its data "
                             f"'{getattr(datamodule, 'dataset', '?')}' has {MODEL_DATA_FACTS[name]}={value!r}; "
                             f"the model and data configs disagree.")
    return filled


def link_data_facts(parser) -> None:
    """Link every fact from the instantiated DataModule (``data``) into ``model.init_args`` of a
    LightningCLI parser. jsonargparse skips a link whose target the chosen model class lacks."""
    for name, attribute in MODEL_DATA_FACTS.items():
        parser.link_arguments(f"data.{attribute}", f"model.init_args.{name}", apply_on="instantiate")
