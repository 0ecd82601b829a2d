"""Mixture-of-experts feed-forward and grouped-query attention for the timm blocks of encoders and decoders.

After Albughdadi, "Lightweight Metadata-Aware Mixture-of-Experts Masked Autoencoder for Earth Observation"
(arXiv 2509.10919; code AlbughdadiM/geo-moe-mae):

* :class:`MoEFeedForward`: noisy top-k gating (Shazeer et al., "Outrageously Large Neural Networks: The
  Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017) over SwiGLU experts (Shazeer, "GLU Variants Improve
  Transformer", 2020) ``W2 (silu(W_e x) * V x)``, whose V and W2 are shared by the experts of a layer, so an
  expert owns only its W_e. Registered as feed-forward kind ``moe`` in ``multimae.encoder.FFN_LAYERS``
  (:func:`moe_feed_forward`): the expert hidden size decreases linearly with depth and the number of experts
  grows by stage, as in the source.
* :class:`GroupedQueryAttention`: K and V have fewer heads than Q, each shared by ``num_heads / kv_groups``
  query heads (Ainslie et al., "GQA", EMNLP 2023), on torch's fused ``scaled_dot_product_attention``.

Load balance (a module's ``aux_loss`` after each forward, collected by ``MultiModalEncoder.pop_aux_loss``):
``w_importance * CV(importance) + w_load * CV(load)`` per layer, with CV = std / mean over the experts,
importance = the sum of each expert's gates over the tokens, and load = the sum over the tokens of the
smooth probability that the expert is among the top k under the noise (Shazeer et al. 2017, eq. 8-10):
Phi((clean_e - threshold_e) / noise_std_e), where the threshold is the (k+1)-th largest noisy logit for an
expert that is in the top k and the k-th largest otherwise. The gate runs in float32 (outside autocast).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partialmethod

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupedQueryAttention", "MoEFeedForward", "moe_feed_forward", "moe_block_sizes", "gqa_layer",
           "expert_usage", "DEFAULT_MOE_OPTIONS"]

#: Options of feed-forward kind ``moe`` (``model.ffn_options``) and their defaults (the source's).
DEFAULT_MOE_OPTIONS: dict = {
    "experts": [3, 4, 5],      # experts per stage; the blocks are split into len(experts) stages
    "top_k": 2,                # experts per token
    "hidden": None,            # [first, last] expert hidden size, linear over depth; None: [dim, dim // 2]
    "dropout": 0.1,            # dropout on the feed-forward output
    "w_importance": 0.01,      # weight of CV(importance) in the load-balance loss
    "w_load": 0.01,            # weight of CV(load)
}


class GroupedQueryAttention(nn.Module):
    """Multi-head self-attention whose keys and values have ``kv_groups`` heads (GQA).

    Drop-in ``attn_layer`` of timm's ``Block`` (it takes timm's keyword arguments). Parameters: ``q`` (D -> D),
    ``kv`` (D -> 2 * kv_groups * D / num_heads, K rows first), ``proj`` (D -> D). Query head i uses key / value
    head ``i // (num_heads / kv_groups)``.

    Args:
        dim: Token width D.
        num_heads: Query heads; must divide D.
        kv_groups: Key / value heads; must divide ``num_heads`` (``num_heads`` gives plain multi-head attention).
        qkv_bias: Biases on the q and kv projections.
        proj_bias: Bias on the output projection.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout on the output.
        qk_norm, scale_norm: timm options this layer does not implement; must be False.

    Raises:
        ValueError: ``kv_groups`` does not divide ``num_heads`` or ``num_heads`` does not divide D.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, kv_groups: int, qkv_bias: bool = True,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, qk_norm: bool = False,
                 scale_norm: bool = False, norm_layer=None, device=None, dtype=None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention heads {num_heads} must divide the width {dim}")
        if kv_groups < 1 or num_heads % kv_groups:
            raise ValueError(f"kv_groups {kv_groups} must be a positive divisor of the {num_heads} attention heads")
        if qk_norm or scale_norm:
            raise ValueError("grouped-query attention has no qk_norm / scale_norm")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.kv_groups, self.head_dim = num_heads, kv_groups, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * kv_groups * self.head_dim, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d/h)
        k, v = self.kv(x).view(b, n, 2, self.kv_groups, self.head_dim).permute(2, 0, 3, 1, 4)  # 2 x (B, g, N, d/h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


def _coefficient_of_variation(x: torch.Tensor) -> torch.Tensor:
    """std / mean of a (E,) vector (population std; 1e-6 guards an all-zero vector), as the source."""
    return x.std(unbiased=False) / (x.mean() + 1e-6)


