"""Fine-tuning building blocks: the encoder from a checkpoint, the encoder + head model, layer decay, kNN, the
logistic-regression probe, label fractions.

The encoder is rebuilt from the checkpoint's ``encoder`` entry (architecture, token layout, domains), whatever
objective pretrained it; a from-scratch baseline builds the same architecture without the weights.
Checkpoint surgery follows MAE's fine-tuning load (He et al., CVPR 2022, ``main_finetune.py``): keep what the
new model can use, ``load_state_dict(strict=False)``, then assert the exact sets of missing and unexpected
keys, so a renamed parameter cannot silently stay at its random init. Position embeddings are
non-persistent buffers built from the encoder spec; at another image size ``finetune.pos_embed`` chooses between
MultiMAE's resized pretraining table and sin-cos computed on the new grid (:func:`build_backbone`).
``finetune.patch_size`` runs every domain at another patch size than the pretraining one (the adapters' kernels
resized as in FlexiViT, Beyer et al., CVPR 2023; positions in ground distance; :func:`check_patch_size`).

An encoder with metadata tokens (``model.metadata``, e.g. MoE-MAE's) reads ``batch["metadata"]`` in every
forward (:class:`FineTuneModel`); a dataset without metadata leaves the key out and the encoder uses its learned
missing embeddings. Segmentation heads read the grid tokens only; mean pooling includes the metadata tokens.

kNN follows OlmoEarth's ``evals/knn.py`` convention:
L2-normalised mean-pooled embeddings, cosine similarity, the k = 20 nearest training samples vote for their
label with weight exp(similarity / 0.07). The embeddings are pooled as ``finetune.pool`` says.

The logistic-regression probe follows MoE-MAE's (Albughdadi, arXiv 2509.10919; ``train_logistic_regression.py``):
scikit-learn ``LogisticRegression`` (solver sag, 1000 iterations), one-vs-rest for multi-label data, on the
pooled embeddings of the frozen encoder; here the features are standardised with the training statistics
(sag converges only on scaled features) and the inverse regularisation strength C is the one of a grid that
scores best on the validation split (torchgeo-bench chooses C on validation too).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multimae.build import build_encoder
from multimae.domains import get_domain
from multimae.encoder import MultiModalEncoder
from multimae.heads import ConvNeXtSegHead, LinearHead, LinearSegHead, pool_tokens
from utils.checkpoint import CheckpointError, load_state_checked, read_checkpoint

__all__ = [
    "LoadReport",
    "read_pretraining_checkpoint",
    "build_backbone",
    "check_patch_size",
    "load_backbone",
    "FineTuneModel",
    "build_head",
    "knn_scores",
    "LogisticProbe",
    "fit_logistic",
    "label_fraction_indices",
    "default_layer_decay",
    "new_parameter_prefixes",
]

#: Layer-wise lr decay used when ``optim.layer_decay`` is null (EPFL MultiMAE fine-tuning recipes).
_LAYER_DECAY = {"classification": 0.65, "multilabel": 0.65, "segmentation": 0.75}


def default_layer_decay(task: str) -> float:
    """Layer-wise lr decay of a task when ``optim.layer_decay`` is null: 0.65 (classification,
    multi-label) or 0.75 (segmentation), the EPFL MultiMAE defaults."""
    return _LAYER_DECAY[task]


def new_parameter_prefixes(new_domains: list[str], prefix: str = "encoder.") -> list[str]:
    """Name prefixes of the encoder parameters a checkpoint did not provide (adapters and domain embeddings
    of ``new_domains``), as ``utils.optim.param_groups(full_rate=...)`` takes them."""
    return [f"{prefix}{part}.{d}" + ("." if part == "input_adapters" else "")
            for d in new_domains for part in ("input_adapters", "domain_embeds")]


def read_pretraining_checkpoint(path: str | Path) -> dict:
    """Load a pretraining checkpoint (any objective, any readable format version) as a v2 dict.

    Raises:
        FileNotFoundError: ``path`` does not exist (config key ``finetune.checkpoint``).
        CheckpointError: unreadable, an unknown format version, or not a pretraining checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"finetune.checkpoint: no file {path}")
    try:
        return read_checkpoint(path, kind="pretraining")
    except CheckpointError as err:
        raise CheckpointError(f"finetune.checkpoint: {err} (it must come from run_pretraining.py)") from None


