"""Metadata tokens: image-level location and time as always-visible encoder tokens.

After Albughdadi, "Lightweight Metadata-Aware Mixture-of-Experts Masked Autoencoder for Earth Observation"
(arXiv 2509.10919; code AlbughdadiM/geo-moe-mae): each metadata value v of a period P becomes the cyclic pair
(sin(2 pi v / P), cos(2 pi v / P)), and each pair goes through its own ``Linear(2 -> D)`` to one token. The
encoder appends these tokens to the patch tokens as non-grid segments of its token layout; objectives never
mask them.

Fields (:data:`METADATA_FIELDS`; the datasets deliver the pairs, see docs/DESIGN.md batch contract):

============  =======  ===========================================  ==========================
field         period   value                                        (sin, cos) of
============  =======  ===========================================  ==========================
lat           360      latitude, degrees                            the latitude in radians
lon           360      longitude, degrees                           the longitude in radians
month         12       month of the acquisition, 1..12              2 pi m / 12 (as MMEarth)
week          52       ISO week of the acquisition, 1..53           2 pi w / 52 (as the source)
day_of_year   365.25   day of the year of the acquisition, 1..366   2 pi d / 365.25
hour          24       UTC time of day of the acquisition, hours    2 pi h / 24 (as the source)
============  =======  ===========================================  ==========================

Absent values: the source feeds zeros for absent metadata, which the linear layer cannot tell from latitude
0 / longitude 0. Here a pair holding NaN (a NaN month, a data set without metadata) selects a learned
per-field "missing" embedding instead of the linear layer's output, and a batch without a field gets the
missing embedding for every sample (with one warning per adapter naming the fields).

This module is pure torch (no file IO).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["MetadataField", "METADATA_FIELDS", "check_metadata_fields", "cyclic_encoding", "MetadataAdapter"]


@dataclass(frozen=True)
class MetadataField:
    """One kind of image-level metadata.

    Attributes:
        name: Field name (config key ``model.metadata``, batch key ``metadata.<name>``, token-layout segment).
        period: The value's period P: the pair is (sin, cos) of 2 pi v / P.
        units: What the value is, in which unit.
    """

    name: str
    period: float
    units: str


METADATA_FIELDS: dict[str, MetadataField] = {
    f.name: f
    for f in (
        MetadataField("lat", 360.0, "latitude, degrees"),
        MetadataField("lon", 360.0, "longitude, degrees"),
        MetadataField("month", 12.0, "month of the acquisition, 1..12"),
        MetadataField("week", 52.0, "ISO week of the acquisition, 1..53"),
        MetadataField("day_of_year", 365.25, "day of the year of the acquisition, 1..366"),
        MetadataField("hour", 24.0, "UTC time of day of the acquisition, hours"),
    )
}


def check_metadata_fields(fields: Sequence[str], key: str = "model.metadata") -> list[str]:
    """Validate a list of metadata field names.

    Raises:
        ValueError: not a list of names, an unknown name (the message lists the known ones) or a repeated one;
            the message names ``key``.
    """
    if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
        raise ValueError(f"{key}: expected a list of metadata field names, got {fields!r}")
    fields = list(fields)
    for name in fields:
        if name not in METADATA_FIELDS:
            raise ValueError(f"{key}: unknown metadata field {name!r}; known fields: {', '.join(METADATA_FIELDS)}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"{key} lists a field twice: {fields}")
    return fields


def cyclic_encoding(values, period: float) -> np.ndarray:
    """The (sin, cos) pair of 2 pi v / P for every value.

    Args:
        values: Array-like (...) of values in the field's unit; NaN for absent.
        period: P.

    Returns:
        float32 (..., 2): (sin, cos); both NaN where the value is NaN.
    """
    angle = np.asarray(values, dtype=np.float64) * (2.0 * math.pi / period)
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)


class MetadataAdapter(nn.Module):
    """One token per metadata field: ``Linear(2 -> D)`` of the field's (sin, cos) pair, or its missing embedding.

    Parameters: ``proj.<field>.weight`` / ``.bias`` and ``missing.<field>`` (D,).

    Args:
        fields: Field names of :data:`METADATA_FIELDS`, in token order.
        dim: Token width D.

    Raises:
        ValueError: an unknown or repeated field (names ``model.metadata``).
    """

    def __init__(self, fields: Sequence[str], dim: int) -> None:
        super().__init__()
        self.fields = check_metadata_fields(fields)
        self.proj = nn.ModuleDict({f: nn.Linear(2, dim) for f in self.fields})
        # A list, not a dict: ParameterDict sorts a dict's keys, and the init draws follow this order.
        self.missing = nn.ParameterDict([(f, nn.Parameter(torch.zeros(dim))) for f in self.fields])
        self._warned: set[str] = set()
        self.init_missing()

    def init_missing(self) -> None:
        """Truncated-normal (std 0.02) missing embeddings, as MAE initialises its learned tokens."""
        for p in self.missing.values():
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, metadata: Mapping[str, torch.Tensor] | None, batch_size: int) -> torch.Tensor:
        """Embed every field.

        Args:
            metadata: ``{field: float (B, 2) (sin, cos)}``; a pair with a non-finite value, a field absent from
                the mapping, or ``metadata`` None, select that field's missing embedding.
            batch_size: B (used when a field is absent).

        Returns:
            (B, M, D) tokens, one per field in :attr:`fields` order.

        Raises:
            ValueError: a present field that is not (B, 2).
        """
        metadata = metadata or {}
        absent = [f for f in self.fields if f not in metadata and f not in self._warned]
        if absent:
            self._warned.update(absent)
            warnings.warn(f"metadata field(s) {', '.join(map(repr, absent))} not in the batch: the encoder uses the "
                          "learned missing embedding for every sample", stacklevel=1)
        tokens = []
        for name in self.fields:
            missing = self.missing[name]
            pair = metadata.get(name)
            if pair is None:
                tokens.append(missing.expand(batch_size, -1))
                continue
            if tuple(pair.shape) != (batch_size, 2):
                raise ValueError(f"metadata[{name!r}] must be a (B, 2) = ({batch_size}, 2) (sin, cos) tensor, "
                                 f"got {tuple(pair.shape)}")
            pair = pair.to(missing.dtype)
            present = torch.isfinite(pair).all(dim=-1, keepdim=True)  # (B, 1)
            embedded = self.proj[name](torch.where(present, pair, 0.0))  # NaN never enters the graph
            tokens.append(torch.where(present, embedded, missing))
        return torch.stack(tokens, dim=1)
