"""MultiMAE for Earth observation: domain adapters, one shared ViT encoder, per-domain decoders.

Bachmann et al., "MultiMAE: Multi-modal Multi-task Masked Autoencoders", ECCV 2022, as applied to
MMEarth by Sosa et al., "MultiMAE Meets Earth Observation", ICIP 2025. One forward pass:

1. Every input domain's pixels become N_d tokens (:mod:`multimae.adapters`) with a fixed sin-cos
   position embedding (and, optionally, a learned per-domain embedding). Tokens are concatenated
   in ``in_domains`` order: N = n * N_d tokens.
2. A Dirichlet token-budget mask keeps K of the N tokens visible (:mod:`multimae.masking`).
3. The K visible tokens plus G learned global tokens (appended **last**) pass through ``depth``
   timm ViT blocks (fused ``scaled_dot_product_attention``, stochastic depth linear over depth,
   no final norm, as in the reference).
4. One cross-attention decoder per output domain reconstructs it (:mod:`multimae.decoders`).

Parameter names: ``input_adapters.<domain>.*``, ``encoder.<i>.*`` (same as timm's ``blocks.<i>.*``),
``global_tokens``, ``output_adapters.<domain>.*`` and, with ``domain_embed``, ``domain_embeds.*``.
Position embeddings are non-persistent buffers, not in the state dict.

No-data handling: pixels where ``valid`` is False are set to 0 (continuous) or ``IGNORE_INDEX``
(class maps) before the adapters, so their stored values cannot change any output; tokens with no
valid pixel are made visible only when nothing valid is left (see :mod:`multimae.masking`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from multimae.adapters import CategoricalAdapter, PatchAdapter, patch_validity
from multimae.decoders import SpatialDecoder, can_batch, decode_all
from multimae.domains import DOMAINS, IGNORE_INDEX, Domain
from multimae.masking import mask_to_ids, random_masks, split_masks

__all__ = ["MultiMAE", "resolve_domain"]


def resolve_domain(name: str, key: str) -> Domain:
    """Look a domain up in the registry; ``key`` names the config field for the error message."""
    if name not in DOMAINS:
        raise ValueError(f"{key}: unknown domain {name!r}; known domains: {', '.join(DOMAINS)}")
    dom = DOMAINS[name]
    if dom.level != "pixel" or dom.kind not in ("continuous", "categorical"):
        raise ValueError(f"{key}: domain {name!r} is not a pixel-level continuous or categorical map")
    return dom


class MultiMAE(nn.Module):
    """Multi-modal masked autoencoder with a shared ViT encoder.

    Args:
        in_domains: Input domains (registry names), in token order.
        out_domains: Output domains: input domains, decode-only domains and output-only domains
            with a ``source`` (``s2_rgb_normpix``); empty for an encoder-only backbone (fine-tuning).
        input_size: Image side in pixels (all domains share it).
        patch_size: Patch side P in pixels.
        dim: Encoder width D.
        depth: Encoder blocks.
        num_heads: Encoder attention heads.
        mlp_ratio: Encoder MLP hidden width / D.
        num_global_tokens: Learnable global tokens G appended after the visible tokens.
        drop_path: Stochastic depth rate of the last block (linear from 0 over the blocks).
        domain_embed: Add a learned per-domain embedding to input tokens (off = reference).
        class_embed_dim: Class-embedding width of categorical input adapters.
        decoder_dim: Decoder width.
        decoder_depth: Self-attention blocks per decoder.
        decoder_heads: Decoder attention heads.
        num_encoded_tokens: Default visible-token budget K.
        alphas: Default Dirichlet concentration (one value or one per input domain).
        sample_domains_uniformly: Default of the uniform domain-subset option.

    Raises:
        ValueError: On unknown, duplicate or misplaced domains, or a patch size that does not
            divide the input size (the message names the config key).
    """

    def __init__(
        self,
        *,
        in_domains: Sequence[str],
        out_domains: Sequence[str],
        input_size: int,
        patch_size: int = 8,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_global_tokens: int = 1,
        drop_path: float = 0.0,
        domain_embed: bool = False,
        class_embed_dim: int = 64,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        num_encoded_tokens: int = 49,
        alphas: float | Sequence[float] = 1.0,
        sample_domains_uniformly: bool = False,
    ) -> None:
        super().__init__()
        self._check_domains(in_domains, out_domains)
        if input_size % patch_size != 0:
            raise ValueError(f"data.input_size {input_size} is not divisible by model.patch_size {patch_size}")
        if num_global_tokens < 1:
            raise ValueError(f"model.num_global_tokens must be >= 1, got {num_global_tokens}")
        self.in_domains = list(in_domains)
        self.out_domains = list(out_domains)
        self.input_size = input_size
        self.patch_size = patch_size
        self.dim = dim
        self.depth = depth
        self.num_global_tokens = num_global_tokens
        self.grid = (input_size // patch_size, input_size // patch_size)
        n_d = self.grid[0] * self.grid[1]
        self.tokens_per_domain = {d: n_d for d in dict.fromkeys(self.in_domains + self.out_domains)}
        if not 1 <= num_encoded_tokens <= n_d * len(self.in_domains):
            raise ValueError(
                f"masking.num_encoded_tokens is {num_encoded_tokens}, but {len(self.in_domains)} input domains x "
                f"{n_d} tokens give {n_d * len(self.in_domains)}"
            )
        self.num_encoded_tokens = num_encoded_tokens
        self.alphas = alphas
        self.sample_domains_uniformly = sample_domains_uniformly

        self.input_adapters = nn.ModuleDict()
        for name in self.in_domains:
            dom = DOMAINS[name]
            if dom.kind == "categorical":
                self.input_adapters[name] = CategoricalAdapter(
                    name, dom.num_classes, dim, patch_size=patch_size, input_size=input_size,
                    label_downsample=dom.label_downsample, class_embed_dim=class_embed_dim,
                )
            else:
                self.input_adapters[name] = PatchAdapter(
                    name, dom.num_channels, dim, patch_size=patch_size, input_size=input_size
                )
        self.domain_embeds = (
            nn.ParameterDict({d: nn.Parameter(torch.zeros(1, 1, dim)) for d in self.in_domains})
            if domain_embed else None
        )
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.encoder = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for rate in rates
        )
        self.output_adapters = nn.ModuleDict()
        for name in self.out_domains:
            dom = DOMAINS[name]
            categorical = dom.kind == "categorical"
            if categorical and patch_size % dom.label_downsample != 0:
                raise ValueError(
                    f"out_domains: model.patch_size {patch_size} is not divisible by label_downsample "
                    f"{dom.label_downsample} of {name!r}"
                )
            self.output_adapters[name] = SpatialDecoder(
                name, encoder_dim=dim, context_domains=self.in_domains, query_domain=dom.source or name,
                out_channels=dom.num_classes if categorical else dom.num_channels,
                out_patch_size=patch_size // dom.label_downsample if categorical else patch_size,
                input_size=input_size, patch_size=patch_size,
                dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads, mlp_ratio=mlp_ratio,
            )
        # Same-sized decoders can run as one batch (decoders.decode_all): same result, E-fold fewer
        # kernel launches, but stacking the parameters every step costs more than it saves on a CPU
        # (BENCHMARKS.md: step ratio 1.12 batched vs 1.09 one by one), so it is used on GPUs only.
        self.batch_decoders = bool(self.output_adapters) and can_batch(list(self.output_adapters.values()))
        self._init_weights()

    @staticmethod
    def _check_domains(in_domains: Sequence[str], out_domains: Sequence[str]) -> None:
        for key, names in (("in_domains", in_domains), ("out_domains", out_domains)):
            if not names and key == "in_domains":  # no out_domains: an encoder-only backbone (fine-tuning)
                raise ValueError(f"{key} is empty")
            if len(set(names)) != len(names):
                raise ValueError(f"{key} lists a domain twice: {list(names)}")
            for name in names:
                resolve_domain(name, key)
        for name in in_domains:
            if DOMAINS[name].is_output_only:
                raise ValueError(f"in_domains: {name!r} is output-only (a target derived from {DOMAINS[name].source!r})")

    def _init_weights(self) -> None:
        """MAE / MultiMAE initialisation: xavier-uniform Linear layers (qkv / kv per sub-matrix)."""
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        if self.domain_embeds is not None:
            for p in self.domain_embeds.values():
                nn.init.trunc_normal_(p, std=0.02)
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            fan_out, fan_in = module.weight.shape
            parts = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1
            bound = (6.0 / (fan_out / parts + fan_in)) ** 0.5
            nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: tokens and embeddings (position embeddings are buffers)."""
        names = {"global_tokens"}
        for name, _ in self.named_parameters():
            if name.startswith("domain_embeds.") or ".domain_embeds." in name or name.endswith(
                (".mask_token", ".class_embed.weight")
            ):
                names.add(name)
        return names

    # ------------------------------------------------------------------ input handling
    def _check_inputs(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None) -> None:
        shapes = {}
        for name in self.in_domains:
            if name not in inputs:
                raise ValueError(f"batch has no input domain {name!r} (in_domains: {self.in_domains})")
            x = inputs[name]
            if DOMAINS[name].kind == "continuous" and not x.is_floating_point():
                raise ValueError(f"domain {name!r}: expected a float tensor (B, C, H, W), got {x.dtype}")
            shapes[name] = tuple(x.shape[-2:]) + (x.shape[0],)
            if valid is not None and name in valid:
                expected = (x.shape[0], *x.shape[-2:])
                if tuple(valid[name].shape) != expected or valid[name].dtype != torch.bool:
                    raise ValueError(
                        f"valid[{name!r}] must be bool {expected}, got {valid[name].dtype} {tuple(valid[name].shape)}"
                    )
        if len(set(shapes.values())) > 1:
            raise ValueError(f"input domains differ in batch size or image size (H, W, B): {shapes}")

    def _tokenize(
        self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """All input tokens (B, N, D) in ``in_domains`` order, token validity (B, N) or None, grid."""
        self._check_inputs(inputs, valid)
        tokens, token_valid = [], []
        for name in self.in_domains:
            x, v = inputs[name], None if valid is None else valid.get(name)
            if DOMAINS[name].kind == "categorical":
                if v is not None:
                    x = torch.where(v, x, IGNORE_INDEX)
                v = x != IGNORE_INDEX  # no-data pixels, whether marked in the map or by valid
            elif v is not None:
                x = torch.where(v.unsqueeze(1), x, 0.0)
            t = self.input_adapters[name](x)  # (B, N_d, D); checks channels, dtype, size
            if self.domain_embeds is not None:
                t = t + self.domain_embeds[name]
            tokens.append(t)
            token_valid.append(None if v is None else patch_validity(v, self.patch_size))
        any_invalid = any(tv is not None for tv in token_valid)
        if any_invalid:
            b, n_d = tokens[0].shape[:2]
            token_valid = [torch.ones(b, n_d, dtype=torch.bool, device=tokens[0].device) if tv is None else tv
                           for tv in token_valid]
        h, w = inputs[self.in_domains[0]].shape[-2:]
        grid = (h // self.patch_size, w // self.patch_size)
        return torch.cat(tokens, dim=1), torch.cat(token_valid, dim=1) if any_invalid else None, grid

    def _run_encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append the global tokens and run the blocks: (B, K, D) -> (B, K + G, D)."""
        x = torch.cat([tokens, self.global_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)
        for block in self.encoder:
            x = block(x)
        return x

    # ------------------------------------------------------------------ public API
    def encode(self, inputs: dict[str, torch.Tensor], *, valid: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Encode every token of every input domain (no masking), e.g. for fine-tuning.

        Args:
            inputs: {domain: float (B, C, H, W) or int64 class map (B, H, W)} for every in_domain.
            valid: Optional {domain: bool (B, H, W)}; invalid pixels are filled before embedding.

        Returns:
            (B, n * N_d + G, D): the tokens of each input domain in ``in_domains`` order (each
            row-major over its grid), then the G global tokens **last**.
        """
        tokens, _, _ = self._tokenize(inputs, valid)
        return self._run_encoder(tokens)

    def _make_mask(self, b, n_d, token_valid, device, *, num_encoded_tokens, alphas, uniform, masks,
                   mask_all_visible, generator) -> tuple[torch.Tensor, int | None]:
        n = n_d * len(self.in_domains)
        if mask_all_visible:
            return torch.zeros(b, n, device=device), n
        if masks is not None:
            for name in self.in_domains:
                if name not in masks or tuple(masks[name].shape) != (b, n_d):
                    got = None if name not in masks else tuple(masks[name].shape)
                    raise ValueError(f"masks[{name!r}] must have shape {(b, n_d)}, got {got}")
            return torch.cat([masks[d].float() for d in self.in_domains], dim=1), None
        k = self.num_encoded_tokens if num_encoded_tokens is None else num_encoded_tokens
        mask = random_masks(
            [n_d] * len(self.in_domains), b, k, self.alphas if alphas is None else alphas,
            sample_domains_uniformly=self.sample_domains_uniformly if uniform is None else uniform,
            token_valid=token_valid, generator=generator, device=None if generator is not None else device,
        )
        return mask.to(device), k

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        valid: dict[str, torch.Tensor] | None = None,
        num_encoded_tokens: int | None = None,
        alphas: float | Sequence[float] | None = None,
        sample_domains_uniformly: bool | None = None,
        masks: dict[str, torch.Tensor] | None = None,
        mask_all_visible: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Mask, encode and reconstruct every output domain.

        Args:
            inputs: {domain: float (B, C, H, W) z-scored, or int64 class map (B, H, W)}; every
                in_domain is required, other keys are ignored.
            valid: Optional {domain: bool (B, H, W)}, True where the pixel is valid.
            num_encoded_tokens: Budget K (default: ``masking.num_encoded_tokens`` from the build).
            alphas: Dirichlet concentration (default from the build).
            sample_domains_uniformly: Uniform domain-subset option (default from the build).
            masks: Given masks {in_domain: (B, N_d), 1 = masked} instead of random ones; every
                sample must leave the same number of tokens visible.
            mask_all_visible: Encode every token (no masking).
            generator: Optional generator for the random masks.

        Returns:
            ``preds``: {out_domain: (B, C, H, W) values, or (B, K, H / ds, W / ds) class logits};
            ``masks``: {domain: float (B, N_d), 1 = masked, 0 = visible} for every input and output
            domain (output-only domains repeat their source's mask, decode-only domains are all 1).

        Raises:
            ValueError: On a missing domain, a wrong channel count, dtype or image size, K larger
                than the number of tokens, or malformed given masks.
        """
        tokens, token_valid, grid = self._tokenize(inputs, valid)
        b, n, _ = tokens.shape
        n_d = n // len(self.in_domains)
        mask, k = self._make_mask(
            b, n_d, token_valid, tokens.device, num_encoded_tokens=num_encoded_tokens, alphas=alphas,
            uniform=sample_domains_uniformly, masks=masks, mask_all_visible=mask_all_visible, generator=generator,
        )
        ids_keep, ids_restore = mask_to_ids(mask, k)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, K, D)
        encoded = self._run_encoder(visible)  # (B, K + G, D)
        if self.batch_decoders and encoded.device.type != "cpu":
            outs = decode_all(list(self.output_adapters.values()), encoded, ids_keep, ids_restore, grid)
            preds = dict(zip(self.out_domains, outs))
        else:
            preds = {d: self.output_adapters[d](encoded, ids_keep, ids_restore, grid) for d in self.out_domains}
        out_masks = split_masks(mask, self.in_domains, [n_d] * len(self.in_domains))
        for d in self.out_domains:
            if d not in out_masks:
                src = DOMAINS[d].source
                out_masks[d] = out_masks[src] if src in out_masks else torch.ones(b, n_d, device=mask.device)
        return preds, out_masks