@dataclass
class LoadReport:
    """What :func:`load_backbone` did.

    Attributes:
        loaded_domains: Input domains whose adapters came from the checkpoint.
        new_domains: Input domains the checkpoint lacks (fresh adapters, trained from their init).
        missing: Encoder keys the checkpoint did not provide (exactly the new domains' keys).
        dropped: Checkpoint encoder keys not used (adapters of domains not asked for).
    """

    loaded_domains: list[str]
    new_domains: list[str]
    missing: list[str]
    dropped: list[str]


def _domain_of(key: str) -> str | None:
    """Domain a per-domain encoder parameter belongs to (``input_adapters.<d>.*``, ``domain_embeds.<d>``)."""
    parts = key.split(".")
    if parts[0] in ("input_adapters", "domain_embeds") and len(parts) > 1:
        return parts[1]
    return None


def build_backbone(cfg: dict, pretrained: dict | None, in_domains: list[str]) -> tuple[MultiModalEncoder, LoadReport | None]:
    """The fine-tuning encoder for ``in_domains``: pretrained, or a from-scratch baseline.

    With a checkpoint the architecture (width, depth, patch sizes, global tokens, ...) is the checkpoint's
    ``encoder.spec``, at the fine-tuning run's ``data.input_size`` and ``model.drop_path``; its weights are loaded
    unless ``finetune.from_scratch`` (the same architecture at its initialisation: a fair baseline). Without a
    checkpoint the encoder is ``model.*`` of this config, at its initialisation.

    Position embeddings (``finetune.pos_embed``), fixed sin-cos tables in both cases:

    - ``resize`` (default): MultiMAE's fine-tuning convention (Bachmann et al., ECCV 2022,
      ``interpolate_pos_embed_multimae`` in its fine-tuning scripts): the pretraining table resized to the
      fine-tuning grid. A checkpoint trained with ``model.pos_embed_grid`` keeps that base grid (its table is
      resized to every grid, as in pretraining); one without it gets the sin-cos table of its pretraining grid
      (``input_size / patch_size``) as the base grid. Image adapters resize bicubically (as MultiMAE), class-map
      adapters bilinearly (the mode of their pretraining). At the pretraining image size nothing changes.
    - ``recompute``: sin-cos computed on the fine-tuning grid (``model.pos_embed_grid`` null).

    ``finetune.patch_size`` (null: each domain's own patch size) is checked against the encoder built here
    (:func:`check_patch_size`); :class:`FineTuneModel` and :func:`build_head` take it.

    Returns:
        The encoder and what was loaded (None when nothing was).

    Raises:
        ValueError: ``finetune.from_scratch`` without ``finetune.checkpoint`` (no architecture to copy); an unknown
            ``finetune.pos_embed``; ``resize`` of a checkpoint whose input domains have their own patch sizes
            (``model.patch_sizes``: no single pretraining grid) at another image size; a ``finetune.patch_size``
            the encoder cannot run at (:func:`check_patch_size`).
        CheckpointError: the checkpoint's encoder does not fit its own spec.
    """
    ft = cfg["finetune"]
    if ft["pos_embed"] not in ("resize", "recompute"):
        raise ValueError(f"finetune.pos_embed must be 'resize' or 'recompute', got {ft['pos_embed']!r}")
    drop_path = float(cfg["model"]["drop_path"])
    if pretrained is None:
        if ft["from_scratch"]:
            raise ValueError("finetune.from_scratch copies the architecture of finetune.checkpoint, which is not set "
                             "(without a checkpoint the run is from scratch with model.* of this config)")
        cfg = {**cfg, "model": {**cfg["model"], "drop_path": drop_path}}
        encoder = build_encoder(cfg, in_domains=in_domains)
        check_patch_size(encoder, ft["patch_size"], position_fix="model.pos_embed_grid=null")
        return encoder, None
    entry = pretrained["encoder"]
    spec, size = dict(entry["spec"]), cfg["data"]["input_size"]
    if ft["pos_embed"] == "recompute":
        spec["pos_embed_grid"] = None
    elif spec.get("pos_embed_grid") is None and size != spec["input_size"]:
        own = {d: p for d, p in spec["patch_sizes"].items() if d in in_domains}
        if own:
            raise ValueError(f"finetune.pos_embed 'resize' needs one pretraining grid, but the checkpoint gives "
                             f"{', '.join(f'{d} patch {p} px' for d, p in own.items())} besides the base patch "
                             f"{spec['patch_size']} px; set finetune.pos_embed=recompute")
        spec["pos_embed_grid"] = spec["input_size"] // spec["patch_size"]  # the pretraining grid's sin-cos table
    encoder = MultiModalEncoder.from_spec(spec, in_domains=in_domains, input_size=size, drop_path=drop_path)
    check_patch_size(encoder, ft["patch_size"], position_fix="finetune.pos_embed=recompute")
    if ft["from_scratch"]:
        return encoder, None
    return encoder, load_backbone(encoder, entry["state_dict"], in_domains, source=str(ft["checkpoint"]))


