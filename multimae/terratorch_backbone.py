"""An exported encoder as a TerraTorch backbone (``pip install '.[terratorch]'``).

Importing this module registers the factory :func:`multimae_eo` in TerraTorch's backbone registry
(``terratorch.registry.TERRATORCH_BACKBONE_REGISTRY``), so a TerraTorch fine-tuning config can name it::

    model:
      class_path: terratorch.tasks.SemanticSegmentationTask
      init_args:
        model_factory: EncoderDecoderFactory
        model_args:
          backbone: multimae_eo
          backbone_ckpt_path: output/demo/export            # a folder of tools/export_encoder.py
          backbone_in_domains: [s2_rgb, s2_nir, s1]         # any subset of the exported domains
          backbone_bands: {S2L2A: [B02, B03, B04, B08, B8A], S1RTC: [asc_VV, asc_VH]}
          ...

The module must be imported before TerraTorch builds the model: run TerraTorch's command line through it
(``python -m multimae.terratorch_backbone fit -c CONFIG``), import it yourself (``import
multimae.terratorch_backbone``), or give TerraTorch's ``custom_modules_path`` a package folder whose
``__init__.py`` imports it (TerraTorch imports that package). ``multimae`` itself does not import it (TerraTorch
is an optional extra). ``cfgs/terratorch/terramesh_lulc.yaml`` is a complete example.

The backbone returns one feature map per chosen block (TerraTorch's ``out_channels`` convention): the patch
tokens of every input domain after that block, each domain's (B, D, h, w) grid, concatenated over domains
(``merge="concat"``: C = n_domains * D) or averaged (``merge="mean"``: C = D). The global tokens (last in the
sequence) and the metadata tokens of an encoder with ``model.metadata`` are in no map (they take part in the
attention), so TerraTorch necks that expect a class token first (``ReshapeTokensToImage``) are not needed. Such an
encoder reads a ``metadata`` batch entry ({field: (B, 2)} (sin, cos) pairs, which TerraTorch's tasks pass on as a
keyword argument) and uses its learned missing embeddings without one. The load-balance loss of mixture-of-experts
blocks (``model.ffn`` ``moe``) is not part of TerraTorch's loss: the experts are fine-tuned without it. Inputs must be normalised as the export's ``config.json`` says (TerraTorch's datamodules do it with
``means`` / ``stds``; :func:`terratorch_means_stds` gives them); pixels without data must be 0 after normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY
from torch import nn

from multimae.domains import DOMAINS, canonical_band_name
from multimae.encoder import MultiModalEncoder
from multimae.pretrained import load_pretrained, read_pretrained_config

__all__ = ["MultiMAEBackbone", "multimae_eo", "terratorch_means_stds"]

#: The TerraTorch input forms: a tensor (B, C, H, W), or a dict {key: (B, C, H, W)} (multi-modal datamodules).
Inputs = torch.Tensor | dict[str, torch.Tensor]


def _band_plan(in_domains: Sequence[str], bands: list[str] | dict[str, list[str]] | None
               ) -> dict[str, list[tuple[str | None, list[int] | None]]]:
    """Where each domain's bands are in the input: {domain: [(input key or None for a tensor, channels or None)]}.

    Raises:
        ValueError: a domain band the input does not name, or names in two keys.
    """
    plan = {}
    if bands is None:
        offset = 0
        for d in in_domains:
            n = len(DOMAINS[d].bands)
            # A dict input holds the domain under its own name; a tensor its bands, domain after domain.
            plan[d] = [(d, None), (None, list(range(offset, offset + n)))]
            offset += n
        return plan
    named = {None: list(bands)} if isinstance(bands, list) else {k: list(v) for k, v in bands.items()}
    for d in in_domains:
        dom, pieces = DOMAINS[d], []
        for band in dom.bands:
            where = [(key, i) for key, names in named.items() for i, name in enumerate(names)
                     if canonical_band_name(dom.modality, str(name)) == band]
            if not where:
                raise ValueError(f"backbone_bands: no input channel is named {band!r}, a band of domain {d!r} "
                                 f"({', '.join(dom.bands)}); the input names {bands}")
            if len({key for key, _ in where}) > 1:
                raise ValueError(f"backbone_bands: band {band!r} of domain {d!r} is named in several inputs "
                                 f"({', '.join(str(k) for k, _ in where)})")
            pieces.append((where[0][0], [where[0][1]]))
        plan[d] = pieces
    return plan


class MultiMAEBackbone(nn.Module):
    """A :class:`~multimae.encoder.MultiModalEncoder` with TerraTorch's backbone interface.

    Args:
        encoder: The encoder (e.g. from :func:`multimae.pretrained.load_pretrained`).
        bands: How the input's channels map to the encoder's domains. None: the input is a dict
            ``{domain: (B, C, H, W)}`` with each domain's bands in the encoder's order, or a tensor holding the
            domains' bands one domain after another (in ``in_domains`` order). A list of band names (registry
            names, e.g. ``B04``, ``asc_VV``): the names of a tensor input's channels in order. A dict
            ``{key: [band names]}``: the names of the channels of each entry of a dict input. Each domain takes
            its bands by name, in its own order; channels no domain uses are ignored.
        out_indices: Blocks whose output is returned (default: every block); negative counts from the end.
        merge: ``concat`` (C = n_domains * D) or ``mean`` (C = D) of the domains' token grids.

    Attributes:
        out_channels: Channels C of each returned map (TerraTorch reads it).
        patch_size: The patch size of every domain (TerraTorch pads inputs to a multiple of it).

    Raises:
        ValueError: domains with different patch sizes (their grids differ), a bad ``out_indices`` entry or
            ``merge``, or a ``bands`` mapping that lacks a domain's band.
    """

    def __init__(self, encoder: MultiModalEncoder, *, bands: list[str] | dict[str, list[str]] | None = None,
                 out_indices: Sequence[int] | None = None, merge: str = "concat") -> None:
        super().__init__()
        sizes = {encoder.patch_sizes[d] for d in encoder.in_domains}
        if len(sizes) > 1:
            raise ValueError(f"backbone_in_domains: domains with different patch sizes {encoder.patch_sizes} have "
                             "different token grids; choose domains of one patch size")
        if merge not in ("concat", "mean"):
            raise ValueError(f"backbone_merge: expected 'concat' or 'mean', got {merge!r}")
        depth = len(encoder.blocks)
        indices = list(range(depth)) if out_indices is None else [int(i) for i in out_indices]
        bad = [i for i in indices if not -depth <= i < depth]
        if bad or not indices:
            raise ValueError(f"backbone_out_indices: {list(out_indices or [])} must be block indices in "
                             f"{-depth}..{depth - 1}")
        self.encoder = encoder
        self.out_indices = sorted({i % depth for i in indices})
        self.merge = merge
        self.bands = bands
        self._plan = _band_plan(encoder.in_domains, bands)
        width = encoder.dim * (len(encoder.in_domains) if merge == "concat" else 1)
        self.out_channels = [width] * len(self.out_indices)
        self.patch_size = sizes.pop()

    def domain_inputs(self, x: Inputs) -> dict[str, torch.Tensor]:
        """The encoder's ``{domain: tensor}`` inputs from a TerraTorch input (see ``bands``).

        Class-map domains take their one channel as int64 class ids.

        Raises:
            ValueError: the input lacks a key or has another channel count than ``bands`` names.
        """
        if isinstance(x, dict):
            x = {k: v for k, v in x.items()}
        elif self.bands is not None and not isinstance(self.bands, list):
            raise ValueError(f"backbone_bands names the entries of a dict input ({', '.join(self.bands)}); got a tensor")
        if not isinstance(x, dict) and isinstance(self.bands, list) and x.shape[1] != len(self.bands):
            raise ValueError(f"input has {x.shape[1]} channels, backbone_bands names {len(self.bands)}")
        inputs = {}
        for d, pieces in self._plan.items():
            if self.bands is None:
                (key, _), (_, channels) = pieces
                if isinstance(x, dict):
                    if key not in x:
                        raise ValueError(f"input has no entry {d!r} (inputs: {', '.join(x)}); set backbone_bands "
                                         "to name the channels of other keys")
                    t = x[key]
                else:
                    expected = sum(len(DOMAINS[name].bands) for name in self._plan)
                    if x.shape[1] != expected:
                        raise ValueError(f"input has {x.shape[1]} channels; the bands of {', '.join(self._plan)} "
                                         f"are {expected} (set backbone_bands to name them)")
                    t = x[:, channels]
            else:
                parts = []
                for key, channels in pieces:
                    src = x if key is None else x.get(key) if isinstance(x, dict) else None
                    if src is None:
                        raise ValueError(f"input has no entry {key!r} that backbone_bands names")
                    parts.append(src[:, channels])
                t = torch.cat(parts, dim=1)
            if DOMAINS[d].kind == "categorical":
                t = t[:, 0] if t.ndim == 4 else t
                t = (t.round() if t.is_floating_point() else t).long()
            inputs[d] = t
        return inputs

    def forward(self, x: Inputs, metadata: dict[str, torch.Tensor] | None = None, **kwargs) -> list[torch.Tensor]:
        """Feature maps of the chosen blocks.

        Args:
            x: A tensor (B, C, H, W) or a dict {key: (B, C, H, W)}, normalised (see the module docstring).
            metadata: {field: float (B, 2)} (sin, cos) pairs, NaN where absent, for an encoder with metadata
                tokens (ignored by one without); None: the learned missing embeddings.
            **kwargs: Other batch entries TerraTorch passes along; unused.

        Returns:
            One (B, C, H / P, W / P) map per entry of ``out_indices``, from the grid tokens only.
        """
        tok = self.encoder.tokenize(self.domain_inputs(x), metadata=metadata)
        b = tok.tokens.shape[0]
        z = torch.cat([tok.tokens, self.encoder.global_tokens.expand(b, -1, -1).to(tok.tokens.dtype)], dim=1)
        out = []
        for i, block in enumerate(self.encoder.blocks):
            z = block(z)
            if i in self.out_indices:
                grids = [z[:, seg.slice].reshape(b, *seg.grid, -1).permute(0, 3, 1, 2)
                         for seg in tok.layout.grid_segments()]
                out.append(torch.cat(grids, dim=1) if self.merge == "concat" else torch.stack(grids).mean(0))
        return out


@TERRATORCH_BACKBONE_REGISTRY.register
def multimae_eo(ckpt_path: str, in_domains: Sequence[str] | None = None,
                bands: list[str] | dict[str, list[str]] | None = None, out_indices: Sequence[int] | None = None,
                merge: str = "concat", pretrained: bool = True, input_size: int | None = None,
                padding: str | None = None) -> MultiMAEBackbone:
    """TerraTorch factory (``backbone: multimae_eo``, arguments ``backbone_<name>``) of an exported encoder.

    Args:
        ckpt_path: The export folder (tools/export_encoder.py).
        in_domains: Input domains, a subset of the exported ones (default: all).
        bands: The input's band names (see :class:`MultiMAEBackbone`).
        out_indices: Blocks whose outputs are returned (default: all).
        merge: ``concat`` or ``mean`` of the domains' token grids.
        pretrained: False builds the exported architecture at its initialisation (a from-scratch baseline).
        input_size: Image side the position embeddings are built for (other sizes work too).
        padding: Read by TerraTorch's model (its padding mode), not by the backbone.

    Raises:
        FileNotFoundError, ValueError: see :func:`multimae.pretrained.load_pretrained` and :class:`MultiMAEBackbone`.
    """
    if pretrained:
        encoder = load_pretrained(ckpt_path, in_domains=in_domains, input_size=input_size)
    else:
        spec = read_pretrained_config(ckpt_path)["architecture"]
        encoder = MultiModalEncoder.from_spec(spec, in_domains=in_domains, input_size=input_size)
    return MultiMAEBackbone(encoder.train(), bands=bands, out_indices=out_indices, merge=merge)


def terratorch_means_stds(ckpt_path: str | Path, bands: dict[str, list[str]], stats_keys: Sequence[str] = ()
                          ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``means`` / ``stds`` for a TerraTorch multi-modal datamodule, from an export's normalisation statistics.

    Args:
        ckpt_path: The export folder.
        bands: {input key: band names of its channels} (the backbone's ``bands``).
        stats_keys: Which statistics to use where a domain has several (Sentinel-2: ``sentinel2_l1c`` or
            ``sentinel2_l2a``, the product of the input data).

    Returns:
        ``(means, stds)``: {input key: per channel}; channels no exported domain uses get mean 0, std 1.

    Raises:
        ValueError: a domain normalised per tile or with several statistics and none chosen in ``stats_keys``.
    """
    config = read_pretrained_config(ckpt_path)
    per_band: dict[tuple[str, str], tuple[float, float]] = {}  # (modality, band) -> (mean, std)
    for d, record in config["domains"].items():
        if record["kind"] != "continuous":
            continue
        if record["normalization"] != "band_stats":
            raise ValueError(f"{ckpt_path}: domains.{d}.normalization is {record['normalization']!r}; TerraTorch's "
                             "per-channel means / stds cannot reproduce it")
        keys = [k for k in record["stats"] if k in stats_keys] or list(record["stats"])
        if len(keys) != 1:
            raise ValueError(f"{ckpt_path}: domains.{d}.stats has {', '.join(keys)}; choose one with stats_keys")
        st = record["stats"][keys[0]]
        for band, mean, std in zip(record["bands"], st["mean"], st["std"]):
            per_band[record["modality"], band] = (mean, std)

    def stats(name: str) -> tuple[float, float]:
        found = [v for (modality, band), v in per_band.items() if canonical_band_name(modality, str(name)) == band]
        return found[0] if found else (0.0, 1.0)

    means = {key: [stats(n)[0] for n in names] for key, names in bands.items()}
    stds = {key: [stats(n)[1] for n in names] for key, names in bands.items()}
    return means, stds


if __name__ == "__main__":
    # ``python -m multimae.terratorch_backbone fit -c cfgs/terratorch/terramesh_lulc.yaml``: TerraTorch's command
    # line with the backbone registered.
    from terratorch.__main__ import main

    main()
