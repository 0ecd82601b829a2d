"""MoE-MAE: a masked autoencoder with mixture-of-experts blocks and always-visible metadata tokens.

Albughdadi, "Lightweight Metadata-Aware Mixture-of-Experts Masked Autoencoder for Earth Observation"
(arXiv 2509.10919; code AlbughdadiM/geo-moe-mae, ``models/moe_mae.py`` and ``pretrain_mae.py``). One step:

1. The encoder tokenizes the input domains and the metadata (:mod:`multimae.metadata`); with the source's
   recipe the encoder has MoE feed-forwards and grouped-query attention (``model.preset: moe_mae_s``,
   ``model.ffn: moe``, :mod:`multimae.moe`).
2. Plain random masking (MAE's argsort of uniform noise): ``int(N * (1 - mask_ratio))`` of the N patch tokens
   stay visible, the same number in every sample; metadata and global tokens are always visible.
3. The encoder encodes the visible patches, the metadata tokens and its global tokens; a LayerNorm (the
   source's final encoder norm, owned here so that probes read the encoder's tokens before it, as the source's
   do) and a linear map to the decoder width follow.
4. The decoder (the source's: 2 blocks of width 108, 6 heads, 3 key / value groups, MoE feed-forwards with 3
   experts of hidden size 54, top 2) runs over all N patch positions (mask tokens at the masked ones, a learned
   position embedding) plus the metadata and global tokens (no position); a LayerNorm and one linear head per
   input domain predict the C * p * p values of every patch.
5. Loss = masked + ``visible_weight`` * visible + ``balance_weight`` * load balance, where masked (visible) is
   the squared error summed over a patch's values, summed over the masked (visible) patches and divided by
   their number, as the source; here only valid pixels count, and only patches with a valid pixel are counted.
   The load balance is the encoder's MoE loss (:mod:`multimae.moe`), plus the decoder's with
   ``decoder_balance`` (the source drops the decoder's). Computed in fp32.

Targets are the z-scored inputs (no per-patch normalisation). Parameter names: ``encoder.*``, ``norm.*``,
``decoder_embed.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.<i>.*`` (timm block names),
``decoder_norm.*``, ``heads.<domain>.*``. Config section ``moe_mae`` (``cfgs/defaults.yaml``).
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from multimae.domains import DOMAINS
from multimae.encoder import FFN_LAYERS, MultiModalEncoder, patch_layout, pop_block_aux_loss, resolve_domain
from multimae.masking import mask_to_ids, split_masks
from multimae.moe import expert_usage, gqa_layer, moe_feed_forward
from multimae.objectives.base import Objective

__all__ = ["MoEMAEObjective", "patch_squared_error"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def patch_squared_error(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                        patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error summed over the valid values of each patch.

    Args:
        pred: float (B, C, H, W).
        target: float (B, C, H, W) (anything at invalid pixels).
        valid: bool (B, H, W).
        patch_size: P.

    Returns:
        fp32 (B, N) sums over the C * (valid pixels) values of each of the N = (H / P) * (W / P) patches
        (row-major), and bool (B, N): the patch holds a valid pixel.
    """
    err = torch.where(valid.unsqueeze(1), (pred.float() - target.float()) ** 2, 0.0)
    sse = rearrange(err, "b c (h p) (w q) -> b (h w) (c p q)", p=patch_size, q=patch_size).sum(-1)
    has = rearrange(valid, "b (h p) (w q) -> b (h w) (p q)", p=patch_size, q=patch_size).any(-1)
    return sse, has


