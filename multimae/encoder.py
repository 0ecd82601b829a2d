"""The multi-modal encoder every objective trains: input adapters, token layout, global tokens, timm blocks.

Bachmann et al., "MultiMAE: Multi-modal Multi-task Masked Autoencoders", ECCV 2022, as applied to MMEarth by
Sosa et al., "MultiMAE Meets Earth Observation", ICIP 2025; the same encoder serves the other objectives of
:mod:`multimae.objectives`. One pass:

1. :meth:`MultiModalEncoder.tokenize`: every input domain's pixels become N_d tokens (:mod:`multimae.adapters`)
   with a fixed sin-cos position embedding (and, optionally, a learned per-domain embedding), concatenated
   in ``in_domains`` order into N = sum N_d tokens; the :class:`~multimae.layout.TokenLayout` says which
   token is where. Each domain may have its own patch size; ``patch_size=P`` runs every domain at P px with
   the same weights (kernels resized as in FlexiViT, positions in ground distance; :mod:`multimae.adapters`).
2. An objective chooses which tokens the encoder sees (masking is the objective's business).
3. :meth:`MultiModalEncoder.encode_visible`: the chosen K tokens plus G learned global tokens (appended
   **last**) pass through ``depth`` timm ViT blocks (fused ``scaled_dot_product_attention``, stochastic
   depth linear over depth, no final norm, as in the reference). :meth:`MultiModalEncoder.encode` does
   1 and 3 with every token visible (fine-tuning, probes, pictures).

Parameter names: ``input_adapters.<domain>.*``, ``blocks.<i>.*`` (timm's ``blocks.<i>.*``), ``global_tokens``,
with ``domain_embed`` ``domain_embeds.<domain>``, with ``metadata`` ``metadata_adapter.*``. Position embeddings
are non-persistent buffers.

The feed-forward of every block is pluggable (timm ``Block(mlp_layer=...)``): :data:`FFN_LAYERS` maps a
name to a factory (``moe``: :mod:`multimae.moe`); a feed-forward module may set an ``aux_loss`` attribute
during its forward (e.g. a mixture-of-experts load-balance loss), which :meth:`MultiModalEncoder.pop_aux_loss`
collects for the objective's total. ``kv_groups`` switches the attention to grouped-query attention
(:class:`multimae.moe.GroupedQueryAttention`).

Metadata tokens (``metadata``, :mod:`multimae.metadata`): one token per image-level field (latitude, time of
year, ...), appended after the patch tokens as non-grid segments of the layout, always visible: objectives mask
the grid segments only (:func:`patch_layout`) and pass the metadata positions to :meth:`encode_visible` with
the visible patches.

No-data handling: pixels where ``valid`` is False are set to 0 (continuous) or ``IGNORE_INDEX`` (class
maps) before the adapters, so their stored values cannot change any output; token validity (a patch with at
least one valid pixel) goes to the objective with the tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from multimae.adapters import CategoricalAdapter, PatchAdapter, patch_validity
from multimae.domains import DOMAINS, IGNORE_INDEX, Domain
from multimae.layout import TokenLayout
from multimae.metadata import MetadataAdapter
from multimae.moe import gqa_layer, moe_feed_forward

__all__ = ["FFN_LAYERS", "MultiModalEncoder", "Tokens", "init_linear_layers", "resolve_domain", "resolve_domains", "patch_layout",
           "pop_block_aux_loss"]

#: Feed-forward kinds of the encoder blocks: name -> factory(options, block index, depth) -> ``mlp_layer``
#: for timm's ``Block`` (called as ``mlp_layer(in_features=, hidden_features=, act_layer=, ...)``).
FFN_LAYERS: dict[str, Callable[[dict, int, int], Callable[..., nn.Module]]] = {
    "mlp": lambda options, index, depth: Mlp,
    "moe": moe_feed_forward,
}

#: Keys of :attr:`MultiModalEncoder.spec`, the architecture a checkpoint stores to rebuild the encoder.
SPEC_KEYS = ("in_domains", "input_size", "patch_size", "patch_sizes", "dim", "depth", "num_heads", "mlp_ratio",
             "num_global_tokens", "domain_embed", "class_embed_dim", "gsd", "ffn", "ffn_options", "pos_embed_grid",
             "kv_groups", "metadata")
#: Spec keys added after the first checkpoints were written, with the value those checkpoints imply.
_SPEC_DEFAULTS = {"pos_embed_grid": None, "kv_groups": None, "metadata": []}


def resolve_domain(name: str, key: str) -> Domain:
    """Look a pixel-level domain up in the registry; ``key`` names the config field for the error message.

    Raises:
        ValueError: unknown domain (the message lists the known ones), or not a pixel-level continuous or
            categorical map.
    """
    if name not in DOMAINS:
        raise ValueError(f"{key}: unknown domain {name!r}; known domains: {', '.join(DOMAINS)}")
    dom = DOMAINS[name]
    if dom.level != "pixel" or dom.kind not in ("continuous", "categorical"):
        raise ValueError(f"{key}: domain {name!r} is not a pixel-level continuous or categorical map")
    return dom


def resolve_domains(names, key: str, *, empty: str | None = "", output_only: bool = True) -> list[Domain]:
    """:func:`resolve_domain` for each name of a config list, which must not repeat a domain.

    Args:
        names: Domain names in config order.
        key: The config field, for the error messages.
        empty: None: an empty list is allowed; else it is refused, with this text appended to the message.
        output_only: Whether output-only domains (targets derived from another domain) may be listed.

    Raises:
        ValueError: an empty list (unless allowed), a repeated, unknown or non-pixel domain, or an output-only
            one where they are not allowed.
    """
    names = list(names)
    if not names and empty is not None:
        raise ValueError(f"{key} is empty{empty}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key} lists a domain twice: {names}")
    domains = [resolve_domain(name, key) for name in names]
    for dom in domains:
        if dom.is_output_only and not output_only:
            raise ValueError(f"{key}: {dom.name!r} is output-only (a target derived from {dom.source!r})")
    return domains


def init_linear_layers(module: nn.Module) -> None:
    """MAE / MultiMAE initialisation of every ``nn.Linear`` inside ``module``, in ``named_modules`` order.

    Xavier-uniform per sub-matrix: a fused ``qkv`` projection counts as 3 matrices and a fused ``kv`` as 2
    (their fan-out is divided accordingly), biases are zeroed.
    """
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        fan_out, fan_in = sub.weight.shape
        parts = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") or name == "kv" else 1
        bound = (6.0 / (fan_out / parts + fan_in)) ** 0.5
        nn.init.uniform_(sub.weight, -bound, bound)
        if sub.bias is not None:
            nn.init.zeros_(sub.bias)


def patch_layout(layout: TokenLayout) -> TokenLayout:
    """The layout of the patch tokens only: ``layout`` without its non-grid (metadata) segments.

    The encoder lays every grid segment before the metadata segments, so the patch tokens are the first
    ``patch_layout(layout).num_tokens`` of the sequence and their positions are unchanged.
    """
    grid = tuple(s for s in layout.segments if s.is_grid)
    return TokenLayout(grid, layout.num_global_tokens, layout.base_patch_size, layout.image_size)


def pop_block_aux_loss(blocks) -> torch.Tensor | None:
    """Sum of the ``aux_loss`` tensors the feed-forward modules (``block.mlp``) of ``blocks`` set in their last
    forward, or None; each collected attribute is reset to None, so a loss is counted once."""
    total = None
    for block in blocks:
        loss = getattr(block.mlp, "aux_loss", None)
        if loss is not None:
            total = loss if total is None else total + loss
            block.mlp.aux_loss = None
    return total


@dataclass
class Tokens:
    """The output of :meth:`MultiModalEncoder.tokenize`.

    Attributes:
        tokens: (B, N, D) patch tokens of every input domain with their position (and domain) embeddings,
            in layout order, then the metadata tokens (always valid).
        valid: bool (B, N), True where a token's patch holds at least one valid pixel; None when the batch
            carried no validity masks (every token valid).
        layout: Where each domain's tokens are (:class:`~multimae.layout.TokenLayout`).
        patch_embeds: (B, N, D) the adapters' patch embeddings alone, before the position and domain
            embeddings are added (per-modality tokens for contrastive terms); ``tokens - patch_embeds`` is what
            was added.
    """

    tokens: torch.Tensor
    valid: torch.Tensor | None
    layout: TokenLayout
    patch_embeds: torch.Tensor | None = None


class MultiModalEncoder(nn.Module):
    """Input adapters + shared ViT encoder over the tokens of several domains.

    Args:
        in_domains: Input domains (registry names), in token order.
        input_size: Image side in pixels the position-embedding buffers are built for (other sizes divisible
            by every patch size work too).
        patch_size: Base patch side p0 in pixels: the patch size of every domain not in ``patch_sizes`` and
            the unit of token positions.
        patch_sizes: Per-domain patch sizes ``{domain: px}`` that differ from ``patch_size``.
        dim: Token width D.
        depth: Encoder blocks.
        num_heads: Attention heads.
        mlp_ratio: Feed-forward hidden width / D.
        num_global_tokens: Learnable global tokens G appended after the patch tokens.
        drop_path: Stochastic depth rate of the last block (linear from 0 over the blocks).
        domain_embed: Add a learned per-domain embedding to input tokens (off = reference).
        class_embed_dim: Class-embedding width of categorical input adapters.
        gsd: Ground sample distance of the input pixels in metres (10 for MMEarth); recorded in the layout.
        ffn: Feed-forward kind of the blocks, a key of :data:`FFN_LAYERS`.
        ffn_options: Options of that feed-forward kind.
        pos_embed_grid: None: sin-cos position embeddings of the patch centres. A grid (tokens per side): the
            sin-cos table of that grid resized to each token grid (MultiMAE's convention, e.g. 28 for its 224 px
            tables at patch 8; bicubic for image adapters, bilinear for class maps); needs one patch size.
        kv_groups: None: multi-head attention (timm's). A divisor of ``num_heads``: grouped-query attention with
            that many key / value heads.
        metadata: Metadata fields (:data:`multimae.metadata.METADATA_FIELDS`), one always-visible token each.
        init_weights: Initialise the weights now (:meth:`init_weights`). An objective that builds further
            modules first passes False and calls :meth:`init_weights` itself, so the initialisation order
            of the whole model is fixed by the objective.

    Raises:
        ValueError: On unknown, duplicate or output-only domains, a patch size that does not divide the input
            size, an unknown feed-forward kind or invalid options of it, ``kv_groups`` not dividing ``num_heads``,
            or an unknown metadata field (the message names the config key).
    """

    def __init__(
        self,
        *,
        in_domains: Sequence[str],
        input_size: int,
        patch_size: int = 8,
        patch_sizes: dict[str, int] | None = None,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_global_tokens: int = 1,
        drop_path: float = 0.0,
        domain_embed: bool = False,
        class_embed_dim: int = 64,
        gsd: float | None = 10.0,
        ffn: str = "mlp",
        ffn_options: dict | None = None,
        pos_embed_grid: int | None = None,
        kv_groups: int | None = None,
        metadata: Sequence[str] = (),
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        in_domains = list(in_domains)
        resolve_domains(in_domains, "in_domains", output_only=False)
        patch_sizes = dict(patch_sizes or {})
        for name, p in patch_sizes.items():
            if not isinstance(p, int) or isinstance(p, bool) or p < 1:
                raise ValueError(f"model.patch_sizes.{name}: expected a positive number of pixels, got {p!r}")
        if num_global_tokens < 1:
            raise ValueError(f"model.num_global_tokens must be >= 1, got {num_global_tokens}")
        if ffn not in FFN_LAYERS:
            raise ValueError(f"model.ffn: unknown feed-forward kind {ffn!r}; choose one of {', '.join(FFN_LAYERS)}")
        self.in_domains = in_domains
        self.input_size = input_size
        self.patch_size = patch_size
        self.patch_sizes = {d: patch_sizes.get(d, patch_size) for d in in_domains}
        for name, p in self.patch_sizes.items():
            if input_size % p != 0:
                key = f"model.patch_sizes.{name}" if name in patch_sizes else "model.patch_size"
                raise ValueError(f"data.input_size {input_size} is not divisible by {key} {p}")
        self.dim = dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_global_tokens = num_global_tokens
        self.domain_embed = domain_embed
        self.class_embed_dim = class_embed_dim
        self.gsd = gsd
        self.ffn, self.ffn_options = ffn, dict(ffn_options or {})
        if pos_embed_grid is not None and (patch_sizes or pos_embed_grid < 1):
            raise ValueError("model.pos_embed_grid (resized base-grid tables) needs a positive grid and one patch size "
                             f"for every domain; got {pos_embed_grid} with model.patch_sizes {patch_sizes}")
        self.pos_embed_grid = pos_embed_grid
        if kv_groups is not None and (kv_groups < 1 or num_heads % kv_groups):
            raise ValueError(f"model.kv_groups {kv_groups} must be a positive divisor of the {num_heads} attention heads")
        self.kv_groups = kv_groups
        self._extra_patch_sizes = {d: p for d, p in patch_sizes.items() if d not in in_domains}

        self.input_adapters = nn.ModuleDict()
        for name in in_domains:
            dom = DOMAINS[name]
            p = self.patch_sizes[name]
            if dom.kind == "categorical":
                self.input_adapters[name] = CategoricalAdapter(
                    name, dom.num_classes, dim, patch_size=p, input_size=input_size,
                    label_downsample=dom.label_downsample, class_embed_dim=class_embed_dim, base_patch_size=patch_size,
                    pos_embed_grid=pos_embed_grid,
                )
            else:
                self.input_adapters[name] = PatchAdapter(
                    name, dom.num_channels, dim, patch_size=p, input_size=input_size, base_patch_size=patch_size,
                    pos_embed_grid=pos_embed_grid,
                )
        self.domain_embeds = (
            nn.ParameterDict([(d, nn.Parameter(torch.zeros(1, 1, dim))) for d in in_domains]) if domain_embed else None
        )
        self.metadata_adapter = MetadataAdapter(metadata, dim) if metadata else None
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        attn = {} if kv_groups is None else {"attn_layer": gqa_layer(kv_groups)}
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), **attn,
                  mlp_layer=FFN_LAYERS[ffn](self.ffn_options, i, depth))
            for i, rate in enumerate(rates)
        )
        if init_weights:
            self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    @property
    def spec(self) -> dict[str, Any]:
        """The architecture as plain types: everything :meth:`from_spec` needs to rebuild this encoder."""
        return {
            "in_domains": list(self.in_domains), "input_size": self.input_size, "patch_size": self.patch_size,
            "patch_sizes": {d: p for d, p in self.patch_sizes.items() if p != self.patch_size},
            "dim": self.dim, "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
            "num_global_tokens": self.num_global_tokens, "domain_embed": self.domain_embed,
            "class_embed_dim": self.class_embed_dim, "gsd": self.gsd, "ffn": self.ffn,
            "ffn_options": dict(self.ffn_options), "pos_embed_grid": self.pos_embed_grid,
            "kv_groups": self.kv_groups, "metadata": list(self.metadata_fields),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, in_domains: Sequence[str] | None = None, input_size: int | None = None,
                  drop_path: float = 0.0, init_weights: bool = True) -> "MultiModalEncoder":
        """Rebuild an encoder from :attr:`spec`, optionally for other input domains or another image size.

        Domains not in the spec get adapters of the spec's settings (the base patch size unless the spec
        names one for them).

        Raises:
            ValueError: the spec lacks a key (it names the key) or holds an invalid value.
        """
        spec = {**_SPEC_DEFAULTS, **spec}
        missing = [k for k in SPEC_KEYS if k not in spec]
        if missing:
            raise ValueError(f"encoder spec lacks {', '.join(missing)} (not an encoder of this code base?)")
        kwargs = {k: spec[k] for k in SPEC_KEYS}
        if in_domains is not None:
            kwargs["in_domains"] = list(in_domains)
        kwargs["patch_sizes"] = {d: p for d, p in spec["patch_sizes"].items() if d in kwargs["in_domains"]}
        if input_size is not None:
            kwargs["input_size"] = input_size
        return cls(**kwargs, drop_path=drop_path, init_weights=init_weights)

    def init_weights(self) -> None:
        """MAE / MultiMAE initialisation: trunc-normal (std 0.02) global tokens and domain embeddings, then
        xavier-uniform Linear layers of the blocks (:func:`init_linear_layers`); adapters initialise themselves."""
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        if self.domain_embeds is not None:
            for p in self.domain_embeds.values():
                nn.init.trunc_normal_(p, std=0.02)
        init_linear_layers(self)
        if self.metadata_adapter is not None:
            self.metadata_adapter.init_missing()

    @property
    def metadata_fields(self) -> list[str]:
        """Metadata fields of the metadata tokens, in token order (empty without metadata tokens)."""
        return [] if self.metadata_adapter is None else list(self.metadata_adapter.fields)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: tokens and embeddings (position embeddings are buffers)."""
        names = {"global_tokens"}
        for name, _ in self.named_parameters():
            if (name.startswith(("domain_embeds.", "metadata_adapter.missing.")) or
                    name.endswith(".class_embed.weight")):
                names.add(name)
        return names

    # ------------------------------------------------------------------ layout and tokens
    def layout(self, image_size: tuple[int, int] | int | None = None, patch_size: int | None = None) -> TokenLayout:
        """The token layout of an input of ``image_size`` (H, W) pixels (default: ``input_size``), with every
        domain at ``patch_size`` px when given (default: each domain's own patch size).

        Raises:
            ValueError: a side not divisible by a domain's patch size.
        """
        if image_size is None:
            image_size = self.input_size
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        entries = []
        for name in self.in_domains:
            p = self.patch_sizes[name] if patch_size is None else patch_size
            if h % p or w % p:
                raise ValueError(f"domain {name!r}: image size {h} x {w} px is not divisible by its patch size {p}")
            entries.append((name, (h // p) * (w // p), (h // p, w // p), p, self.gsd))
        entries += [(field, 1, None, None, None) for field in self.metadata_fields]
        return TokenLayout.build(entries, num_global_tokens=self.num_global_tokens, base_patch_size=self.patch_size,
                                 image_size=(h, w))

    def patch_size_of(self, domain: str) -> int:
        """Patch size of ``domain``: its adapter's, a ``model.patch_sizes`` entry, or the base patch size.

        Decode-only domains of an objective use this too, so their grids follow the config.
        """
        return self.patch_sizes.get(domain, self._extra_patch_sizes.get(domain, self.patch_size))

    def _check_inputs(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None) -> None:
        shapes, first = {}, None
        for name in self.in_domains:
            if name not in inputs:
                raise ValueError(f"batch has no input domain {name!r} (in_domains: {self.in_domains})")
            x = inputs[name]
            if DOMAINS[name].kind == "continuous" and not x.is_floating_point():
                raise ValueError(f"domain {name!r}: expected a float tensor (B, C, H, W), got {x.dtype}")
            shapes[name] = tuple(x.shape[-2:]) + (x.shape[0],)
            first = shapes[name] if first is None else first
            if valid is not None and name in valid:
                expected = (x.shape[0], *x.shape[-2:])
                if tuple(valid[name].shape) != expected or valid[name].dtype != torch.bool:
                    raise ValueError(
                        f"valid[{name!r}] must be bool {expected}, got {valid[name].dtype} {tuple(valid[name].shape)}"
                    )
        # Compared one by one, not through a set: traced shapes hash by identity (ONNX export).
        if any(shape != first for shape in shapes.values()):
            raise ValueError(f"input domains differ in batch size or image size (H, W, B): {shapes}")

    def tokenize(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, torch.Tensor] | None = None, patch_size: int | None = None) -> Tokens:
        """Embed every input domain (and the metadata, when the encoder has metadata tokens).

        Args:
            inputs: {domain: float (B, C, H, W) z-scored, or int64 class map (B, H, W)} for every in_domain;
                other keys are ignored.
            valid: Optional {domain: bool (B, H, W)}, True where the pixel is valid.
            metadata: Optional {field: float (B, 2) (sin, cos)}, NaN where absent (batch key ``metadata``); an
                absent field or pair gets the field's learned missing embedding. Ignored without metadata tokens.
            patch_size: One patch side P in pixels for every domain instead of each domain's own: the same
                weights at another scale (the adapters resize their projection kernels, :mod:`multimae.adapters`;
                positions stay patch centres in base-patch units, i.e. ground distance).

        Returns:
            :class:`Tokens`: (B, N, D) tokens, (B, N) token validity (or None), the layout and the (B, N, D)
            patch embeddings without position and domain embeddings.

        Raises:
            ValueError: a missing domain, a wrong channel count, dtype or image size, or a patch size that does
                not divide the image or a class map's ``label_downsample`` cell.
        """
        self._check_inputs(inputs, valid)
        tokens, token_valid, embeds = [], [], []
        for name in self.in_domains:
            x, v = inputs[name], None if valid is None else valid.get(name)
            if DOMAINS[name].kind == "categorical":
                if v is not None:
                    x = torch.where(v, x, IGNORE_INDEX)
                v = x != IGNORE_INDEX  # no-data pixels, whether marked in the map or by valid
            elif v is not None:
                x = torch.where(v.unsqueeze(1), x, 0.0)
            adapter = self.input_adapters[name]
            e, grid = adapter.embed(x, patch_size)  # (B, N_d, D); checks channels, dtype, size, patch size
            t = adapter.add_position(e, grid, patch_size)
            if self.domain_embeds is not None:
                t = t + self.domain_embeds[name]
            tokens.append(t)
            embeds.append(e)
            token_valid.append(None if v is None else patch_validity(v, patch_size or self.patch_sizes[name]))
        h, w = inputs[self.in_domains[0]].shape[-2:]
        layout = self.layout((h, w), patch_size)
        if self.metadata_adapter is not None:
            meta = self.metadata_adapter(metadata, tokens[0].shape[0]).to(tokens[0].dtype)
            tokens.append(meta)
            embeds.append(meta)  # no position to remove: the metadata tokens as they are
            token_valid.append(None)
        if any(tv is not None for tv in token_valid):
            b = tokens[0].shape[0]
            token_valid = [torch.ones(b, seg.num_tokens, dtype=torch.bool, device=tokens[0].device) if tv is None
                           else tv for tv, seg in zip(token_valid, layout.segments)]
            all_valid = torch.cat(token_valid, dim=1)
        else:
            all_valid = None
        return Tokens(torch.cat(tokens, dim=1), all_valid, layout, torch.cat(embeds, dim=1))

    # ------------------------------------------------------------------ transformer
    def forward_blocks(self, tokens: torch.Tensor, keep_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append the global tokens and run the blocks: (B, K, D) -> (B, K + G, D).

        ``keep_valid`` (bool (B, K), optional): False marks padding, which no token attends to (the global
        tokens always take part); the outputs at padding are meaningless.
        """
        b = tokens.shape[0]
        x = torch.cat([tokens, self.global_tokens.expand(b, -1, -1).to(tokens.dtype)], dim=1)
        mask = None
        if keep_valid is not None:  # (B, 1, 1, K + G): True = a key every query may attend to
            keep = torch.ones(b, self.num_global_tokens, dtype=torch.bool, device=tokens.device)
            mask = torch.cat([keep_valid.bool(), keep], dim=1)[:, None, None, :]
        for block in self.blocks:
            x = block(x) if mask is None else block(x, attn_mask=mask)
        return x

    def encode_visible(self, tokens: torch.Tensor, ids_keep: torch.Tensor,
                       keep_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the chosen tokens of each sample.

        Args:
            tokens: (B, N, D) from :meth:`tokenize`.
            ids_keep: int64 (B, K), positions (0..N-1) of the tokens each sample shows the encoder, in the
                order they are fed (see :func:`multimae.masking.mask_to_ids`).
            keep_valid: Optional bool (B, K) for samples that show different numbers of tokens: False marks
                padding entries of ``ids_keep``, hidden from attention (their outputs are meaningless).

        Returns:
            (B, K + G, D): the K encoded tokens in ``ids_keep`` order, then the G global tokens.
        """
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, K, D)
        return self.forward_blocks(visible, keep_valid)

    def encode(self, inputs: dict[str, torch.Tensor], *, valid: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, torch.Tensor] | None = None, patch_size: int | None = None) -> torch.Tensor:
        """Encode every token of every input domain (no masking): fine-tuning, probes, pictures.

        Args:
            inputs: {domain: float (B, C, H, W) or int64 class map (B, H, W)} for every in_domain.
            valid: Optional {domain: bool (B, H, W)}; invalid pixels are filled before embedding.
            metadata: Optional {field: float (B, 2)} (see :meth:`tokenize`).
            patch_size: One patch side for every domain (see :meth:`tokenize`); default each domain's own.

        Returns:
            (B, N + G, D): the tokens of each input domain in layout order (each row-major over its grid), the
            metadata tokens, then the G global tokens **last**.
        """
        return self.forward_blocks(self.tokenize(inputs, valid, metadata, patch_size).tokens)

    def forward(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None,
                metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(inputs, valid=valid, metadata=metadata)

    def pop_aux_loss(self) -> torch.Tensor | None:
        """Sum of the ``aux_loss`` tensors the blocks' feed-forward modules set in the last forward, or None
        (:func:`pop_block_aux_loss`)."""
        return pop_block_aux_loss(self.blocks)
