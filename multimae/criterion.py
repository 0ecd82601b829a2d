"""Masked reconstruction losses and loss weighting for MultiMAE pretraining.

Per output domain (the loss of each domain is a setting of the MultiMAE objective, ``multimae.loss``):

* ``mse`` / ``l1``: squared / absolute error per pixel, averaged over channels (continuous domains);
* ``ce``: cross-entropy of the class logits against the class map majority-pooled by the domain's
  ``label_downsample`` (the same pooling the input adapter uses), ``IGNORE_INDEX`` ignored; always
  the loss of a categorical domain;
* normalised-pixel domains (``multimae.loss.norm_pix``, e.g. ``s2_rgb_normpix``): the target is
  normalised per patch, over the valid pixels of all bands of the patch:
  (x - mean) / sqrt(unbiased var + 1e-6), as MAE's ``norm_pix_loss``; the prediction is not normalised.

A pixel counts only if its token is masked (unless ``loss_on_unmasked``) **and** it is valid
(``valid`` mask; for class maps also not ``IGNORE_INDEX``). Invalid pixels are excluded with
``torch.where``, so their values (even NaN) cannot change the loss. Per sample: sum / count over
counted pixels; then the mean over the samples that have any counted pixel. A domain with nothing
to count in the batch gives 0, still attached to the graph.

Weighting (``weighting``): ``none`` sums the domain losses (the reference); ``uncertainty`` learns
a log-variance s_d per domain and sums ``loss_d * exp(-s_d) + s_d`` over the domains that count
anything in the batch (Kendall, Gal and Cipolla, "Multi-task learning using uncertainty to weigh
losses", CVPR 2018). Losses are computed in float32, outside autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from multimae.adapters import majority_pool
from multimae.domains import DOMAINS, IGNORE_INDEX

__all__ = ["MultiMAECriterion", "masked_mean", "norm_pix_target"]


def masked_mean(loss: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean over counted pixels, then mean over samples with any count.

    Args:
        loss: float (B, H, W) per-pixel loss (may hold anything where ``weight`` is False).
        weight: bool (B, H, W), True where the pixel counts.

    Returns:
        The scalar loss (0 with the graph kept if nothing counts) and a bool scalar: anything counted.
    """
    loss = torch.where(weight, loss, 0.0)
    count = weight.flatten(1).sum(dim=1)  # (B,)
    per_sample = loss.flatten(1).sum(dim=1) / count.clamp(min=1)
    has = count > 0
    total = (per_sample * has).sum() / has.sum().clamp(min=1)
    return total, has.any()


