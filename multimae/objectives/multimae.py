"""MultiMAE-EO: Dirichlet token-budget masking, one cross-attention decoder per output domain, pixel losses.

Bachmann et al., "MultiMAE: Multi-modal Multi-task Masked Autoencoders", ECCV 2022, as applied to MMEarth by
Sosa et al., "MultiMAE Meets Earth Observation", ICIP 2025 (reference: josesosajs/multimae-meets-eo). One
training step:

1. The encoder tokenizes every input domain (:meth:`MultiModalEncoder.tokenize`).
2. A Dirichlet token-budget mask keeps K of the N tokens visible (:mod:`multimae.masking`): K = 
   ``multimae.masking.num_encoded_tokens``, split across domains by Dirichlet(alphas) proportions; patches
   without a valid pixel are shown only when nothing valid is left.
3. The encoder encodes the K visible tokens plus its G global tokens.
4. One :class:`~multimae.decoders.SpatialDecoder` per output domain (``multimae.out_domains``: input domains,
   decode-only domains such as elevation or land cover, output-only domains such as ``s2_rgb_normpix``)
   reconstructs it from the visible tokens.
5. :class:`~multimae.criterion.MultiMAECriterion`: masked MSE / L1 / cross-entropy per domain on masked
   tokens and valid pixels, in fp32, summed (or uncertainty-weighted).

Metadata tokens (``model.metadata``) are always visible: the budget K counts patch tokens only, the encoder
sees the K patches plus every metadata token, and the decoders attend to the encoded metadata tokens with the
global tokens (context without a position). A feed-forward auxiliary loss (``model.ffn: moe``) is added to the
total with weight 1 and logged as ``aux``.

Parameter names: ``encoder.*`` (:mod:`multimae.encoder`), ``decoders.<domain>.*``, ``criterion.log_vars.*``
(uncertainty weighting only). Config section ``multimae`` (``cfgs/defaults.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from multimae.criterion import MultiMAECriterion
from multimae.decoders import SpatialDecoder
from multimae.domains import DOMAINS
from multimae.encoder import MultiModalEncoder, patch_layout, resolve_domains
from multimae.masking import mask_to_ids, random_masks, split_masks
from multimae.moe import expert_usage
from multimae.objectives.base import Objective

__all__ = ["MultiMAEObjective"]


class MultiMAEObjective(Objective):
    """Masked multi-modal reconstruction with a shared encoder and per-domain decoders.

    Args:
        encoder: The encoder to train (built with ``init_weights=False``; :meth:`init_weights` runs after).
        out_domains: Output domains (registry names).
        decoder_dim: Decoder width.
        decoder_depth: Self-attention blocks per decoder.
        decoder_heads: Decoder attention heads.
        xattn_residual: Residual around each decoder's cross-attention (the reference has none).
        num_encoded_tokens: Default visible-token budget K.
        alphas: Default Dirichlet concentration (one value or one per input domain).
        sample_domains_uniformly: Default of the uniform domain-subset option.
        losses: ``{domain: "mse" | "l1"}`` for continuous output domains (default ``mse``).
        norm_pix: Output domains with per-patch normalised targets.
        weighting: ``none`` or ``uncertainty``.
        loss_on_unmasked: Also count visible tokens in the losses.

    Raises:
        ValueError: unknown, duplicate or misplaced output domains, a budget K outside 1..N, a decoder patch
            size not divisible by a class map's ``label_downsample`` (the messages name the config key).
    """

    name = "multimae"

    def __init__(
        self,
        encoder: MultiModalEncoder,
        *,
        out_domains: Sequence[str],
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        xattn_residual: bool = True,
        num_encoded_tokens: int = 49,
        alphas: float | Sequence[float] = 1.0,
        sample_domains_uniformly: bool = False,
        losses: dict[str, str] | None = None,
        norm_pix: Sequence[str] = (),
        weighting: str = "none",
        loss_on_unmasked: bool = False,
    ) -> None:
        super().__init__(encoder)
        out_domains = list(out_domains)
        for dom in resolve_domains(out_domains, "multimae.out_domains",
                                   empty=": the objective needs at least one domain to reconstruct"):
            if dom.source is not None and dom.source not in encoder.in_domains:
                raise ValueError(f"multimae.out_domains: {dom.name!r} reconstructs {dom.source!r}, which is not in "
                                 "in_domains")
        layout = patch_layout(encoder.layout())
        if not 1 <= num_encoded_tokens <= layout.num_tokens:
            raise ValueError(
                f"multimae.masking.num_encoded_tokens is {num_encoded_tokens}, but {len(layout.segments)} input "
                f"domains give {layout.num_tokens} tokens"
            )
        self.out_domains = out_domains
        self.num_encoded_tokens = num_encoded_tokens
        self.alphas = alphas
        self.sample_domains_uniformly = sample_domains_uniformly
        self.decoders = nn.ModuleDict()
        patch_sizes = {}
        for name in out_domains:
            dom = DOMAINS[name]
            query = dom.source or name
            p = encoder.patch_size_of(query)
            patch_sizes[name] = p
            categorical = dom.kind == "categorical"
            if categorical and p % dom.label_downsample != 0:
                raise ValueError(
                    f"multimae.out_domains: patch size {p} of {name!r} is not divisible by its label_downsample "
                    f"{dom.label_downsample}"
                )
            self.decoders[name] = SpatialDecoder(
                name, encoder_dim=encoder.dim, context_domains=encoder.in_domains, query_domain=query,
                out_channels=dom.num_classes if categorical else dom.num_channels,
                out_patch_size=p // dom.label_downsample if categorical else p, patch_size=p,
                base_patch_size=encoder.patch_size, dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
                mlp_ratio=encoder.mlp_ratio, xattn_residual=xattn_residual, pos_embed_grid=encoder.pos_embed_grid,
            )
        self.criterion = MultiMAECriterion(out_domains, patch_size=patch_sizes, losses=losses, norm_pix=norm_pix,
                                           weighting=weighting, loss_on_unmasked=loss_on_unmasked)

    @classmethod
    def from_config(cls, cfg: dict, encoder: MultiModalEncoder) -> "MultiMAEObjective":
        """Build from config section ``multimae`` (``cfgs/defaults.yaml``)."""
        sec = cfg["multimae"]
        dec, masking, loss = sec["decoder"], sec["masking"], sec["loss"]
        return cls(
            encoder, out_domains=sec["out_domains"], decoder_dim=dec["dim"], decoder_depth=dec["depth"],
            decoder_heads=dec["heads"], xattn_residual=dec["xattn_residual"],
            num_encoded_tokens=masking["num_encoded_tokens"], alphas=masking["alphas"],
            sample_domains_uniformly=masking["sample_domains_uniformly"],
            losses={d: v for d, v in loss["per_domain"].items() if d in sec["out_domains"]},
            norm_pix=[d for d in loss["norm_pix"] if d in sec["out_domains"]],
            weighting=loss["weighting"], loss_on_unmasked=loss["on_unmasked"],
        )

    @classmethod
    def data_domains(cls, cfg: dict) -> list[str]:
        """``in_domains`` plus ``multimae.out_domains`` (output-only domains read their source's data)."""
        return list(dict.fromkeys(list(cfg["in_domains"]) + list(cfg["multimae"]["out_domains"])))

    def describe(self) -> list[str]:
        """Output domains with their kind, loss and role, and the visible-token budget."""
        lines = [f"out_domains: {', '.join(self.out_domains)}"]
        for name in self.out_domains:
            dom = DOMAINS[name]
            role = "input+output" if name in self.encoder.in_domains else "output only"
            extra = ", per-patch normalised" if name in self.criterion.norm_pix else ""
            lines.append(f"  {name}: {dom.kind}, {dom.num_classes or dom.num_channels} "
                         f"{'classes' if dom.num_classes else 'channels'}, loss {self.criterion.losses[name]}{extra}, "
                         f"{role}")
        lines.append(f"encoded_tokens: {self.num_encoded_tokens}")
        return lines

    def no_weight_decay(self) -> set[str]:
        """The encoder's no-decay names plus every decoder's mask token and domain embeddings."""
        names = super().no_weight_decay()
        for name, _ in self.decoders.named_parameters():
            if name.endswith(".mask_token") or ".domain_embeds." in name:
                names.add(f"decoders.{name}")
        return names

    # ------------------------------------------------------------------ masking and prediction
    def _make_mask(self, layout, b, token_valid, device, *, num_encoded_tokens, alphas, uniform, masks,
                   mask_all_visible, generator) -> tuple[torch.Tensor, int | None]:
        n = layout.num_tokens
        if mask_all_visible:
            return torch.zeros(b, n, device=device), n
        if masks is not None:
            for seg in layout.segments:
                if seg.domain not in masks or tuple(masks[seg.domain].shape) != (b, seg.num_tokens):
                    got = None if seg.domain not in masks else tuple(masks[seg.domain].shape)
                    raise ValueError(f"masks[{seg.domain!r}] must have shape {(b, seg.num_tokens)}, got {got}")
            return torch.cat([masks[d].float() for d in layout.domains], dim=1), None
        k = self.num_encoded_tokens if num_encoded_tokens is None else num_encoded_tokens
        mask = random_masks(
            layout.tokens_per_domain, b, k, self.alphas if alphas is None else alphas,
            sample_domains_uniformly=self.sample_domains_uniformly if uniform is None else uniform,
            token_valid=token_valid, generator=generator, device=None if generator is not None else device,
        )
        return mask.to(device), k

    def predict(
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
        metadata: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Mask, encode and reconstruct every output domain.

        Args:
            inputs: {domain: float (B, C, H, W) z-scored, or int64 class map (B, H, W)}; every in_domain is
                required, other keys are ignored.
            valid: Optional {domain: bool (B, H, W)}, True where the pixel is valid.
            metadata: Optional {field: float (B, 2)} for the encoder's metadata tokens (always visible).
            num_encoded_tokens: Budget K (default: the objective's).
            alphas: Dirichlet concentration (default: the objective's).
            sample_domains_uniformly: Uniform domain-subset option (default: the objective's).
            masks: Given masks {in_domain: (B, N_d), 1 = masked} instead of random ones; every sample must
                leave the same number of tokens visible.
            mask_all_visible: Encode every token (no masking).
            generator: Optional generator for the random masks.

        Returns:
            ``preds``: {out_domain: (B, C, H, W) values, or (B, K, H / ds, W / ds) class logits};
            ``masks``: {domain: float (B, N_d), 1 = masked, 0 = visible} for every input and output domain
            (output-only domains repeat their source's mask, decode-only domains are all 1 on their grid).

        Raises:
            ValueError: On a missing domain, a wrong channel count, dtype or image size, K larger than the
                number of tokens, or malformed given masks.
        """
        tok = self.encoder.tokenize(inputs, valid, metadata)
        tokens, layout = tok.tokens, patch_layout(tok.layout)  # masks and decoders see the patch tokens only
        b, n = tokens.shape[0], layout.num_tokens
        mask, k = self._make_mask(
            layout, b, None if tok.valid is None else tok.valid[:, :n], tokens.device,
            num_encoded_tokens=num_encoded_tokens, alphas=alphas, uniform=sample_domains_uniformly, masks=masks,
            mask_all_visible=mask_all_visible, generator=generator,
        )
        ids_keep, ids_restore = mask_to_ids(mask, k)
        always = torch.arange(n, tokens.shape[1], device=tokens.device).expand(b, -1)  # metadata tokens (B, M)
        encoded = self.encoder.encode_visible(tokens, torch.cat([ids_keep, always], dim=1))  # (B, K + M + G, D)
        preds = {d: self.decoders[d](encoded, ids_keep, ids_restore, layout) for d in self.out_domains}
        out_masks = split_masks(mask, layout.domains, layout.tokens_per_domain)
        for d in self.out_domains:
            if d not in out_masks:
                src = DOMAINS[d].source
                if src in out_masks:
                    out_masks[d] = out_masks[src]
                else:
                    h, w = self.decoders[d].query_grid(layout)
                    out_masks[d] = torch.ones(b, h * w, device=mask.device)
        return preds, out_masks

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Masked reconstruction losses of a batch: ``{"loss": total, "<domain>": per-domain loss, ...}``."""
        preds, masks = self.predict(batch["inputs"], valid=batch["valid"], generator=generator,
                                    metadata=batch.get("metadata"))
        losses = self.criterion(preds, batch["inputs"], masks, batch["valid"])
        aux = self.encoder.pop_aux_loss()
        if aux is not None:
            losses["loss"] = losses["loss"] + aux.float()
            losses["aux"] = aux.float()
        return losses

    def pictures(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Masked inputs, predictions and targets of ``batch`` for ``utils.visualize`` (kind ``reconstruction``)."""
        preds, masks = self.predict(batch["inputs"], valid=batch["valid"], generator=generator,
                                    metadata=batch.get("metadata"))
        self.encoder.pop_aux_loss()
        return {"kind": "reconstruction", "inputs": batch["inputs"], "valid": batch["valid"], "preds": preds,
                "masks": masks, "patch_sizes": dict(self.criterion.patch_sizes), "norm_pix": sorted(self.criterion.norm_pix),
                "expert_usage": expert_usage(self.encoder.blocks, "encoder.blocks.")}
