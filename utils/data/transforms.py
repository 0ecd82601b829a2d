"""Spatial transforms shared by the fine-tuning datasets (GEO-Bench, BigEarthNet, GeoTIFF folders)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spatial_transform"]


def spatial_transform(images: list[torch.Tensor], labels: list[torch.Tensor], size: int, *, augment: bool,
                      resize: bool, hflip: float, generator: torch.Generator) -> tuple[list, list]:
    """Crop (or resize) and flip images and label maps of one sample together.

    Args:
        images: float tensors (C, H, W) (bilinear when resized).
        labels: tensors (H, W) or (C, H, W) of class ids / masks (nearest when resized).
        size: Output side in px.
        augment: Random crop and horizontal flip (probability ``hflip``); else a centre crop.
        resize: Resize the whole image to ``size`` instead of cropping.
        generator: Source of randomness (seeded per sample by the caller).

    Raises:
        ValueError: the image is smaller than ``size`` and ``resize`` is off.
    """
    h, w = images[0].shape[-2:]
    if resize and (h, w) != (size, size):
        images = [F.interpolate(x[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
                  for x in images]
        labels = [F.interpolate(y[None, None].float() if y.dim() == 2 else y[None].float(), size=(size, size),
                                mode="nearest")[0].to(y.dtype).reshape(*y.shape[:-2], size, size) for y in labels]
    elif (h, w) != (size, size):
        if h < size or w < size:
            raise ValueError(f"image of {h} x {w} px is smaller than input_size {size}; set data.resize=true")
        if augment:
            y0 = int(torch.randint(0, h - size + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        else:
            y0, x0 = (h - size) // 2, (w - size) // 2
        images = [x[..., y0:y0 + size, x0:x0 + size] for x in images]
        labels = [y[..., y0:y0 + size, x0:x0 + size] for y in labels]
    if augment and float(torch.rand((), generator=generator)) < hflip:
        images = [x.flip(-1) for x in images]
        labels = [y.flip(-1) for y in labels]
    return images, labels
