"""The interface every pretraining objective implements.

An objective is an ``nn.Module`` that owns a :class:`~multimae.encoder.MultiModalEncoder` (attribute
``encoder``, registered first) and everything else its recipe needs: masking, decoders or predictors,
targets, teachers and losses. The training loop (:mod:`utils.loop`) knows only this interface:

============================  ===================================================================
``forward(batch, generator)``  the training step: batch (docs/DESIGN.md batch contract) ->
                               ``{"loss": fp32 scalar, <name>: fp32 scalar, ...}``; every value is
                               logged as ``loss_<name>`` (the loop prefixes names without ``loss``)
``after_step(step, total)``    called after every optimizer step that was not skipped (EMA teachers)
``objective_state()``          checkpoint state other than the encoder's (tensors and plain types)
``load_objective_state(s)``    the inverse, checked (exact missing / unexpected keys)
``batch_transform()``          None, or a picklable ``(samples, seeds) -> samples`` run in the
                               data-loader workers (masks built there from per-sample seeds)
``pictures(batch, generator)`` None, or a dict the picture writer renders (``utils.visualize``)
``no_weight_decay()``          parameter names without weight decay
``data_domains(cfg)``          (class method) the domains a batch must carry: inputs and targets
============================  ===================================================================

A new objective is one file in this package that subclasses :class:`Objective`, one line in the registry
of ``multimae/objectives/__init__.py``, and one config section of the same name in ``cfgs/defaults.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from multimae.encoder import MultiModalEncoder, init_linear_layers

__all__ = ["Objective"]


class Objective(nn.Module):
    """Base class of the pretraining objectives.

    Subclasses set :attr:`name` (the registry key and config section), implement :meth:`from_config` and
    :meth:`forward`, and override the optional hooks they need.

    Args:
        encoder: The encoder this objective trains (registered first, so its parameters come first).
    """

    name: ClassVar[str] = ""

    def __init__(self, encoder: MultiModalEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    @classmethod
    def from_config(cls, cfg: dict, encoder: MultiModalEncoder) -> "Objective":
        """Build the objective from the resolved config (its section ``cfg[cls.name]``) around ``encoder``.

        Raises:
            ValueError: a setting of the section is invalid or conflicts with the encoder (names the key).
        """
        raise NotImplementedError

    @classmethod
    def data_domains(cls, cfg: dict) -> list[str]:
        """Domains a training batch must carry for this objective: ``in_domains`` plus its targets."""
        return list(cfg["in_domains"])

    def describe(self) -> list[str]:
        """Lines for ``--summary`` (targets, masking budget, ...); default none."""
        return []

    def init_weights(self) -> None:
        """Initialise every weight: the encoder's (:meth:`MultiModalEncoder.init_weights`), then xavier-uniform
        for the Linear layers of every other child module, in registration order. Called once by
        :func:`multimae.objectives.build_objective` after construction."""
        self.encoder.init_weights()
        for name, child in self.named_children():
            if name != "encoder":
                init_linear_layers(child)

    # ------------------------------------------------------------------ training step and hooks
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One training step's losses.

        Args:
            batch: The collated batch (``inputs``, ``valid``, ``index``, plus what :meth:`batch_transform` adds).
            generator: Optional generator for random draws made on the model's device (validation fixes it).

        Returns:
            ``{"loss": total, <term>: value, ...}``: fp32 scalar tensors; ``loss`` carries the gradient.
        """
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Hook after optimizer step ``step`` (1-based, of ``total_steps``) when that step was not skipped."""

    def batch_transform(self) -> Callable[[list[dict], Any], list[dict]] | None:
        """A function the data-loader workers apply to each batch of samples, or None.

        It is called as ``fn(samples, seeds)`` with ``seeds`` a uint64 array (B,) that depends only on
        (seed, epoch, sample row), so what it draws does not change with worker count or resume. It must be
        picklable (a module-level class or function), and return the samples with its additions.
        """
        return None

    def pictures(self, batch: dict, generator: torch.Generator | None = None) -> dict | None:
        """Tensors for the pictures of a batch, rendered by ``utils.visualize.save_pictures``; None for none."""
        return None

    # ------------------------------------------------------------------ checkpoint state
    def objective_state(self) -> dict[str, Any]:
        """Everything of this objective a checkpoint needs except the encoder: ``{"state_dict": {...}}`` with
        every non-encoder parameter and persistent buffer, plus :meth:`extra_state` entries."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        return {"name": self.name, "state_dict": state, **self.extra_state()}

    def extra_state(self) -> dict[str, Any]:
        """Plain-type state outside the module's state dict (counters, warnings given); default none."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: the encoder's, prefixed ``encoder.``."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