class MoEFeedForward(nn.Module):
    """Noisy top-k mixture of SwiGLU experts with shared V and W2 (module docstring).

    ``y = W2 (sum_e g_e(x) silu(W_e x) * V x) + b2`` with gates g that are non-zero for the top k experts of
    each token and sum to 1: the gate-weighted sum of the experts ``W2 (silu(W_e x) * V x) + b2``, computed with
    one V and one W2 product per token. Only the tokens routed to an expert pass through its W_e.

    Gating: ``H = x W_g + eps * softplus(x W_noise)``, eps ~ N(0, 1) in training mode; evaluation routes on the
    clean logits ``x W_g``, so probes and pictures are deterministic. Gates = softmax over the top-k H.
    After each forward, :attr:`aux_loss` holds the load-balance loss (fp32 scalar) and :attr:`usage` the share
    of tokens routed to each expert (fp32 (E,), detached; a row sums to k).

    Parameters: ``gate``, ``noise`` (D -> E), ``w.<e>`` (D -> hidden), ``v`` (D -> hidden), ``w2`` (hidden -> D).

    Args:
        dim: Token width D.
        hidden: Expert hidden size.
        num_experts: E.
        top_k: k, experts per token (1..E).
        dropout: Dropout on the output.
        w_importance: Weight of CV(importance).
        w_load: Weight of CV(load).
        bias: Biases on the expert projections (the gate always has them).

    Raises:
        ValueError: E < 1 or k outside 1..E.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, *, top_k: int = 2, dropout: float = 0.1,
                 w_importance: float = 0.01, w_load: float = 0.01, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"a mixture of experts needs at least one expert, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must lie in 1..{num_experts} (the number of experts)")
        dd = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.w_importance, self.w_load = w_importance, w_load
        self.gate = nn.Linear(dim, num_experts, **dd)
        self.noise = nn.Linear(dim, num_experts, **dd)
        self.w = nn.ModuleList(nn.Linear(dim, hidden, bias=bias, **dd) for _ in range(num_experts))
        self.v = nn.Linear(dim, hidden, bias=bias, **dd)
        self.w2 = nn.Linear(hidden, dim, bias=bias, **dd)
        self.drop = nn.Dropout(dropout)
        self.aux_loss: torch.Tensor | None = None
        self.usage: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates, chosen experts and the load-balance loss of (T, D) tokens.

        Returns:
            ``gates`` fp32 (T, E), zero outside each token's top k; ``chosen`` int64 (T, k); ``loss`` fp32 scalar.
        """
        k, e = self.top_k, self.num_experts
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            clean = self.gate(x)  # (T, E)
            noise_std = F.softplus(self.noise(x)).clamp_min(1e-6)  # (T, E)
            noisy = clean + torch.randn_like(clean) * noise_std if self.training else clean
            top, chosen = noisy.topk(min(k + 1, e), dim=-1)  # (T, k + 1) sorted, descending
            gates = torch.zeros_like(clean).scatter(1, chosen[:, :k], top[:, :k].softmax(dim=-1))
            importance = gates.sum(dim=0)  # (E,)
            if k < e:
                in_top = torch.zeros_like(clean, dtype=torch.bool).scatter(1, chosen[:, :k], True)
                threshold = torch.where(in_top, top[:, k:k + 1], top[:, k - 1:k])  # (T, E)
                prob = torch.distributions.Normal(0.0, 1.0).cdf((clean - threshold) / noise_std)
                load = prob.sum(dim=0)
            else:  # every expert is always chosen
                load = torch.full_like(importance, float(x.shape[0]))
            loss = self.w_importance * _coefficient_of_variation(importance) + \
                self.w_load * _coefficient_of_variation(load)
        return gates, chosen[:, :k], loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D); sets :attr:`aux_loss` and :attr:`usage`."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, D)
        gates, chosen, self.aux_loss = self.route(flat)
        vx = self.v(flat)  # (T, hidden), shared by the experts
        mixed = vx.new_zeros(vx.shape)
        for e, w_e in enumerate(self.w):
            idx = (chosen == e).any(dim=1).nonzero().squeeze(1)  # tokens routed to e (may be none: still in the graph)
            h = F.silu(w_e(flat[idx])) * vx[idx] * gates[idx, e:e + 1].to(vx.dtype)
            mixed = mixed.index_add(0, idx, h)
        self.usage = torch.bincount(chosen.flatten(), minlength=self.num_experts).float().div(flat.shape[0]).detach()
        return self.drop(self.w2(mixed)).view(shape)


