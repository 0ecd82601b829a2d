"""Dirichlet token-budget masking (Bachmann et al., MultiMAE, ECCV 2022, section 3.2).

Every sample shows the encoder exactly K = ``num_encoded_tokens`` of the tokens of all input domains
together. Per sample, proportions p ~ Dirichlet(alpha) over the n input domains decide how the
budget is split: domain t gets about round(p_t * K) visible tokens, chosen at random within the
domain. A global random ranking then fixes the rounding so that exactly K stay visible: surplus
visible tokens are dropped at random, a shortfall is filled with random masked tokens. Smaller
alpha gives more uneven splits (the budget concentrates on few domains); alpha = 1 is uniform over
the simplex; large alpha gives near-equal shares.

Masks use the MAE convention: float, **1 = masked** (hidden from the encoder), **0 = visible**.

No-data patches (a decision of this re-implementation; the reference has no validity masks): a
token whose patch holds no valid pixel is never made visible while a valid token is still masked.
Within a domain, valid tokens are picked first; a domain with fewer valid tokens than its share
gives the rest of its share to random valid tokens of the other domains. The budget therefore goes
to real data (a sample with a missing modality spends its K tokens on the others), and K stays
fixed so the batch can be stacked. Only a sample with fewer than K valid tokens in all its domains
shows no-data tokens (filled input, i.e. zeros). No-data tokens add nothing to the losses either
(they have no valid pixel), see :mod:`multimae.criterion`.

All functions are pure: randomness comes from the optional ``generator`` (or torch's global RNG).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "expand_alphas",
    "sample_domain_proportions",
    "random_masks",
    "mask_to_ids",
    "split_masks",
]


def expand_alphas(alphas: float | Sequence[float], num_domains: int) -> torch.Tensor:
    """Dirichlet concentration per input domain.

    Args:
        alphas: One value for every domain, or one per domain (in ``in_domains`` order).
        num_domains: Number of input domains n.

    Returns:
        float32 (n,).

    Raises:
        ValueError: If the number of values is not 1 or n, or a value is not positive (names
            ``masking.alphas``).
    """
    values = [float(alphas)] * num_domains if isinstance(alphas, (int, float)) else [float(a) for a in alphas]
    if len(values) != num_domains:
        raise ValueError(f"masking.alphas: expected 1 or {num_domains} values (one per in_domain), got {len(values)}")
    if any(a <= 0 for a in values):
        raise ValueError(f"masking.alphas: Dirichlet concentrations must be > 0, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def _dirichlet(concentration: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample Dirichlet rows (B, n) from a (B, n) concentration on the CPU."""
    dist = torch.distributions.Dirichlet(concentration)
    if generator is None:
        return dist.sample()
    # torch's gamma sampler takes no generator: run it on the global CPU RNG seeded from the
    # generator and restored afterwards. Seed only the CPU RNG: torch.manual_seed would also reseed
    # every CUDA device's RNG, which fork_rng(devices=[]) does not restore.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return dist.sample()


