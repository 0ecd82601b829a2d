"""Pictures of a pretraining objective: :func:`save_pictures` renders what ``Objective.pictures`` returns.

Kind ``reconstruction`` (MultiMAE-EO, :func:`save_reconstructions`): for each sample, one row per domain with
input, mask, prediction, target.

Kind ``embedding_map`` (fine-tuning probes, :func:`save_embedding_map`): a 2-D t-SNE map (van der Maaten and
Hinton, JMLR 2008; scikit-learn's ``TSNE``) of the frozen encoder's pooled embeddings, one dot per sample coloured
by its label.
Any kind may carry ``expert_usage`` (mixture-of-experts layers, :func:`save_expert_usage`): a heat map of the
share of tokens each layer routed to each of its experts, written to ``<output_dir>/expert_usage/``.

Kind ``latent`` (latent objectives such as Latent MIM, :func:`save_latent_maps`): for each sample, the RGB input
beside a PCA-to-RGB map of the encoder's patch tokens of every input domain, then one row per band set with
its token roles, the cosine similarity between prediction and target at decoder tokens, and whether each
prediction picks out its own target among the sample's decoder targets.

Rendering per domain kind (matplotlib, Agg backend, no display needed):

- Sentinel-2 and other multi-band continuous domains: the first three bands as RGB (one band is
  replicated to grey), each stretched between its 2nd and 98th percentile over the target; the
  prediction uses the target's stretch so colours are comparable.
- Elevation (``aster``): the ``terrain`` colour map, same limits for prediction and target.
- Land-cover class maps: the registry's ``class_colors`` palette, with a legend of the classes
  present; predictions are the arg-max class.
- The input column greys out masked tokens (hidden from the encoder); the mask column is white
  where masked, black where visible; the prediction column shows the reconstruction at masked
  tokens with the visible target patches pasted in (MAE's "reconstruction + visible"), since no
  loss trains the visible ones.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from multimae.criterion import norm_pix_target  # noqa: E402
from multimae.domains import IGNORE_INDEX, get_domain  # noqa: E402

__all__ = ["save_pictures", "save_reconstructions", "save_prediction_preview", "save_embedding_map", "save_expert_usage"]
__all__ = ["save_pictures", "save_reconstructions", "save_latent_maps"]

_GREY = np.array([0.55, 0.55, 0.55])
_MIN_HALF_RANGE = 0.25  # z-score units
_COLUMNS = ("input (masked grey)", "mask (white = masked)", "prediction + visible", "target")


def _token_mask_image(mask: torch.Tensor, size: int) -> np.ndarray:
    """(N,) token mask (1 = masked) of a square grid -> (size, size) bool, True = masked."""
    side = int(round(mask.numel() ** 0.5))
    grid = mask.float().view(1, 1, side, side)
    return F.interpolate(grid, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5


def _stretch_limits(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band 2 % and 98 % percentiles of (C, H, W) ``x`` over valid pixels."""
    pix = x.reshape(x.shape[0], -1)[:, valid.reshape(-1)] if valid.any() else x.reshape(x.shape[0], -1)
    lo, hi = np.percentile(pix, 2, axis=1), np.percentile(pix, 98, axis=1)
    # Flat targets (sea, ice) keep a stretch of at least half a standard deviation of the band stats.
    mid, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, _MIN_HALF_RANGE)
    return (mid - half)[:, None, None], (mid + half)[:, None, None]