def check_patch_size(encoder: MultiModalEncoder, patch_size, *, position_fix: str = "finetune.pos_embed=recompute"
                     ) -> int | None:
    """Check ``finetune.patch_size``: one patch side for every input domain of ``encoder`` (or None).

    The encoder runs at any patch size P with its own weights (``MultiModalEncoder.tokenize(patch_size=P)``:
    the projection kernels resized as in FlexiViT, Beyer et al., CVPR 2023; positions stay patch centres in
    base-patch units). P must divide the image side, be a multiple of each class-map domain's
    ``label_downsample``, and apply to one shared patch grid.

    Args:
        encoder: The fine-tuning encoder (built at ``data.input_size``).
        patch_size: The value of ``finetune.patch_size``.
        position_fix: The setting that gives position embeddings of the patch centres, for the message.

    Returns:
        ``patch_size`` (None: every domain at its own patch size).

    Raises:
        ValueError: one line naming ``finetune.patch_size``: not a positive int, not a divisor of
            ``data.input_size``, not a multiple of a class map's ``label_downsample``, an encoder whose input
            domains have their own patch sizes (``model.patch_sizes``: no single grid to rescale), or, at another
            patch size than the base one, position embeddings that are a resized table
            (``model.pos_embed_grid``, or ``finetune.pos_embed`` ``resize`` at another image size).
    """
    if patch_size is None:
        return None
    key = "finetune.patch_size"
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"{key} must be a positive whole number of pixels (or null), got {patch_size!r}")
    if encoder.input_size % patch_size:
        raise ValueError(f"{key} {patch_size} does not divide data.input_size {encoder.input_size}")
    own = {d: p for d, p in encoder.patch_sizes.items() if p != encoder.patch_size}
    if own:
        raise ValueError(f"{key} {patch_size}: the encoder gives "
                         f"{', '.join(f'{d} patch {p} px' for d, p in own.items())} besides the base patch "
                         f"{encoder.patch_size} px (model.patch_sizes), so there is no single patch grid to rescale; "
                         f"leave {key} null")
    for d in encoder.in_domains:
        dom = get_domain(d)
        if dom.kind == "categorical" and patch_size % dom.label_downsample:
            raise ValueError(f"{key} {patch_size} is not a multiple of the label_downsample {dom.label_downsample} "
                             f"of class-map domain {d!r}")
    if encoder.pos_embed_grid is not None and patch_size != encoder.patch_size:
        raise ValueError(f"{key} {patch_size} (the encoder's patch is {encoder.patch_size} px) needs position "
                         f"embeddings of the patch centres, not the resized {encoder.pos_embed_grid} x "
                         f"{encoder.pos_embed_grid} table (model.pos_embed_grid, or finetune.pos_embed resize at "
                         f"another image size); set {position_fix}")
    return patch_size