def moe_block_sizes(options: dict, depth: int, dim: int, key: str = "model.ffn_options") -> list[tuple[int, int]]:
    """(experts, hidden size) of each of ``depth`` blocks, as the source lays them out.

    The blocks are split into ``len(experts)`` stages of ``depth // len(experts)`` blocks (the last stage takes
    the remainder); block i has the experts of its stage and the hidden size
    ``int((depth - 1 - i) / (depth - 1) * (first - last)) + last`` (``first`` for a single block).

    Args:
        options: The feed-forward options (:data:`DEFAULT_MOE_OPTIONS` keys; missing ones take the defaults).
        depth: Blocks.
        dim: Token width (the default hidden sizes are [dim, dim // 2]).
        key: Config key of ``options``, for messages.

    Raises:
        ValueError: an unknown option, an expert count below 1, ``top_k`` larger than a block's expert count,
            or malformed hidden sizes (the message names the key).
    """
    unknown = set(options) - set(DEFAULT_MOE_OPTIONS)
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {sorted(unknown)} of feed-forward 'moe'; "
                         f"known: {', '.join(DEFAULT_MOE_OPTIONS)}")
    opts = {**DEFAULT_MOE_OPTIONS, **options}
    experts, k, hidden = opts["experts"], opts["top_k"], opts["hidden"]
    if isinstance(experts, int) and not isinstance(experts, bool):
        experts = [experts]
    if not isinstance(experts, Sequence) or not experts or not all(isinstance(n, int) for n in experts):
        raise ValueError(f"{key}.experts: expected a list of expert counts (one per stage), got {experts!r}")
    if min(experts) < 1:
        raise ValueError(f"{key}.experts: an expert count must be at least 1, got {list(experts)}")
    if not isinstance(k, int) or k < 1 or k > min(experts):
        raise ValueError(f"{key}.top_k is {k!r}, but a block has only {min(experts)} experts ({key}.experts "
                         f"{list(experts)}); top_k must lie in 1..{min(experts)}")
    hidden = [dim, dim // 2] if hidden is None else hidden
    if (not isinstance(hidden, Sequence) or len(hidden) != 2 or
            not all(isinstance(h, int) and h >= 1 for h in hidden)):
        raise ValueError(f"{key}.hidden: expected [first, last] positive expert hidden sizes, got {hidden!r}")
    first, last = hidden
    stage_size = max(depth // len(experts), 1)
    out = []
    for i in range(depth):
        stage = min(i // stage_size, len(experts) - 1)
        size = first if depth == 1 else int((depth - 1 - i) / (depth - 1) * (first - last)) + last
        out.append((experts[stage], size))
    return out


def moe_feed_forward(options: dict, index: int, depth: int, key: str = "model.ffn_options") -> Callable[..., nn.Module]:
    """Feed-forward factory of kind ``moe`` (``multimae.encoder.FFN_LAYERS``): the ``mlp_layer`` of block ``index``.

    The returned callable takes timm's ``mlp_layer`` keyword arguments; ``hidden_features`` (from
    ``mlp_ratio``) is ignored, the block's hidden size comes from :func:`moe_block_sizes`.

    Raises:
        ValueError: invalid options (see :func:`moe_block_sizes`), raised when the block is built.
    """
    opts = {**DEFAULT_MOE_OPTIONS, **options}

    def build(in_features: int, hidden_features: int | None = None, act_layer=None, norm_layer=None,
              bias: bool = True, drop: float = 0.0, device=None, dtype=None) -> MoEFeedForward:
        experts, hidden = moe_block_sizes(options, depth, in_features, key)[index]
        return MoEFeedForward(in_features, hidden, experts, top_k=opts["top_k"], dropout=opts["dropout"],
                              w_importance=opts["w_importance"], w_load=opts["w_load"], bias=bias, device=device,
                              dtype=dtype)

    return build


@lru_cache(maxsize=None)
def gqa_layer(kv_groups: int) -> type[GroupedQueryAttention]:
    """timm ``attn_layer`` (timm wants a class) for :class:`GroupedQueryAttention` with ``kv_groups`` key / value
    heads: a subclass that fixes ``kv_groups``, one per value."""
    return type(f"GroupedQueryAttention{kv_groups}", (GroupedQueryAttention,),
                {"__init__": partialmethod(GroupedQueryAttention.__init__, kv_groups=kv_groups), "__module__": __name__})


def expert_usage(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The :attr:`MoEFeedForward.usage` of every mixture-of-experts layer inside ``module`` after its last forward.

    Returns:
        ``{prefix + module name: fp32 (E,) share of tokens routed to each expert}``, in module order; layers
        that have not run yet are left out.
    """
    return {f"{prefix}{name}": m.usage.cpu() for name, m in module.named_modules()
            if isinstance(m, MoEFeedForward) and m.usage is not None}