def norm_pix_target(target: torch.Tensor, valid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Normalise a (B, C, H, W) target per P x P patch over its valid pixels (all bands together).

    Args:
        target: float (B, C, H, W).
        valid: bool (B, H, W).
        patch_size: P.

    Returns:
        float (B, C, H, W): (x - mean) / sqrt(unbiased var + 1e-6) per patch; values at invalid pixels
        are meaningless (the loss excludes them).
    """
    b, c, h, w = target.shape
    p = patch_size
    x = target.reshape(b, c, h // p, p, w // p, p)
    v = valid.reshape(b, 1, h // p, p, w // p, p).to(target.dtype)
    x = torch.where(v > 0, x, 0.0)
    dims = (1, 3, 5)
    n = v.sum(dim=dims, keepdim=True) * c
    mean = x.sum(dim=dims, keepdim=True) / n.clamp(min=1)
    var = ((x - mean) ** 2 * v).sum(dim=dims, keepdim=True) / (n - 1).clamp(min=1)
    return ((x - mean) / (var + 1e-6).sqrt()).view(b, c, h, w)


class MultiMAECriterion(nn.Module):
    """Masked reconstruction losses of all output domains, with optional uncertainty weighting.

    Args:
        out_domains: Output domain names (registry names).
        patch_size: Patch side P in pixels (of the full-resolution image): one value, or one per output
            domain ``{domain: px}`` (the patch size of the tokens its mask refers to).
        losses: ``{domain: "mse" | "l1"}`` for continuous domains not using ``mse``; categorical domains
            always use ``ce``.
        norm_pix: Output domains whose target is normalised per patch.
        weighting: ``none`` (plain sum) or ``uncertainty`` (learned log-variance per domain,
            parameters ``log_vars.<domain>``).
        loss_on_unmasked: Also count visible tokens.

    Raises:
        ValueError: On an unknown weighting or loss, or a domain that is not an output (the message names
            the ``multimae.loss`` key).
    """

    def __init__(
        self,
        out_domains: Sequence[str],
        *,
        patch_size: int | dict[str, int],
        losses: dict[str, str] | None = None,
        norm_pix: Sequence[str] = (),
        weighting: str = "none",
        loss_on_unmasked: bool = False,
    ) -> None:
        super().__init__()
        if weighting not in ("none", "uncertainty"):
            raise ValueError(f"multimae.loss.weighting must be 'none' or 'uncertainty', got {weighting!r}")
        for name in out_domains:
            if name not in DOMAINS:
                raise ValueError(f"multimae.out_domains: unknown domain {name!r}")
        self.out_domains = list(out_domains)
        self.losses = {}
        for name in self.out_domains:
            kind = DOMAINS[name].kind
            loss = (losses or {}).get(name, "ce" if kind == "categorical" else "mse")
            if kind == "categorical" and loss != "ce":
                raise ValueError(f"multimae.loss.per_domain.{name}: a class map uses 'ce', got {loss!r}")
            if kind != "categorical" and loss not in ("mse", "l1"):
                raise ValueError(f"multimae.loss.per_domain.{name}: expected 'mse' or 'l1', got {loss!r}")
            self.losses[name] = loss
        self.norm_pix = set(norm_pix)
        for name in self.norm_pix:
            if name not in self.out_domains or DOMAINS[name].kind == "categorical":
                raise ValueError(f"multimae.loss.norm_pix: {name!r} is not a continuous output domain")
        self.patch_sizes = (dict(patch_size) if isinstance(patch_size, dict)
                            else {d: patch_size for d in self.out_domains})
        self.weighting = weighting
        self.loss_on_unmasked = loss_on_unmasked
        self.log_vars = (
            nn.ParameterDict({d: nn.Parameter(torch.zeros(())) for d in self.out_domains})
            if weighting == "uncertainty" else None
        )

    def _pixel_weight(self, mask: torch.Tensor, valid: torch.Tensor, token_px: int) -> torch.Tensor:
        """bool (B, H', W'): masked token (or every token) and valid pixel; token_px pixels per token side."""
        b, h, w = valid.shape
        if self.loss_on_unmasked:
            return valid
        gh, gw = h // token_px, w // token_px
        masked = (mask > 0.5).view(b, gh, 1, gw, 1)
        return (masked & valid.reshape(b, gh, token_px, gw, token_px)).view(b, h, w)

    def domain_loss(
        self, name: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one output domain.

        Args:
            name: Output domain.
            pred: (B, C, H, W) prediction, or (B, K, H / ds, W / ds) logits.
            target: Source data: float (B, C, H, W), or int64 class map (B, H, W).
            mask: (B, N_d), 1 = masked.
            valid: Optional bool (B, H, W).

        Returns:
            Scalar float32 loss and a bool scalar telling whether any pixel counted.
        """
        dom = DOMAINS[name]
        pred = pred.float()
        patch = self.patch_sizes[name]
        if dom.kind == "categorical":
            labels = target.long() if valid is None else torch.where(valid, target.long(), IGNORE_INDEX)
            labels = majority_pool(labels, dom.label_downsample, dom.num_classes)  # (B, H/ds, W/ds)
            if tuple(labels.shape[-2:]) != tuple(pred.shape[-2:]):
                raise ValueError(f"domain {name!r}: logits {tuple(pred.shape)} do not match labels {tuple(labels.shape)}")
            loss = F.cross_entropy(pred, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, h', w')
            weight = self._pixel_weight(mask, labels != IGNORE_INDEX, patch // dom.label_downsample)
            return masked_mean(loss, weight)
        target = target.float()
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"domain {name!r}: prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        b, _, h, w = target.shape
        pix_valid = torch.ones(b, h, w, dtype=torch.bool, device=target.device) if valid is None else valid
        if name in self.norm_pix:
            target = norm_pix_target(target, pix_valid, patch)
        diff = pred - target
        loss = (diff.abs() if self.losses[name] == "l1" else diff.square()).mean(dim=1)  # (B, H, W)
        return masked_mean(loss, self._pixel_weight(mask, pix_valid, patch))

    def forward(
        self,
        preds: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        valid: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute every output domain's loss and the weighted total.

        Args:
            preds: Predictions {out_domain: tensor} (see :meth:`MultiMAEObjective.predict`).
            inputs: The batch inputs; an output-only domain reads its ``source`` domain.
            masks: {domain: (B, N_d)}, 1 = masked, for every output domain.
            valid: Optional {domain: bool (B, H, W)}; output-only domains use their source's.

        Returns:
            {"loss": weighted total, <domain>: unweighted float32 loss of that domain, ...}.

        Raises:
            ValueError: If the batch lacks a target or a mask of an output domain.
        """
        device_type = next(iter(preds.values())).device.type
        out: dict[str, torch.Tensor] = {}
        total = None
        with torch.autocast(device_type=device_type, enabled=False):
            for name in self.out_domains:
                src = DOMAINS[name].source or name
                if src not in inputs:
                    raise ValueError(f"batch has no target for output domain {name!r} (needs {src!r})")
                if name not in masks:
                    raise ValueError(f"no mask for output domain {name!r}")
                loss, counted = self.domain_loss(
                    name, preds[name], inputs[src], masks[name], None if valid is None else valid.get(src)
                )
                out[name] = loss
                if self.log_vars is not None:
                    s = self.log_vars[name]
                    loss = torch.where(counted, loss * torch.exp(-s) + s, 0.0 * s)
                total = loss if total is None else total + loss
        return {"loss": total, **out}