def load_backbone(encoder: nn.Module, state: dict[str, torch.Tensor], in_domains: list[str],
                  source: str = "checkpoint") -> LoadReport:
    """Load a checkpoint's encoder weights into a fine-tuning encoder.

    Keeps the blocks, global tokens and the adapters (and domain embeddings) of ``in_domains``; drops other
    domains' adapters. Loads with ``strict=False`` and then asserts that the missing keys are exactly those of
    the domains the checkpoint lacks and that nothing kept was unexpected.

    Args:
        encoder: :class:`MultiModalEncoder` built with ``in_domains``.
        state: The checkpoint's ``encoder.state_dict``.
        in_domains: Input domains of the fine-tuning run.
        source: Name of the checkpoint, for messages.

    Raises:
        CheckpointError: shapes differ (another encoder geometry), keys other than the new domains' adapters are
            missing, or kept keys are unexpected.
    """
    have = {_domain_of(k) for k in state} - {None}
    new_domains = [d for d in in_domains if d not in have]
    keep = {k: v for k, v in state.items() if _domain_of(k) in (None, *in_domains)}
    dropped = sorted(set(state) - set(keep))
    new_keys = tuple(new_parameter_prefixes(new_domains, prefix=""))
    load_state_checked(encoder, keep, what=f"encoder from {source}", ignore_missing=new_keys)
    missing = sorted(k for k in encoder.state_dict() if k not in keep)
    return LoadReport(sorted(set(in_domains) - set(new_domains)), new_domains, missing, dropped)


