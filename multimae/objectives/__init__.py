"""Pretraining objectives: one file per objective, one line per objective in :data:`OBJECTIVES`.

The config names one (``objective: multimae``) and sets its section of the same name. Every objective trains
the same :class:`~multimae.encoder.MultiModalEncoder`; see :mod:`multimae.objectives.base` for the interface.
"""

from __future__ import annotations

from multimae.encoder import MultiModalEncoder
from multimae.objectives.base import Objective
from multimae.objectives.moe_mae import MoEMAEObjective
from multimae.objectives.jepa import JEPAObjective
from multimae.objectives.latent_mim import LatentMIMObjective
from multimae.objectives.multimae import MultiMAEObjective

__all__ = ["OBJECTIVES", "Objective", "get_objective", "build_objective"]

#: Objective name (config key ``objective`` and its config section) -> class.
OBJECTIVES: dict[str, type[Objective]] = {
    "multimae": MultiMAEObjective,
    "moe_mae": MoEMAEObjective,
    "jepa": JEPAObjective,
    "latent_mim": LatentMIMObjective,
}


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name``.

    Raises:
        ValueError: an unknown name; the message lists the registered objectives.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"config key 'objective': unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(cfg: dict, encoder: MultiModalEncoder) -> Objective:
    """Build ``cfg["objective"]`` around ``encoder`` (built with ``init_weights=False``) and initialise it.

    Raises:
        ValueError: unknown objective, or an invalid value in its config section (named in the message).
    """
    objective = get_objective(cfg["objective"]).from_config(cfg, encoder)
    objective.init_weights()
    return objective
