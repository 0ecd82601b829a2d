"""Fine-tuning building blocks: pretrained-checkpoint surgery, the backbone + head model, kNN, label fractions.

Checkpoint surgery follows MAE's fine-tuning load (He et al., CVPR 2022, ``main_finetune.py``): keep what the
new model can use, ``load_state_dict(strict=False)``, then assert the exact sets of missing and unexpected
keys, so a renamed parameter cannot silently stay at its random init. Position embeddings are
non-persistent buffers rebuilt for any image size, so they need no interpolation.

kNN follows OlmoEarth's ``evals/knn.py`` convention (``../shared/reference/peer_systems.md`` section 6):
L2-normalised mean-pooled embeddings, cosine similarity, the k = 20 nearest training samples vote for their
label with weight exp(similarity / 0.07).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from multimae.domains import get_domain
from multimae.heads import ConvNeXtSegHead, LinearHead, LinearSegHead
from utils.checkpoint import load_checkpoint, load_state_checked

__all__ = [
    "PRETRAINING_KIND",
    "LoadReport",
    "read_pretraining_checkpoint",
    "finetune_config",
    "load_backbone",
    "FineTuneModel",
    "build_head",
    "knn_scores",
    "label_fraction_indices",
    "default_layer_decay",
]

PRETRAINING_KIND = "multimae_pretraining"
#: Layer-wise lr decay used when ``optim.layer_decay`` is null (EPFL MultiMAE fine-tuning recipes).
_LAYER_DECAY = {"classification": 0.65, "multilabel": 0.65, "segmentation": 0.75}


def default_layer_decay(task: str) -> float:
    """Layer-wise lr decay of a task when ``optim.layer_decay`` is null: 0.65 (classification,
    multi-label) or 0.75 (segmentation), the EPFL MultiMAE defaults."""
    return _LAYER_DECAY[task]


def read_pretraining_checkpoint(path: str | Path) -> dict:
    """Load a pretraining checkpoint (``torch.load(weights_only=True)``) and check it is one.

    Raises:
        FileNotFoundError: ``path`` does not exist (config key ``finetune.checkpoint``).
        CheckpointError: the file cannot be read with ``weights_only=True``.
        ValueError: the file is not a dict with ``kind == "multimae_pretraining"``, ``model`` and ``config``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"finetune.checkpoint: no file {path}")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != PRETRAINING_KIND:
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not a MultiMAE pretraining checkpoint: key 'kind' is {kind!r}, "
            f"expected {PRETRAINING_KIND!r} (finetune.checkpoint must come from run_pretraining.py)"
        )
    for key in ("model", "config"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a complete pretraining checkpoint: key {key!r} is missing")
    return ckpt


def finetune_config(cfg: dict, ckpt: dict | None, in_domains: list[str]) -> dict:
    """The config the fine-tuning backbone is built from.

    The encoder geometry (``model`` section: preset, patch size, global tokens...) must match the
    checkpoint's, so it is taken from the checkpoint's stored config; ``model.drop_path`` stays the
    fine-tuning run's. ``in_domains`` replaces the config's, there are no output domains, and the masking
    budget covers every token.
    """
    out = copy.deepcopy(cfg)
    if ckpt is not None:
        drop_path = cfg["model"]["drop_path"]
        out["model"] = copy.deepcopy(ckpt["config"]["model"])
        out["model"]["drop_path"] = drop_path
    out["in_domains"] = list(in_domains)
    out["out_domains"] = []
    # No masking when fine-tuning: every token is encoded (the masking keys only have to be valid).
    n_d = (out["data"]["input_size"] // out["model"]["patch_size"]) ** 2
    out["masking"] = {**out["masking"], "num_encoded_tokens": n_d * len(in_domains), "alphas": 1.0}
    return out


@dataclass
class LoadReport:
    """What :func:`load_backbone` did.

    Attributes:
        loaded_domains: Input domains whose adapters came from the checkpoint.
        new_domains: Input domains the checkpoint lacks (fresh adapters, trained from their init).
        missing: Model keys the checkpoint did not provide (exactly the new domains' keys).
        dropped: Checkpoint keys not used (decoders, adapters of domains not asked for).
    """

    loaded_domains: list[str]
    new_domains: list[str]
    missing: list[str]
    dropped: list[str]


def _domain_of(key: str) -> str | None:
    """Domain a per-domain parameter belongs to (``input_adapters.<d>.*``, ``domain_embeds.<d>``), else None."""
    parts = key.split(".")
    if parts[0] in ("input_adapters", "domain_embeds") and len(parts) > 1:
        return parts[1]
    return None


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], in_domains: list[str],
                  source: str = "checkpoint") -> LoadReport:
    """Load a pretraining checkpoint's encoder and input adapters into a fine-tuning backbone.

    Keeps the encoder, global tokens and the adapters (and domain embeddings) of ``in_domains``; drops
    ``output_adapters.*`` and other domains' adapters. Loads with ``strict=False`` and then asserts that
    the missing keys are exactly those of the domains the checkpoint lacks and that nothing kept was
    unexpected.

    Args:
        model: MultiMAE built with ``in_domains`` and no output domains.
        state: The checkpoint's ``model`` state dict.
        in_domains: Input domains of the fine-tuning run.
        source: Name of the checkpoint, for messages.

    Raises:
        CheckpointError: shapes differ (another encoder geometry), keys other than the new domains' adapters
            are missing (not a MultiMAE pretraining checkpoint), or kept keys are unexpected.
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    have = {_domain_of(k) for k in state} - {None}
    new_domains = [d for d in in_domains if d not in have]
    keep = {k: v for k, v in state.items()
            if not k.startswith("output_adapters.") and _domain_of(k) in (None, *in_domains)}
    dropped = sorted(set(state) - set(keep))
    # strict=False + exact key assertion: only the new domains' adapters may be missing, nothing kept may be
    # unexpected, no shape may differ (utils.checkpoint.load_state_checked raises CheckpointError otherwise).
    new_keys = tuple(f"input_adapters.{d}." for d in new_domains) + tuple(f"domain_embeds.{d}" for d in new_domains)
    load_state_checked(model, keep, what=f"backbone from {source} (not a usable MultiMAE pretraining checkpoint?)",
                       ignore_missing=new_keys)
    missing = sorted(k for k in model.state_dict() if k not in keep)
    return LoadReport(sorted(set(in_domains) - set(new_domains)), new_domains, missing, dropped)


class FineTuneModel(nn.Module):
    """A MultiMAE backbone (no masking, all tokens visible) plus a task head.

    Args:
        model: MultiMAE whose ``encode(inputs, valid=valid)`` returns (B, sum N_d + G, D) tokens, domains in
            ``in_domains`` order, global tokens last. Named ``model`` so that ``utils.optim.multimae_layer_id``
            sees its parameters under their own names.
        head: :class:`LinearHead`, :class:`ConvNeXtSegHead` or :class:`LinearSegHead`.
        in_domains: Input domains, in the encoder's order.
        patch_size: Patch side P in pixels.
        freeze_encoder: Linear probe: the backbone gets no gradients and stays in eval mode.
    """

    def __init__(self, model: nn.Module, head: nn.Module, in_domains: list[str], *, patch_size: int,
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        self.model, self.head = model, head
        self.in_domains, self.patch_size, self.freeze_encoder = list(in_domains), patch_size, freeze_encoder
        if freeze_encoder:
            self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "FineTuneModel":
        """Train mode for the head; the backbone stays in eval mode when frozen."""
        super().train(mode)
        if self.freeze_encoder:
            self.model.eval()
        return self

    def grid_size(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(h, w) token grid of the (B, C, H, W) / (B, H, W) inputs: (H / P, W / P)."""
        x = inputs[self.in_domains[0]]
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def tokens(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Encoder tokens (B, sum N_d + G, D); no gradient when the encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.model.encode(inputs, valid=valid)

    def forward(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits: (B, K) for a :class:`LinearHead`, (B, K, H, W) for a segmentation head."""
        tokens = self.tokens(inputs, valid)
        if isinstance(self.head, LinearHead):
            return self.head(tokens)
        h, w = self.grid_size(inputs)
        n = h * w
        grids = [tokens[:, i * n:(i + 1) * n] for i in range(len(self.in_domains))]  # n_domains x (B, h*w, D)
        return self.head(grids, (h, w))

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, D) mean of all encoder tokens (the kNN embedding)."""
        return self.model.encode(inputs, valid=valid).mean(dim=1)


def build_head(task: str, head: str, *, dim: int, num_classes: int, in_domains: list[str], patch_size: int,
               pool: str = "mean", num_global_tokens: int = 1, full_finetune: bool = True) -> nn.Module:
    """Head for a task from config keys ``finetune.task`` / ``finetune.head`` / ``finetune.pool``.

    Classification and multi-label use :class:`LinearHead` (``head`` must be ``linear``); segmentation uses
    :class:`ConvNeXtSegHead` (``convnext``) or :class:`LinearSegHead` (``linear``). Segmentation needs pixel
    domains: every input domain gives one (h, w) token grid.

    Raises:
        ValueError: an unknown head for the task.
    """
    if task in ("classification", "multilabel"):
        if head != "linear":
            raise ValueError(f"finetune.head {head!r}: {task} uses the 'linear' head")
        return LinearHead(dim=dim, num_classes=num_classes, pool=pool, num_global_tokens=num_global_tokens,
                          init_scale=0.001 if full_finetune else 1.0)
    for d in in_domains:
        if get_domain(d).level != "pixel":
            raise ValueError(f"segmentation needs pixel-level input domains; {d!r} is image-level")
    if head == "convnext":
        return ConvNeXtSegHead(dim=dim, num_classes=num_classes, num_domains=len(in_domains), patch_size=patch_size,
                               hidden_dim=max(32, dim // 2), upsample=4 if patch_size % 4 == 0 else 1)
    if head == "linear":
        return LinearSegHead(dim=dim, num_classes=num_classes, num_domains=len(in_domains), patch_size=patch_size)
    raise ValueError(f"finetune.head must be 'linear' or 'convnext' for segmentation, got {head!r}")


@torch.no_grad()
def knn_scores(train_emb: torch.Tensor, train_labels: torch.Tensor, query_emb: torch.Tensor, *, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores with cosine similarity (OlmoEarth ``evals/knn.py`` convention).

    Args:
        train_emb: (N, D) training embeddings.
        train_labels: (N,) int64 class ids, or (N, K) multi-hot labels (multi-label kNN).
        query_emb: (Q, D) embeddings to classify.
        num_classes: K.
        k: Neighbours (capped at N).
        temperature: Vote weight exp(cosine similarity / temperature).
        chunk: Queries per similarity block (bounds memory to chunk x N).

    Returns:
        (Q, K) scores: per class, the sum of the neighbours' vote weights divided by the total weight, so
        rows sum to 1 for single-label data; for multi-label data each column is the weighted fraction of
        neighbours holding that label.
    """
    train = F.normalize(train_emb.float(), dim=1)
    onehot = train_labels.float() if train_labels.dim() == 2 else F.one_hot(train_labels.long(), num_classes).float()
    k = min(k, train.shape[0])
    out = []
    for q in F.normalize(query_emb.float(), dim=1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)  # (q, k)
        weight = (sim / temperature).exp()  # (q, k)
        votes = (weight[..., None] * onehot[idx]).sum(dim=1)  # (q, K)
        out.append(votes / weight.sum(dim=1, keepdim=True))
    return torch.cat(out)


def label_fraction_indices(num_samples: int, fraction: float, seed: int) -> list[int]:
    """A seeded random subset of ``round(fraction * num_samples)`` (at least 1) training indices, sorted.

    ``fraction`` 1.0 returns every index. The same (``num_samples``, ``fraction``, ``seed``) always gives the
    same subset, and a smaller fraction's subset is contained in a larger one's (one permutation per seed).

    Raises:
        ValueError: ``fraction`` outside (0, 1] (config key ``finetune.label_fraction``).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"finetune.label_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(range(num_samples))
    count = max(1, round(fraction * num_samples))
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:count].tolist())