class FineTuneModel(nn.Module):
    """A multi-modal encoder (no masking, every token visible) plus a task head.

    Every method takes the batch's ``inputs``, ``valid`` and ``metadata`` (``batch.get("metadata")``:
    {field: float (B, 2) (sin, cos)}, NaN where absent; None without metadata). An encoder without metadata
    tokens ignores ``metadata``; one with them gives a field absent from the batch (or NaN) its learned missing
    embedding.

    Args:
        encoder: :class:`MultiModalEncoder`; its ``encode(inputs, valid=valid, metadata=metadata)`` gives
            (B, N + G, D) tokens in layout order: the grid domains' patch tokens, the metadata tokens (one per
            ``model.metadata`` field), then the global tokens. Parameters are named ``encoder.*`` and ``head.*``.
        head: :class:`LinearHead`, :class:`ConvNeXtSegHead` or :class:`LinearSegHead`; None for the protocols
            that train no head (kNN, logistic regression: only :meth:`embed` is used). A segmentation head must
            be built for the same ``patch_size`` (:func:`build_head`).
        freeze_encoder: Frozen encoder (probes): no gradients, always in eval mode.
        pool: Pooling of :meth:`embed` (``finetune.pool``).
        patch_size: One patch side in pixels for every input domain (``finetune.patch_size``, checked by
            :func:`check_patch_size`); None: each domain's own.
    """

    def __init__(self, encoder: MultiModalEncoder, head: nn.Module | None, *, freeze_encoder: bool = False,
                 pool: str = "mean", patch_size: int | None = None) -> None:
        super().__init__()
        self.encoder, self.head, self.freeze_encoder, self.pool = encoder, head, freeze_encoder, pool
        self.patch_size = patch_size
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    @property
    def in_domains(self) -> list[str]:
        """The encoder's input domains, in token order."""
        return list(self.encoder.in_domains)

    def train(self, mode: bool = True) -> "FineTuneModel":
        """Train mode for the head; the encoder stays in eval mode when frozen."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def tokens(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Encoder tokens (B, N + G, D) (metadata tokens included); no gradient when the encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.encoder.encode(inputs, valid=valid, metadata=metadata, patch_size=self.patch_size)

    def grids(self, tokens: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The patch tokens of every grid domain on one common grid, the finest of the layout.

        Each domain's tokens are its layout segment's; metadata and global tokens are in no grid. Domains with a
        coarser grid (a larger patch size) are repeated onto it (nearest neighbour).

        Returns:
            ``n_domains x (B, h * w, D)`` and (h, w).
        """
        x = inputs[self.encoder.in_domains[0]]
        layout = self.encoder.layout(tuple(x.shape[-2:]), self.patch_size)
        segments = layout.grid_segments()
        h, w = max((s.grid for s in segments), key=lambda g: g[0] * g[1])
        out = []
        for seg in segments:
            t = tokens[:, seg.slice]  # (B, h_d * w_d, D)
            if seg.grid != (h, w):
                g = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *seg.grid)
                t = F.interpolate(g, size=(h, w), mode="nearest").flatten(2).transpose(1, 2)
            out.append(t)
        return out, (h, w)

    def forward(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None,
                metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits: (B, K) for a :class:`LinearHead` (pooled as :meth:`embed`), (B, K, H, W) for a segmentation
        head (on :meth:`grids`).

        Raises:
            RuntimeError: the model has no head.
        """
        if self.head is None:
            raise RuntimeError("this fine-tuning model has no head (kNN / logistic protocols only embed)")
        tokens = self.tokens(inputs, valid, metadata)
        if isinstance(self.head, LinearHead):
            return self.head(tokens)
        grids, size = self.grids(tokens, inputs)
        return self.head(grids, size)

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None,
              metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, D) pooled encoder tokens, the embedding of kNN, the logistic probe and the embedding map.

        ``pool`` ``mean``: the mean of every output token, patch, metadata and global tokens alike (as MoE-MAE's
        probes pool its metadata, class and patch tokens); ``global``: the first global token.
        """
        return pool_tokens(self.encoder.encode(inputs, valid=valid, metadata=metadata, patch_size=self.patch_size),
                           self.pool, self.encoder.num_global_tokens)


def build_head(task: str, head: str, *, encoder: MultiModalEncoder, num_classes: int, pool: str = "mean",
               probe: bool = False, patch_size: int | None = None) -> nn.Module:
    """Head for a task from config keys ``finetune.task`` / ``finetune.head`` / ``finetune.pool`` /
    ``finetune.patch_size``.

    Fine-tuning: classification and multi-label use :class:`LinearHead` with LayerNorm (``head`` must be
    ``linear``); segmentation uses :class:`ConvNeXtSegHead` (``convnext``) or :class:`LinearSegHead` (``linear``)
    on the finest token grid of the encoder's grid domains (patch size P = ``patch_size`` when given, the one of
    every domain, else the smallest of their own patch sizes).
    A linear probe (``probe``) is linear whatever ``head`` says: BatchNorm without affine parameters and one
    Linear layer, on the pooled tokens (:class:`LinearHead`) or on every token of the grid (:class:`LinearSegHead`).

    Raises:
        ValueError: an unknown head for the task, or segmentation from image-level inputs only.
    """
    dim, in_domains = encoder.dim, encoder.in_domains
    if task in ("classification", "multilabel"):
        if head != "linear" and not probe:
            raise ValueError(f"finetune.head {head!r}: {task} uses the 'linear' head")
        return LinearHead(dim=dim, num_classes=num_classes, pool=pool, num_global_tokens=encoder.num_global_tokens,
                          norm="batch" if probe else "layer", init_std=0.01 if probe else 0.02 * 0.001)
    for d in in_domains:
        if get_domain(d).level != "pixel":
            raise ValueError(f"segmentation needs pixel-level input domains; {d!r} is image-level")
    patch_size = patch_size or min(encoder.patch_sizes[d] for d in in_domains)
    if probe or head == "linear":
        return LinearSegHead(dim=dim, num_classes=num_classes, num_domains=len(in_domains), patch_size=patch_size,
                             norm="batch" if probe else "layer")
    if head == "convnext":
        return ConvNeXtSegHead(dim=dim, num_classes=num_classes, num_domains=len(in_domains), patch_size=patch_size,
                               hidden_dim=max(32, dim // 2), upsample=4 if patch_size % 4 == 0 else 1)
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


@dataclass
class LogisticProbe:
    """A fitted logistic-regression probe (:func:`fit_logistic`).

    Attributes:
        model: The scikit-learn pipeline (standardisation, then ``LogisticRegression`` or one-vs-rest of it).
        c: The chosen inverse regularisation strength.
        val_scores: {C: validation score} of every C tried (empty when only one was given).
        num_classes: K.
        not_converged: The C values whose fit stopped at ``max_iter`` before converging.
    """

    model: object
    c: float
    num_classes: int
    val_scores: dict[float, float] = field(default_factory=dict)
    not_converged: list[float] = field(default_factory=list)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(Q, D) embeddings -> (Q, K) class probabilities (multi-label: one probability per label); classes the
        training labels lacked get probability 0."""
        est = self.model[-1]
        proba = self.model.predict_proba(x)
        out = np.zeros((len(x), self.num_classes), dtype=np.float64)
        out[:, np.asarray(est.classes_, dtype=np.int64) if proba.shape[1] != self.num_classes else slice(None)] = proba
        return out


def _logistic(c: float, multilabel: bool, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(C=c, solver="sag", max_iter=max_iter, random_state=seed)
    return make_pipeline(StandardScaler(), OneVsRestClassifier(clf) if multilabel else clf)


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, *, num_classes: int, cs: list[float],
                 score: Callable[[np.ndarray, np.ndarray], float] | None = None, val_x: np.ndarray | None = None,
                 val_y: np.ndarray | None = None, max_iter: int = 1000, seed: int = 0) -> LogisticProbe:
    """Fit a logistic-regression probe on embeddings, choosing C on the validation split.

    Args:
        train_x: (N, D) training embeddings.
        train_y: (N,) int class ids, or (N, K) 0/1 multi-hot labels (one-vs-rest, one binary fit per label).
        num_classes: K.
        cs: Inverse regularisation strengths to try (config key ``finetune.logistic_c``).
        score: ``(probabilities (Q, K), labels) -> float``, larger is better: the validation criterion.
        val_x, val_y: The validation split, needed when ``cs`` holds more than one value.
        max_iter: sag iterations (``finetune.logistic_max_iter``).
        seed: Seed of sag's sample order.

    Returns:
        The fit of the best C on the training split (ties: the smaller C, the stronger regularisation).

    Raises:
        ValueError: ``cs`` empty or not positive, several C without a validation split, or a multi-label
            column / class count that does not match ``num_classes``.
    """
    from sklearn.exceptions import ConvergenceWarning

    if not cs or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in cs):
        raise ValueError(f"finetune.logistic_c must be a non-empty list of positive numbers, got {cs}")
    multilabel = train_y.ndim == 2
    if multilabel and train_y.shape[1] != num_classes:
        raise ValueError(f"multi-label targets have {train_y.shape[1]} columns, expected {num_classes}")
    if len(cs) > 1 and (val_x is None or score is None or len(val_x) == 0):
        raise ValueError("finetune.logistic_c holds several values but there is no validation split to choose "
                         "among them (give one value, or a validation split)")
    fits, not_converged = {}, []
    for c in sorted(cs):
        model = _logistic(float(c), multilabel, max_iter, seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(train_x, train_y)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            not_converged.append(float(c))
        fits[float(c)] = model
    probes = {c: LogisticProbe(m, c, num_classes, not_converged=not_converged) for c, m in fits.items()}
    if len(cs) == 1:
        return next(iter(probes.values()))
    val_scores = {c: float(score(p.predict_proba(val_x), val_y)) for c, p in probes.items()}
    best = max(val_scores, key=lambda c: (val_scores[c], -c))
    probe = probes[best]
    probe.val_scores = val_scores
    return probe


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