class MoEMAEObjective(Objective):
    """Masked autoencoder with plain random masking, an MAE decoder over all positions and per-patch MSE.

    Args:
        encoder: The encoder to train (built with ``init_weights=False``); continuous input domains only.
        mask_ratio: Share of the patch tokens hidden from the encoder.
        visible_weight: Weight of the squared error on visible patches.
        balance_weight: Weight of the MoE load-balance loss.
        decoder_balance: Also count the decoder's load-balance loss.
        decoder_dim: Decoder width.
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        decoder_kv_groups: Key / value heads of the decoder's grouped-query attention (None: multi-head).
        decoder_ffn: Feed-forward kind of the decoder blocks (``multimae.encoder.FFN_LAYERS``).
        decoder_ffn_options: Its options.

    Raises:
        ValueError: a categorical input domain, a mask ratio leaving no visible or no masked patch, invalid
            decoder settings (the messages name the config key).
    """

    name = "moe_mae"

    def __init__(self, encoder: MultiModalEncoder, *, mask_ratio: float = 0.75, visible_weight: float = 0.1,
                 balance_weight: float = 0.5, decoder_balance: bool = False, decoder_dim: int = 108,
                 decoder_depth: int = 2, decoder_heads: int = 6, decoder_kv_groups: int | None = 3,
                 decoder_ffn: str = "moe", decoder_ffn_options: dict | None = None) -> None:
        super().__init__(encoder)
        for name in encoder.in_domains:
            if resolve_domain(name, "in_domains").kind != "continuous":
                raise ValueError(f"in_domains: moe_mae reconstructs continuous domains with a squared error; "
                                 f"{name!r} is a class map")
        layout = patch_layout(encoder.layout())
        n = layout.num_tokens
        self.num_visible = int(n * (1.0 - mask_ratio))
        if not 1 <= self.num_visible < n:
            raise ValueError(f"moe_mae.mask_ratio {mask_ratio} keeps {self.num_visible} of the {n} patch tokens "
                             f"visible; it must keep at least one and mask at least one")
        if decoder_ffn not in FFN_LAYERS:
            raise ValueError(f"moe_mae.decoder.ffn: unknown feed-forward kind {decoder_ffn!r}; choose one of "
                             f"{', '.join(FFN_LAYERS)}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"moe_mae.decoder.heads {decoder_heads} must divide moe_mae.decoder.dim {decoder_dim}")
        if decoder_kv_groups is not None and (decoder_kv_groups < 1 or decoder_heads % decoder_kv_groups):
            raise ValueError(f"moe_mae.decoder.kv_groups {decoder_kv_groups} must be a positive divisor of "
                             f"moe_mae.decoder.heads {decoder_heads}")
        self.mask_ratio, self.visible_weight, self.balance_weight = mask_ratio, visible_weight, balance_weight
        self.decoder_balance = decoder_balance
        self.patch_sizes = {d: encoder.patch_sizes[d] for d in encoder.in_domains}
        options = dict(decoder_ffn_options or {})
        factory = partial(moe_feed_forward, key="moe_mae.decoder.ffn_options") if decoder_ffn == "moe" \
            else FFN_LAYERS[decoder_ffn]
        attn = {} if decoder_kv_groups is None else {"attn_layer": gqa_layer(decoder_kv_groups)}

        self.norm = _LayerNorm(encoder.dim)
        self.decoder_embed = nn.Linear(encoder.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=encoder.mlp_ratio, qkv_bias=True, norm_layer=_LayerNorm,
                  mlp_layer=factory(options, i, decoder_depth), **attn)
            for i in range(decoder_depth)
        )
        self.decoder_norm = _LayerNorm(decoder_dim)
        self.heads = nn.ModuleDict({
            d: nn.Linear(decoder_dim, DOMAINS[d].num_channels * self.patch_sizes[d] ** 2) for d in encoder.in_domains
        })

    @classmethod
    def from_config(cls, cfg: dict, encoder: MultiModalEncoder) -> "MoEMAEObjective":
        """Build from config section ``moe_mae`` (``cfgs/defaults.yaml``)."""
        sec = cfg["moe_mae"]
        dec, loss = sec["decoder"], sec["loss"]
        return cls(encoder, mask_ratio=sec["mask_ratio"], visible_weight=loss["visible_weight"],
                   balance_weight=loss["balance_weight"], decoder_balance=loss["decoder_balance"],
                   decoder_dim=dec["dim"], decoder_depth=dec["depth"], decoder_heads=dec["heads"],
                   decoder_kv_groups=dec["kv_groups"], decoder_ffn=dec["ffn"], decoder_ffn_options=dec["ffn_options"])

    def describe(self) -> list[str]:
        """Masking, decoder and loss weights."""
        n = self.decoder_pos_embed.shape[1]
        dec = self.decoder_blocks[0]
        return [f"masking: random, {n - self.num_visible} of {n} patch tokens masked (mask_ratio {self.mask_ratio}), "
                "metadata and global tokens always visible",
                f"decoder: {len(self.decoder_blocks)} blocks, dim {self.decoder_embed.out_features}, "
                f"feed-forward {type(dec.mlp).__name__}",
                f"loss: masked + {self.visible_weight} x visible + {self.balance_weight} x load balance"
                f"{' (encoder and decoder)' if self.decoder_balance else ' (encoder)'}"]

    def init_weights(self) -> None:
        """The base initialisation, then truncated-normal (std 0.02) mask token and decoder position embedding."""
        super().init_weights()
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The encoder's no-decay names plus the mask token and the decoder position embedding."""
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    # ------------------------------------------------------------------ masking and prediction
    def predict(self, inputs: dict[str, torch.Tensor], *, valid: dict[str, torch.Tensor] | None = None,
                metadata: dict[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Mask, encode and reconstruct every input domain.

        Args:
            inputs: {domain: float (B, C, H, W) z-scored} for every in_domain (other keys are ignored).
            valid: Optional {domain: bool (B, H, W)}.
            metadata: Optional {field: float (B, 2)} for the metadata tokens.
            generator: Optional generator of the mask noise (its device is used).

        Returns:
            ``preds``: {domain: (B, C, H, W)}; ``masks``: {domain: float (B, N_d), 1 = masked}.

        Raises:
            ValueError: an input of another size than the decoder's position embedding was built for.
        """
        tok = self.encoder.tokenize(inputs, valid, metadata)
        layout = patch_layout(tok.layout)
        b, n, k = tok.tokens.shape[0], layout.num_tokens, self.num_visible
        if n != self.decoder_pos_embed.shape[1]:
            raise ValueError(f"moe_mae: the input has {n} patch tokens, the decoder's learned position embedding "
                             f"{self.decoder_pos_embed.shape[1]} (data.input_size {self.encoder.input_size})")
        device = generator.device if generator is not None else tok.tokens.device
        noise = torch.rand(b, n, generator=generator, device=device).to(tok.tokens.device)
        mask = torch.ones(b, n, device=tok.tokens.device).scatter_(1, noise.argsort(dim=1)[:, :k], 0.0)
        ids_keep, ids_restore = mask_to_ids(mask, k)
        always = torch.arange(n, tok.tokens.shape[1], device=mask.device).expand(b, -1)  # metadata (B, M)
        encoded = self.encoder.encode_visible(tok.tokens, torch.cat([ids_keep, always], dim=1))  # (B, K + M + G, D)

        x = self.decoder_embed(self.norm(encoded))  # (B, K + M + G, Dd)
        patches = torch.cat([x[:, :k], self.mask_token.expand(b, n - k, -1).to(x.dtype)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, Dd)
        x = torch.cat([patches + self.decoder_pos_embed.to(x.dtype), x[:, k:]], dim=1)  # (B, N + M + G, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x[:, :n])
        preds = {}
        for seg in layout.segments:
            p = self.patch_sizes[seg.domain]
            out = self.heads[seg.domain](x[:, seg.slice])  # (B, N_d, C * p * p)
            preds[seg.domain] = rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=seg.grid[0], w=seg.grid[1],
                                          p=p, q=p)
        return preds, split_masks(mask, layout.domains, layout.tokens_per_domain)

    def balance_loss(self) -> torch.Tensor | None:
        """The load-balance loss of the last forward (encoder, plus decoder with ``decoder_balance``), or None."""
        enc, dec = self.encoder.pop_aux_loss(), pop_block_aux_loss(self.decoder_blocks)
        parts = [t for t in (enc, dec if self.decoder_balance else None) if t is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"loss": total, "masked", "visible", "balance"}`` of a batch (fp32 scalars)."""
        inputs, valid = batch["inputs"], batch.get("valid") or {}
        preds, masks = self.predict(inputs, valid=valid or None, metadata=batch.get("metadata"), generator=generator)
        sums = {"masked": 0.0, "visible": 0.0}
        counts = {"masked": 0, "visible": 0}
        for d, pred in preds.items():
            target = inputs[d]
            v = valid.get(d, torch.ones_like(target[:, 0], dtype=torch.bool))
            sse, has = patch_squared_error(pred, target, v, self.patch_sizes[d])
            masked = masks[d] > 0.5
            for kind, sel in (("masked", masked & has), ("visible", ~masked & has)):
                sums[kind] = sums[kind] + torch.where(sel, sse, 0.0).sum()
                counts[kind] = counts[kind] + sel.sum()
        ref = next(iter(preds.values()))
        out = {kind: (sums[kind] / torch.clamp(torch.as_tensor(counts[kind], device=ref.device), min=1)).float()
               for kind in sums}
        balance = self.balance_loss()
        out["balance"] = ref.new_zeros((), dtype=torch.float32) if balance is None else balance.float()
        out["loss"] = out["masked"] + self.visible_weight * out["visible"] + self.balance_weight * out["balance"]
        return out

    def pictures(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Masked inputs, predictions and targets (kind ``reconstruction``) and the expert usage of the batch."""
        preds, masks = self.predict(batch["inputs"], valid=batch.get("valid"), metadata=batch.get("metadata"),
                                    generator=generator)
        self.balance_loss()
        usage = {**expert_usage(self.encoder.blocks, "encoder.blocks."),
                 **expert_usage(self.decoder_blocks, "decoder_blocks.")}
        valid = batch.get("valid") or {d: torch.ones_like(x[:, 0], dtype=torch.bool) for d, x in preds.items()}
        return {"kind": "reconstruction", "inputs": batch["inputs"], "valid": valid, "preds": preds, "masks": masks,
                "patch_sizes": dict(self.patch_sizes), "norm_pix": [], "expert_usage": usage}