def _to_rgb(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1] from the first three bands (one band replicated)."""
    x = np.clip((x - lo) / (hi - lo), 0, 1)
    x = x[:3] if x.shape[0] >= 3 else np.repeat(x[:1], 3, axis=0)
    return x.transpose(1, 2, 0)


def _class_rgb(labels: np.ndarray, colors: tuple[str, ...]) -> np.ndarray:
    """(H, W) class ids (IGNORE_INDEX = black) -> (H, W, 3)."""
    palette = np.array([to_rgb(c) for c in colors] + [(0.0, 0.0, 0.0)])
    return palette[np.where(labels == IGNORE_INDEX, len(colors), labels)]


def _grey_out(rgb: np.ndarray, masked: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    out[masked] = 0.35 * out[masked] + 0.65 * _GREY
    return out


def _domain_panels(name: str, inp: torch.Tensor, pred: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                   patch_size: int, norm_pix: bool) -> tuple[list[np.ndarray], dict[str, str] | None]:
    """Input (masked greyed), mask, prediction, target as (H, W, 3) images for one sample of one domain.

    Returns the four images and, for class maps, {class name: colour} of the classes shown.
    """
    dom = get_domain(name)
    size = inp.shape[-1]
    masked = _token_mask_image(mask, size)
    mask_img = np.repeat(masked[..., None].astype(float), 3, axis=2)
    if dom.kind == "categorical":
        target = torch.where(valid, inp, IGNORE_INDEX).numpy()
        pred_cls = F.interpolate(pred[None].float(), size=(size, size), mode="nearest")[0].argmax(0).numpy()
        tgt_rgb, pred_rgb = _class_rgb(target, dom.class_colors), _class_rgb(pred_cls, dom.class_colors)
        pred_rgb = np.where(masked[..., None], pred_rgb, tgt_rgb)
        present = sorted(set(np.unique(target[target >= 0]).tolist()) | set(np.unique(pred_cls).tolist()))
        legend = {dom.class_names[i]: dom.class_colors[i] for i in present}
        return [_grey_out(tgt_rgb, masked), mask_img, pred_rgb, tgt_rgb], legend
    target = inp.float()
    if norm_pix:
        target = norm_pix_target(target[None], valid[None], patch_size)[0]
    target, pred, ok = target.numpy(), pred.float().numpy(), valid.numpy()
    lo, hi = _stretch_limits(target, ok)
    if dom.modality == "aster":
        cmap = plt.get_cmap("terrain")
        lo1, hi1 = float(lo[0, 0, 0]), float(hi[0, 0, 0])
        tgt = cmap(np.clip((target[0] - lo1) / (hi1 - lo1), 0, 1))[..., :3]
        prd = cmap(np.clip((pred[0] - lo1) / (hi1 - lo1), 0, 1))[..., :3]
    else:
        tgt, prd = _to_rgb(target, lo, hi), _to_rgb(pred, lo, hi)
    tgt = np.where(ok[..., None], tgt, 0.0)
    prd = np.where(masked[..., None], prd, tgt)  # MAE style: the reconstruction with the visible patches pasted
    return [_grey_out(tgt, masked), mask_img, prd, tgt], None


def save_pictures(output_dir: str | Path, tag: str, data: dict) -> list[Path]:
    """Render an objective's pictures (``Objective.pictures``) into ``<output_dir>/<folder of the kind>/``.

    Args:
        output_dir: The run's output folder.
        tag: File-name suffix, e.g. ``step000120``.
        data: ``{"kind": ..., ...}``; kind ``reconstruction``: the keyword arguments of
            :func:`save_reconstructions` (``inputs``, ``valid``, ``preds``, ``masks``, ``patch_sizes``, ``norm_pix``);
            kind ``embedding_map``: those of :func:`save_embedding_map` (into ``<output_dir>/embedding_maps/``);
            kind ``latent``: those of :func:`save_latent_maps` (into ``<output_dir>/latent/``); any kind: optional
            ``expert_usage`` (the argument of :func:`save_expert_usage`).

    Returns:
        Paths of the written PNG files.

    Raises:
        ValueError: an unknown kind.
    """
    kind = data.get("kind")
    usage = save_expert_usage(Path(output_dir) / "expert_usage", tag, data.get("expert_usage") or {})
    args = {k: v for k, v in data.items() if k not in ("kind", "expert_usage")}
    if kind == "reconstruction":
        return usage + save_reconstructions(Path(output_dir) / "reconstructions", tag, **args)
    if kind == "embedding_map":
        return usage + [save_embedding_map(Path(output_dir) / "embedding_maps", tag, **args)]
    if kind == "latent":
        return usage + save_latent_maps(Path(output_dir) / "latent", tag, **args)
    raise ValueError(f"no picture writer for kind {kind!r}")


@torch.no_grad()
def save_reconstructions(folder: str | Path, tag: str, inputs: dict[str, torch.Tensor],
                         valid: dict[str, torch.Tensor], preds: dict[str, torch.Tensor],
                         masks: dict[str, torch.Tensor], *, patch_sizes: dict[str, int], norm_pix=(),
                         num_samples: int | None = None) -> list[Path]:
    """Write one PNG per sample: a row per output domain with input, mask, prediction and target.

    Args:
        folder: Destination (``<output_dir>/reconstructions``), created if needed.
        tag: File-name suffix, e.g. ``step000120``; files are ``sample<i>_<tag>.png``.
        inputs: Batch inputs {domain: float (B, C, H, W) z-scored or int64 (B, H, W) class ids}.
        valid: {domain: bool (B, H, W)}.
        preds: Model output {domain: (B, C, H, W) or logits (B, K, H / ds, W / ds)}.
        masks: {domain: (B, N_d) float, 1 = masked}, square token grids.
        patch_sizes: Patch side in px of each output domain's tokens (for per-patch normalised targets).
        norm_pix: Output domains whose target is normalised per patch.
        num_samples: Samples drawn (default: all B).

    Returns:
        Paths of the written PNG files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    domains = list(preds)
    cpu = {k: {d: t.detach().cpu() for d, t in v.items()} for k, v in
           (("inputs", inputs), ("valid", valid), ("preds", preds), ("masks", masks))}
    b = next(iter(cpu["preds"].values())).shape[0]
    paths = []
    for i in range(b if num_samples is None else min(num_samples, b)):
        fig, axes = plt.subplots(len(domains), 4, figsize=(9.5, 2.3 * len(domains)), squeeze=False)
        for row, name in enumerate(domains):
            src = get_domain(name).source or name
            panels, legend = _domain_panels(
                name, cpu["inputs"][src][i], cpu["preds"][name][i], cpu["valid"][src][i], cpu["masks"][name][i],
                patch_sizes[name], name in set(norm_pix),
            )
            for col, (ax, img) in enumerate(zip(axes[row], panels)):
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(_COLUMNS[col], fontsize=9)
            axes[row, 0].set_ylabel(name, fontsize=9)
            if legend:
                handles = [Patch(color=c, label=n) for n, c in legend.items()]
                axes[row, 3].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7,
                                    frameon=False)
        fig.suptitle(f"{tag}, sample {i}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        path = folder / f"sample{i}_{tag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def save_prediction_preview(path: str | Path, classes: np.ndarray, class_names: list[str], class_colors: list[str],
                            *, image: np.ndarray | None = None, image_valid: np.ndarray | None = None,
                            title: str = "") -> Path:
    """A PNG of a predicted class map with a legend of the classes present, beside the input image if given.

    Args:
        path: The PNG to write.
        classes: (H, W) int class ids, ``IGNORE_INDEX`` (black) where there is no prediction.
        class_names, class_colors: Per class id, name and RGB hex colour.
        image: Optional (C, H, W) input values (e.g. Sentinel-2 B04, B03, B02), shown as RGB with a 2-98 %
            stretch over ``image_valid`` (bool (H, W)).
        title: Figure title.

    Returns:
        ``path``.
    """
    path = Path(path)
    panels = []
    if image is not None:
        ok = np.ones(classes.shape, bool) if image_valid is None else image_valid
        lo, hi = _stretch_limits(image, ok)
        panels.append(("input", np.where(ok[..., None], _to_rgb(image, lo, hi), 0.0)))
    panels.append(("predicted classes", _class_rgb(classes, tuple(class_colors))))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.8, 4.4), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    present = np.unique(classes[classes >= 0]).tolist()
    handles = [Patch(color=class_colors[i], label=class_names[i]) for i in present]
    if (classes == IGNORE_INDEX).any():
        handles.append(Patch(color="black", label="no data"))
    axes[0, -1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_embedding_map(folder: str | Path, tag: str, embeddings, labels, *, class_names: list[str],
                       title: str = "", max_samples: int = 2000, seed: int = 0) -> Path:
    """Write ``tsne_<tag>.png``: a t-SNE map of embeddings, coloured by label.

    Args:
        folder: Destination (``<output_dir>/embedding_maps``), created if needed.
        tag: File-name suffix, e.g. the split ``test``.
        embeddings: (N, D) float array or tensor (pooled encoder tokens).
        labels: (N,) int class ids, or (N, K) 0/1 multi-hot labels (each dot takes the colour of the sample's
            first label in class order; samples without a label are grey).
        class_names: K names for the legend.
        title: Figure title (e.g. checkpoint, inputs, split).
        max_samples: At most this many samples are mapped (a seeded random subset).
        seed: Seed of the subset and of t-SNE.

    Returns:
        The path of the PNG.

    Raises:
        ValueError: fewer than 4 samples (t-SNE needs a perplexity below the sample count), or labels that do
            not match the embeddings.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(labels)
    if len(x) != len(y):
        raise ValueError(f"embedding map: {len(x)} embeddings but {len(y)} labels")
    if len(x) < 4:
        raise ValueError(f"embedding map: t-SNE needs at least 4 samples, got {len(x)}")
    rng = np.random.default_rng(seed)
    if len(x) > max_samples:
        keep = np.sort(rng.choice(len(x), max_samples, replace=False))
        x, y = x[keep], y[keep]
    multilabel = y.ndim == 2
    ids = np.where(y.any(axis=1), y.argmax(axis=1), -1) if multilabel else y.astype(np.int64)
    xy = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    k = len(class_names)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "turbo")
    colours = [cmap(i if k <= 20 else i / max(1, k - 1)) for i in range(k)]
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for i in sorted(set(ids.tolist())):
        sel = ids == i
        name = class_names[i] if i >= 0 else "no label"
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=colours[i] if i >= 0 else _GREY, label=f"{name} ({sel.sum()})")
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False,
              title="first label" if multilabel else "label", title_fontsize=8)
    ax.set_title(title or f"t-SNE of {len(x)} embeddings ({tag})", fontsize=9)
    fig.tight_layout()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tsne_{tag}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_expert_usage(folder: str | Path, tag: str, usage: dict[str, torch.Tensor]) -> list[Path]:
    """Heat map of the expert usage of every mixture-of-experts layer: rows = layers, columns = experts.

    A cell is the share of the layer's tokens routed to that expert (each token goes to k experts, so a row
    sums to k; an even split is k / E); layers with fewer experts leave their extra cells blank.

    Args:
        folder: Destination (``<output_dir>/expert_usage``), created if needed.
        tag: File-name suffix; the file is ``expert_usage_<tag>.png``.
        usage: ``{layer name: (E,) share per expert}`` in layer order (:func:`multimae.moe.expert_usage`);
            empty: nothing is written.

    Returns:
        The written PNG path (an empty list for no layers).
    """
    if not usage:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [n.removesuffix(".mlp") for n in usage]
    width = max(int(u.numel()) for u in usage.values())
    grid = np.full((len(usage), width), np.nan)
    for row, u in enumerate(usage.values()):
        grid[row, :u.numel()] = u.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(1.4 + 0.7 * width, 0.9 + 0.32 * len(names)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (r, c), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(width), [str(e) for e in range(width)], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("expert", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="share of tokens routed")
    ax.set_title(f"expert usage, {tag}", fontsize=9)
    fig.tight_layout()
    path = folder / f"expert_usage_{tag}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
# Token roles of a latent objective (encoder, target-only, decoder, missing) as colours.
_ROLE_COLORS = ("#1f77b4", "#d9d9d9", "#ff7f0e", "#000000")
_ROLE_LABELS = ("encoder", "target only", "decoder", "missing")


def _pca_rgb(tokens: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """{domain: (B, N_d, D)} -> {domain: (B, N_d, 3)} in [0, 1]: the first three principal components of every
    token of every domain and sample together (one basis, so colours compare), each stretched between its
    1st and 99th percentile."""
    names = list(tokens)
    flat = torch.cat([tokens[d].reshape(-1, tokens[d].shape[-1]).float() for d in names])  # (M, D)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    comps = (flat @ vh[:3].T).numpy()  # (M, <= 3)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    comps = np.clip((comps - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    out, start = {}, 0
    for d in names:
        b, n = tokens[d].shape[:2]
        out[d] = comps[start:start + b * n].reshape(b, n, 3)
        start += b * n
    return out


def _grid_image(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N,) or (N, 3) per-token values on a row-major (h, w) grid -> (h, w) or (h, w, 3)."""
    return values.reshape(grid[0], grid[1], *values.shape[1:])


@torch.no_grad()
def save_latent_maps(folder: str | Path, tag: str, *, rgb: torch.Tensor | None, rgb_valid: torch.Tensor | None,
                     grids: dict[str, tuple[int, int]], roles: dict[str, torch.Tensor],
                     similarity: dict[str, torch.Tensor], hit: dict[str, torch.Tensor],
                     tokens: dict[str, torch.Tensor], num_samples: int | None = None) -> list[Path]:
    """Write one PNG per sample of a latent objective's pictures (kind ``latent``).

    Top row: the RGB input (2-98 % stretch over valid pixels; blank without a Sentinel-2 RGB domain) and a
    PCA-to-RGB map of the encoder's patch tokens of each input domain (one PCA over all samples and domains).
    Then one row per band set: token roles (encoder, target only, decoder, missing), cosine similarity between
    prediction and target at decoder tokens (-1 to 1, grey elsewhere), and a retrieval map (green: the
    prediction is closest to its own target among the sample's decoder targets of its group; red: another
    target is closer; grey: not decoded).

    Args:
        folder: Destination (``<output_dir>/latent``), created if needed.
        tag: File-name suffix, e.g. ``step000120``; files are ``sample<i>_<tag>.png``.
        rgb: float (B, 3, H, W) z-scored B04, B03, B02, or None.
        rgb_valid: bool (B, H, W) or None.
        grids: {band set: (h, w)} token grid of every band set.
        roles: {band set: int (B, N_d)} role values 0..3.
        similarity: {band set: float (B, N_d)}, NaN where the token was not decoded.
        hit: {band set: bool (B, N_d)}.
        tokens: {input domain: float (B, N_d, D)} encoder output with every token visible.
        num_samples: Samples drawn (default: all B).

    Returns:
        Paths of the written PNG files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cpu = {k: {d: t.detach().cpu() for d, t in v.items()} for k, v in
           (("roles", roles), ("similarity", similarity), ("hit", hit), ("tokens", tokens))}
    pca = _pca_rgb(cpu["tokens"])
    domains = list(cpu["roles"])
    b = next(iter(cpu["roles"].values())).shape[0]
    role_palette = np.array([to_rgb(c) for c in _ROLE_COLORS])
    sim_cmap = plt.get_cmap("viridis")
    cols = max(3, 1 + len(pca))
    paths = []
    for i in range(b if num_samples is None else min(num_samples, b)):
        fig, axes = plt.subplots(1 + len(domains), cols, figsize=(2.4 * cols, 2.3 * (1 + len(domains))),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([]), ax.set_yticks([])
        top = axes[0]
        if rgb is not None:
            x = rgb[i].detach().cpu().float().numpy()
            ok = np.ones(x.shape[1:], bool) if rgb_valid is None else rgb_valid[i].detach().cpu().numpy()
            lo, hi = _stretch_limits(x, ok)
            top[0].imshow(np.where(ok[..., None], _to_rgb(x, lo, hi), 0.0), interpolation="nearest")
        top[0].set_title("input RGB (B04, B03, B02)", fontsize=8)
        for col, d in enumerate(pca, start=1):
            top[col].imshow(_grid_image(pca[d][i], grids[d]), interpolation="nearest")
            top[col].set_title(f"encoder PCA: {d}", fontsize=8)
        for ax in top[1 + len(pca):]:
            ax.axis("off")
        for row, d in enumerate(domains, start=1):
            r = cpu["roles"][d][i].long().numpy()
            s = cpu["similarity"][d][i].float().numpy()
            h = cpu["hit"][d][i].numpy()
            sim_rgb = np.where(np.isnan(s)[:, None], _GREY, sim_cmap((np.nan_to_num(s) + 1) / 2)[:, :3])
            hit_rgb = np.where(np.isnan(s)[:, None], _GREY, np.where(h[:, None], (0.1, 0.65, 0.2), (0.85, 0.15, 0.1)))
            panels = (role_palette[r], sim_rgb, hit_rgb)
            titles = ("roles (view 0)", "cos(prediction, target)", "own target closest")
            for col, (img, title) in enumerate(zip(panels, titles)):
                axes[row, col].imshow(_grid_image(img, grids[d]), interpolation="nearest")
                if row == 1:
                    axes[row, col].set_title(title, fontsize=8)
            decoded = ~np.isnan(s)
            if decoded.any():
                axes[row, 1].set_xlabel(f"mean {s[decoded].mean():.2f}", fontsize=7)
                axes[row, 2].set_xlabel(f"{h[decoded].mean():.0%} of {decoded.sum()}", fontsize=7)
            axes[row, 0].set_ylabel(d, fontsize=9)
            for ax in axes[row, 3:]:
                ax.axis("off")
        handles = [Patch(color=c, label=n) for n, c in zip(_ROLE_LABELS, _ROLE_COLORS)]
        fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.suptitle(f"{tag}, sample {i}", fontsize=10)
        fig.tight_layout(rect=(0, 0.03, 1, 0.98))
        path = folder / f"sample{i}_{tag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