def sample_domain_proportions(
    batch_size: int,
    alphas: torch.Tensor,
    *,
    sample_domains_uniformly: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample share of the visible-token budget for each input domain.

    Args:
        batch_size: Samples B.
        alphas: Concentration per domain (n,), see :func:`expand_alphas`.
        sample_domains_uniformly: First draw, per sample, a non-empty subset of the domains
            uniformly from the 2^n - 1 options, and use ``alpha * 1[chosen] + 1e-5`` as that
            sample's concentration (so the budget goes to the chosen domains).
        generator: Optional CPU generator.

    Returns:
        float32 (B, n) on the CPU, rows summing to 1.
    """
    n = alphas.numel()
    conc = alphas.view(1, n).expand(batch_size, n)
    if sample_domains_uniformly:
        subset = torch.randint(1, 2**n, (batch_size, 1), generator=generator)  # bit t set = domain t chosen
        chosen = (subset >> torch.arange(n)) & 1
        conc = conc * chosen + 1e-5
    return _dirichlet(conc.contiguous(), generator)


def random_masks(
    tokens_per_domain: Sequence[int],
    batch_size: int,
    num_encoded_tokens: int,
    alphas: float | Sequence[float] = 1.0,
    *,
    sample_domains_uniformly: bool = False,
    token_valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw masks with exactly K visible tokens per sample, split across domains by Dirichlet.

    Args:
        tokens_per_domain: N_t for each input domain, in the order the tokens are concatenated.
        batch_size: Samples B.
        num_encoded_tokens: Budget K of visible tokens per sample.
        alphas: Dirichlet concentration, one value or one per domain.
        sample_domains_uniformly: See :func:`sample_domain_proportions`.
        token_valid: Optional bool (B, N) with N = sum N_t: False for tokens whose patch has no
            valid pixel; those are made visible only when no valid token is left (module docstring).
        generator: Optional generator; its device is used for the token noise, and it seeds the
            CPU draws of the domain proportions, so it fixes the whole mask. The global RNGs are left
            as they were.
        device: Device of the result when no generator is given.

    Returns:
        float32 mask (B, N): 1 = masked, 0 = visible; each row has exactly K zeros.

    Raises:
        ValueError: If K is not in 1..N (names ``masking.num_encoded_tokens``) or the alphas do not
            fit the domains.
    """
    sizes = torch.tensor(list(tokens_per_domain))
    total = int(sizes.sum())
    if not 1 <= num_encoded_tokens <= total:
        raise ValueError(
            f"masking.num_encoded_tokens is {num_encoded_tokens}, but the input domains have {total} tokens "
            f"in total ({list(tokens_per_domain)}); choose 1..{total}"
        )
    alpha = expand_alphas(alphas, len(sizes))
    device = generator.device if generator is not None else torch.device(device or "cpu")
    cpu_gen = generator
    if generator is not None and generator.device.type != "cpu":  # the proportions are drawn on the CPU
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))
    props = sample_domain_proportions(
        batch_size, alpha, sample_domains_uniformly=sample_domains_uniformly, generator=cpu_gen
    )
    counts = torch.minimum((props * num_encoded_tokens).round().long(), sizes).to(device)  # (B, n)

    domain_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)  # (N,)
    offsets = (torch.cumsum(sizes, 0) - sizes).to(device)  # first token of each domain
    invalid = (
        torch.zeros(batch_size, total, device=device) if token_valid is None else (~token_valid).float().to(device)
    )
    # 1. Within each domain, a random order with valid tokens first; its first n_t are picked.
    noise = torch.rand(batch_size, total, generator=generator, device=device)
    order = torch.argsort(domain_of * 4.0 + invalid * 2.0 + noise, dim=1)
    position = torch.empty_like(order).scatter_(1, order, torch.arange(total, device=device).expand_as(order))
    picked = (position - offsets[domain_of]) < counts[:, domain_of]  # (B, N)
    # 2. Global ranking: picked valid, other valid, picked no-data, other no-data; keep the first K.
    noise = torch.rand(batch_size, total, generator=generator, device=device)
    rank_key = (~picked).float() + invalid * 2.0 + noise
    keep = torch.argsort(rank_key, dim=1)[:, :num_encoded_tokens]
    return torch.ones(batch_size, total, device=device).scatter_(1, keep, 0.0)


def mask_to_ids(mask: torch.Tensor, num_visible: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors to gather the visible tokens and to put decoder tokens back in place.

    Visible tokens keep their concatenated (domain, row-major) order.

    Args:
        mask: float or bool (B, N), 1 = masked; every row must have the same number K of zeros.
        num_visible: K when the caller knows it (masks from :func:`random_masks`); skips the check,
            which reads the mask back from the device.

    Returns:
        ``ids_keep`` int64 (B, K): positions of the visible tokens; ``ids_restore`` int64 (B, N):
        for each position, its index in ``[visible tokens, masked tokens]``.

    Raises:
        ValueError: If rows have different numbers of visible tokens or none at all.
    """
    k = num_visible
    if k is None:
        visible = (mask < 0.5).sum(dim=1)
        k = int(visible[0])
        if k == 0 or bool((visible != k).any()):
            raise ValueError(
                "masks must leave the same, non-zero number of visible tokens in every sample; "
                f"got {visible.tolist()}"
            )
    ids_shuffle = torch.argsort((mask >= 0.5).to(torch.uint8), dim=1, stable=True)  # visible first
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :k], ids_restore


def split_masks(mask: torch.Tensor, domains: Sequence[str], tokens_per_domain: Sequence[int]) -> dict[str, torch.Tensor]:
    """Split a concatenated mask (B, N) into per-domain masks {domain: (B, N_t)}."""
    return dict(zip(domains, torch.split(mask, list(tokens_per_domain), dim=1)))
