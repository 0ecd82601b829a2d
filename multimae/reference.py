"""Read checkpoints of the MultiMAE-EO reference and map them onto this project's modules.

The reference is the pretraining code of Sosa et al., "MultiMAE Meets Earth Observation", ICIP 2025
(github ``josesosajs/multimae-meets-eo``, built on EPFL-VILAB's MultiMAE). Its state dicts use
MultiMAE's names and its RGB-era domain names.

Key mapping (reference -> this project)::

    global_tokens (1, G, D)                        -> <enc>global_tokens
    input_adapters.<d>.proj.*                      -> <enc>input_adapters.<D>.proj.*
    input_adapters.semseg.class_emb.weight (12, E) -> <enc>input_adapters.worldcover12.class_embed.weight
                                                      (13, E): row 12 is the zero no-data row, added
    input_adapters.<d>.pos_emb (1, D, H0, W0)      -> checked against the sin-cos table, not copied
    encoder.<i>.* (pre-norm ViT block)             -> <enc><blocks>.<i>.* (timm Block, same names)
    output_adapters.<d>.mask_token                 -> <dec><D>.mask_token
    output_adapters.<d>.pos_emb (1, Dd, H0, W0)    -> checked against the sin-cos table, not copied
    output_adapters.<d>.task_embeddings.<t>        -> <dec><D>.domain_embeds.<T>
    output_adapters.<d>.proj_context.*             -> <dec><D>.context_proj.*
    output_adapters.<d>.decoder.{q,kv,proj}.*      -> <dec><D>.xattn.{q,kv,proj}.*
    output_adapters.<d>.{query,context}_norm.*     -> <dec><D>.{query,context}_norm.*
    output_adapters.<d>.out_norm.*                 -> <dec><D>.mlp_norm.*
    output_adapters.<d>.mlp.{fc1,fc2}.*            -> <dec><D>.mlp.{fc1,fc2}.*
    output_adapters.<d>.decoder_transformer.<i>.*  -> <dec><D>.blocks.<i>.*
    output_adapters.<d>.out_proj.*                 -> <dec><D>.head.*

``<enc>`` / ``<blocks>`` / ``<dec>`` are the target prefixes (parameters of
:func:`convert_reference_state_dict`); ``<d>`` -> ``<D>`` is :data:`REFERENCE_DOMAINS`. Weight
layouts need no change: ``qkv`` / ``kv`` rows are Q, K, V / K, V blocks with contiguous heads in
both, and ``out_proj`` rows are (channel, patch row, patch column) as :class:`SpatialDecoder`'s
``head`` expects.

The modules reproduce the reference with these options (off by default): ``pos_embed_grid`` =
the tables' grid (28 x 28: the adapters' 224 px default at patch 8) on every adapter and decoder,
with the module default modes (bicubic for image adapters, bilinear for the class-map adapter and
the decoders); ``xattn_residual=False`` on every decoder; the land cover as ``worldcover12``.

:func:`load_reference_checkpoint` reads what the reference's ``utils/checkpoint.save_model`` writes
(``{"model", "optimizer", "epoch", "scaler", "args", ["loss_balancer"]}`` with ``args`` a pickled
``argparse.Namespace``) or a bare state dict, unpickling nothing but tensors, containers and
``argparse.Namespace``. :func:`infer_reference_architecture` derives the architecture from the
tensor shapes and ``args``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multimae.domains import DOMAINS
from multimae.pos_embed import sincos_pos_embed_2d

__all__ = [
    "REFERENCE_DOMAINS",
    "REFERENCE_MODELS",
    "ReferenceArchitecture",
    "ReferenceCheckpoint",
    "ReferenceCheckpointError",
    "ConvertedReference",
    "load_reference_checkpoint",
    "infer_reference_architecture",
    "convert_reference_state_dict",
]

#: Reference domain name -> this project's domain, in this project's token order.
REFERENCE_DOMAINS: dict[str, str] = {
    "rgb": "s2_rgb",
    "ired": "s2_rededge",
    "ebands": "s2_nir",
    "sired": "s2_swir",
    "depth": "elevation",
    "semseg": "worldcover12",
    "norm_rgb": "s2_rgb_normpix",
}
_INPUTS = ("rgb", "ired", "ebands", "sired", "depth", "semseg")
_NORM_PIX = "norm_rgb"  # extra decoder of extra_norm_pix_loss: task 'rgb' against per-patch normalised RGB
_SEMSEG = "semseg"

#: Encoder sizes of the reference's registered models (``multimae/multimae.py``).
REFERENCE_MODELS: dict[str, dict[str, int]] = {
    "pretrain_multimae_base": {"dim": 768, "depth": 12, "heads": 12},
    "pretrain_multimae_large": {"dim": 1024, "depth": 24, "heads": 16},
}
_DEFAULT_DECODER_HEADS = 8  # run_pretraining.py default; the recipe YAML does not set it
_POS_ATOL = 1e-5  # the reference builds its tables in float32, this project in float64 (about 1e-6 apart)
_BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)


class ReferenceCheckpointError(ValueError):
    """A file or state dict that is not a MultiMAE-EO reference checkpoint this module can map."""


# ---------------------------------------------------------------------------------------- reading
@dataclass
class ReferenceCheckpoint:
    """What :func:`load_reference_checkpoint` read.

    Attributes:
        state_dict: The model's tensors, reference key names.
        args: The run's arguments as a plain dict (``vars`` of the saved Namespace); None for a
            bare state dict.
        epoch: Last finished epoch, None if absent.
        other_keys: Top-level entries read but not used (``optimizer``, ``scaler``, ...).
    """

    state_dict: dict[str, torch.Tensor]
    args: dict | None = None
    epoch: int | None = None
    other_keys: list[str] = field(default_factory=list)


def load_reference_checkpoint(path: str | Path) -> ReferenceCheckpoint:
    """Read a reference checkpoint or bare state dict without unpickling code.

    ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the only allow-listed class, so
    a file holding any other object is refused instead of executed.

    Args:
        path: ``checkpoint-<epoch>.pth`` as the reference's ``save_model`` writes it, or a file holding
            only a state dict.

    Returns:
        The state dict, the arguments and the epoch.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ReferenceCheckpointError: The file holds another object type, or neither a ``model`` entry
            nor a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip / pickle file), EOFError ...
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        why = f"it holds a {found.group(1)} object" if found else str(err).strip().splitlines()[0]
        raise ReferenceCheckpointError(
            f"{path}: cannot be read as a reference checkpoint with weights_only loading "
            f"(only tensors, containers and argparse.Namespace are allowed): {why}"
        ) from None
    if not isinstance(obj, Mapping):
        raise ReferenceCheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], Mapping):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        elif args is not None and not isinstance(args, Mapping):
            raise ReferenceCheckpointError(f"{path}: 'args' is a {type(args).__name__}, not an argparse.Namespace")
        epoch = obj.get("epoch")
        state = dict(obj["model"])
        others = [k for k in obj if k not in ("model", "args", "epoch")]
        result = ReferenceCheckpoint(state, None if args is None else dict(args),
                                     int(epoch) if isinstance(epoch, int) else None, others)
    else:
        result = ReferenceCheckpoint(dict(obj))
    bad = [k for k, v in result.state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ReferenceCheckpointError(f"{path}: the state dict has non-tensor entries: {_summarise(bad)}")
    return result


# ----------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ReferenceArchitecture:
    """The architecture of a reference checkpoint, in this project's terms.

    Attributes:
        in_domains: Input domains (this project's names, its token order).
        out_domains: Output domains (decoders); empty for an encoder-only state dict.
        dim: Encoder width D.
        depth: Encoder blocks.
        num_heads: Encoder heads.
        mlp_ratio: MLP hidden width / width (encoder and decoders).
        patch_size: Patch side P in pixels.
        num_global_tokens: Global tokens G.
        class_embed_dim: Class-embedding width of the land-cover adapter.
        decoder_dim: Decoder width (0 without decoders).
        decoder_depth: Self-attention blocks per decoder.
        decoder_heads: Decoder heads.
        pos_embed_grid: Grid (H0, W0) of the position tables, for every adapter's and decoder's
            ``pos_embed_grid`` option.
        input_size: Training image size in pixels from ``args``, None when unknown.
        source_in_domains: Reference names of the input domains, in the same order.
        source_out_domains: Reference names of the output adapters, in the same order.
    """

    in_domains: tuple[str, ...]
    out_domains: tuple[str, ...]
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    num_global_tokens: int
    class_embed_dim: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    pos_embed_grid: tuple[int, int]
    input_size: int | None
    source_in_domains: tuple[str, ...]
    source_out_domains: tuple[str, ...]

    def config_overrides(self) -> dict:
        """Values of this project's config keys (``cfgs/defaults.yaml`` layout) for this model: the encoder
        (``model.*``, ``in_domains``) and the ``multimae`` objective with the reference's options (base-grid
        position tables, no residual around the decoder cross-attention)."""
        decoder = {"depth": self.decoder_depth, "heads": self.decoder_heads, "xattn_residual": False}
        if self.decoder_dim:
            decoder["dim"] = self.decoder_dim
        out = {
            "objective": "multimae",
            "in_domains": list(self.in_domains),
            "model": {
                "preset": {"dim": self.dim, "depth": self.depth, "heads": self.num_heads},
                "patch_size": self.patch_size,
                "num_global_tokens": self.num_global_tokens,
                "domain_embed": False,
                "class_embed_dim": self.class_embed_dim,
                "mlp_ratio": self.mlp_ratio,
                "pos_embed_grid": _square(self.pos_embed_grid),
            },
            "multimae": {"out_domains": list(self.out_domains), "decoder": decoder},
        }
        if self.input_size is not None:
            out["data"] = {"input_size": self.input_size}
        return out


def _square(grid) -> int | None:
    """A square base grid as its side (the config key ``model.pos_embed_grid``); None stays None."""
    if grid is None or isinstance(grid, int):
        return grid
    if grid[0] != grid[1]:
        raise ReferenceCheckpointError(f"position tables of {grid[0]} x {grid[1]} tokens: only square grids are supported")
    return int(grid[0])


def _summarise(keys: Sequence[str], limit: int = 40) -> str:
    """Keys with block indices folded: 'encoder.<i>.attn.qkv.weight (x12), ...'."""
    patterns = Counter(re.sub(r"\.\d+(?=\.|$)", ".<i>", k) for k in keys)
    items = [p if n == 1 else f"{p} (x{n})" for p, n in sorted(patterns.items())]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _fold_modules(keys: Sequence[str], other: Mapping[str, object]) -> list[str]:
    """Replace the keys of an adapter absent from ``other`` altogether by one ``<adapter>.* (n keys)`` entry."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        prefix = ".".join(parts[:2]) if parts[0] in ("input_adapters", "output_adapters") and len(parts) > 2 else k
        groups.setdefault(prefix, []).append(k)
    out = []
    for prefix, members in groups.items():
        whole = len(members) > 1 and not any(o.startswith(prefix + ".") for o in other)
        out.extend([f"{prefix}.* ({len(members)} keys)"] if whole else members)
    return out


def _arg_domains(args: Mapping, key: str) -> list[str] | None:
    value = args.get(key)
    if value is None:
        return None
    names = value.split("-") if isinstance(value, str) else list(value)
    return [str(n) for n in names]


def _prefixed_names(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """Second key component under ``prefix.`` in first-seen order (domain names of adapters)."""
    return list(dict.fromkeys(k.split(".")[1] for k in state_dict if k.startswith(prefix + ".") and k.count(".") >= 2))


def _indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive blocks ``<prefix><i>.`` present (0, 1, ... without gaps)."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state_dict):
        n += 1
    return n


def _fail(what: str, missing=(), unexpected=(), shapes=()) -> ReferenceCheckpointError:
    parts = [what]
    if missing:
        parts.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_summarise(unexpected)}")
    if shapes:
        more = f", ... {len(shapes) - 20} more" if len(shapes) > 20 else ""
        parts.append("wrong shapes: " + ", ".join(shapes[:20]) + more)
    return ReferenceCheckpointError("; ".join(parts))


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, missing: list[str]) -> tuple[int, ...] | None:
    if key not in state_dict:
        missing.append(key)
        return None
    return tuple(state_dict[key].shape)


def infer_reference_architecture(
    state_dict: Mapping[str, torch.Tensor],
    args: Mapping | None = None,
    *,
    num_heads: int | None = None,
    decoder_heads: int | None = None,
) -> ReferenceArchitecture:
    """Derive the architecture of a reference state dict from its shapes and the run's ``args``.

    Domains come from ``args.in_domains`` / ``args.out_domains`` (plus ``norm_rgb`` when
    ``args.extra_norm_pix_loss``), else the reference recipe: the six input domains and, if the state
    dict has any decoder, the six decoders plus ``norm_rgb``. Widths, depths, patch size, global
    tokens, class-embedding width and position grid come from shapes. Encoder heads: ``num_heads``,
    else the reference model named in ``args.model``, else width / 64 (ViT-B / ViT-L) when that
    divides; decoder heads: ``decoder_heads``, else ``args.decoder_num_heads``, else 8.

    Args:
        state_dict: Reference key names.
        args: The run's arguments (:attr:`ReferenceCheckpoint.args`), or None.
        num_heads: Encoder heads, required when nothing else tells them.
        decoder_heads: Decoder heads.

    Returns:
        The architecture.

    Raises:
        ReferenceCheckpointError: Domains the reference does not have (e.g. EPFL's Taskonomy
            MultiMAE), missing anchor keys, a position table of another width than its module, heads that cannot be
            determined or contradict ``args.model``.
    """
    args = dict(args or {})
    src_in = _arg_domains(args, "in_domains")
    src_out = _arg_domains(args, "out_domains")
    present_in = _prefixed_names(state_dict, "input_adapters")
    present_out = _prefixed_names(state_dict, "output_adapters")
    if src_in is None:
        src_in = list(_INPUTS)
    if src_out is None:
        src_out = list(_INPUTS) + [_NORM_PIX] if present_out else []
    elif args.get("extra_norm_pix_loss") and _NORM_PIX not in src_out:
        src_out = src_out + [_NORM_PIX]
    unknown = [d for d in dict.fromkeys(src_in + src_out + present_in + present_out) if d not in REFERENCE_DOMAINS]
    if unknown or _NORM_PIX in src_in:
        unexpected = [k for k in state_dict if k.split(".")[0] in ("input_adapters", "output_adapters")
                      and k.split(".")[1] in unknown]
        expected_in = ", ".join(_INPUTS)
        raise _fail(
            f"not a MultiMAE-EO reference state dict: domains {', '.join(unknown) or _NORM_PIX + ' as input'} are "
            f"not the reference's (inputs {expected_in}; outputs the same plus {_NORM_PIX})",
            missing=[f"input_adapters.{d}.*" for d in _INPUTS if d not in present_in], unexpected=unexpected,
        )
    order = list(REFERENCE_DOMAINS)
    src_in = sorted(dict.fromkeys(src_in), key=order.index)
    src_out = sorted(dict.fromkeys(src_out), key=order.index)

    missing: list[str] = []
    g = _shape(state_dict, "global_tokens", missing)
    fc1 = _shape(state_dict, "encoder.0.mlp.fc1.weight", missing)
    image = [d for d in src_in if d != _SEMSEG]
    proj = _shape(state_dict, f"input_adapters.{(image or src_in)[0]}.proj.weight", missing) if src_in else None
    pos = _shape(state_dict, f"input_adapters.{src_in[0]}.pos_emb", missing) if src_in else None
    dec_token = _shape(state_dict, f"output_adapters.{src_out[0]}.mask_token", missing) if src_out else None
    if missing or g is None or len(g) != 3 or fc1 is None or proj is None or pos is None or len(pos) != 4:
        raise _fail("not a MultiMAE-EO reference state dict (cannot read its sizes)", missing=missing)
    dim, num_global = g[2], g[1]
    stride = DOMAINS[REFERENCE_DOMAINS[_SEMSEG]].label_downsample if not image else 1
    patch_size = proj[-1] * stride
    if pos[1] != dim:
        raise ReferenceCheckpointError(
            f"input_adapters.{src_in[0]}.pos_emb has width {pos[1]}, but the encoder is {dim} wide (global_tokens)"
        )
    decoder_dim = dec_token[-1] if dec_token is not None else 0

    model_name = args.get("model")
    named = REFERENCE_MODELS.get(model_name) if isinstance(model_name, str) else None
    if named is not None and named["dim"] != dim:
        raise ReferenceCheckpointError(
            f"args.model is {model_name!r} ({named['dim']} wide), but the weights are {dim} wide"
        )
    if num_heads is None:
        num_heads = named["heads"] if named else dim // 64 if dim % 64 == 0 else None
    elif named is not None and named["heads"] != num_heads:
        raise ReferenceCheckpointError(f"args.model {model_name!r} has {named['heads']} heads, not {num_heads}")
    if num_heads is None:
        raise ReferenceCheckpointError(
            f"cannot tell the encoder's heads: width {dim} is not a multiple of 64 and args.model is "
            f"{model_name!r}; give the number of heads"
        )
    if decoder_heads is None:
        decoder_heads = int(args.get("decoder_num_heads") or _DEFAULT_DECODER_HEADS)
    if dim % num_heads or (decoder_dim and decoder_dim % decoder_heads):
        raise ReferenceCheckpointError(
            f"heads do not divide the widths: encoder {dim} / {num_heads}, decoders {decoder_dim} / {decoder_heads}"
        )
    class_emb = state_dict.get(f"input_adapters.{_SEMSEG}.class_emb.weight")
    input_size = args.get("input_size")
    return ReferenceArchitecture(
        in_domains=tuple(REFERENCE_DOMAINS[d] for d in src_in),
        out_domains=tuple(REFERENCE_DOMAINS[d] for d in src_out),
        dim=dim,
        depth=_indices(state_dict, "encoder."),
        num_heads=num_heads,
        mlp_ratio=fc1[0] / dim,
        patch_size=patch_size,
        num_global_tokens=num_global,
        class_embed_dim=int(class_emb.shape[1]) if class_emb is not None and class_emb.ndim == 2 else 64,
        decoder_dim=decoder_dim,
        decoder_depth=_indices(state_dict, f"output_adapters.{src_out[0]}.decoder_transformer.") if src_out else 0,
        decoder_heads=decoder_heads,
        pos_embed_grid=(pos[2], pos[3]),
        input_size=int(input_size) if isinstance(input_size, int) else None,
        source_in_domains=tuple(src_in),
        source_out_domains=tuple(src_out),
    )


# ------------------------------------------------------------------------------------ conversion
@dataclass
class ConvertedReference:
    """A reference state dict mapped onto this project's module names.

    Attributes:
        arch: The architecture the weights were checked against.
        encoder: Encoder tensors (input adapters, blocks, global tokens), target names.
        decoders: Decoder tensors, target names.
        sources: Target key -> reference key it was copied from.
        checked: Reference keys verified but not copied (the fixed sin-cos position tables).
        filled: Target key -> what was filled in that the reference does not have.
    """

    arch: ReferenceArchitecture
    encoder: dict[str, torch.Tensor]
    decoders: dict[str, torch.Tensor]
    sources: dict[str, str]
    checked: list[str]
    filled: dict[str, str]

    def report(self) -> list[str]:
        """One line per kind of handling, for logs: every reference key is in exactly one of them."""
        return [
            f"copied: {len(self.sources)} tensors",
            f"checked, not copied (fixed sin-cos tables, grid {self.arch.pos_embed_grid[0]}x"
            f"{self.arch.pos_embed_grid[1]}): {_summarise(self.checked)}",
            *(f"filled: {k}: {why}" for k, why in self.filled.items()),
        ]


def _block_shapes(prefix: str, dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
              "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
              "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
              "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
    return {f"{prefix}{k}": shapes[k] for k in _BLOCK_KEYS}


def _expected(arch: ReferenceArchitecture) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Every reference key of ``arch``: shape and the *relative* target (``enc:``/``dec:`` prefix) or None (checked)."""
    d, p, grid = arch.dim, arch.patch_size, arch.pos_embed_grid
    hidden = round(arch.mlp_ratio * d)
    out: dict[str, tuple[tuple[int, ...], str | None]] = {
        "global_tokens": ((1, arch.num_global_tokens, d), "enc:global_tokens")}
    for src in arch.source_in_domains:
        ours = REFERENCE_DOMAINS[src]
        dom = DOMAINS[ours]
        a = f"input_adapters.{src}."
        t = f"enc:input_adapters.{ours}."
        out[a + "pos_emb"] = ((1, d, *grid), None)
        if dom.kind == "categorical":
            k = p // dom.label_downsample
            out[a + "class_emb.weight"] = ((dom.num_classes, arch.class_embed_dim), t + "class_embed.weight")
            out[a + "proj.weight"] = ((d, arch.class_embed_dim, k, k), t + "proj.weight")
        else:
            out[a + "proj.weight"] = ((d, dom.num_channels, p, p), t + "proj.weight")
        out[a + "proj.bias"] = ((d,), t + "proj.bias")
    for i in range(arch.depth):
        for k, shape in _block_shapes(f"encoder.{i}.", d, hidden).items():
            out[k] = (shape, "enc:<blocks>" + k[len("encoder"):])
    dd = arch.decoder_dim
    dhidden = round(arch.mlp_ratio * dd)
    for src in arch.source_out_domains:
        ours = REFERENCE_DOMAINS[src]
        dom = DOMAINS[ours]
        a = f"output_adapters.{src}."
        t = f"dec:{ours}."
        out[a + "mask_token"] = ((1, 1, dd), t + "mask_token")
        out[a + "pos_emb"] = ((1, dd, *grid), None)
        for ctx in arch.source_in_domains:
            out[a + f"task_embeddings.{ctx}"] = ((1, 1, dd), t + f"domain_embeds.{REFERENCE_DOMAINS[ctx]}")
        out[a + "proj_context.weight"] = ((dd, d), t + "context_proj.weight")
        out[a + "proj_context.bias"] = ((dd,), t + "context_proj.bias")
        for name, rows in (("q", dd), ("kv", 2 * dd), ("proj", dd)):
            out[a + f"decoder.{name}.weight"] = ((rows, dd), t + f"xattn.{name}.weight")
            out[a + f"decoder.{name}.bias"] = ((rows,), t + f"xattn.{name}.bias")
        norms = (("query_norm", "query_norm"), ("context_norm", "context_norm"), ("out_norm", "mlp_norm"))
        for ref_name, our_name in norms:
            for part in ("weight", "bias"):
                out[a + f"{ref_name}.{part}"] = ((dd,), t + f"{our_name}.{part}")
        out[a + "mlp.fc1.weight"] = ((dhidden, dd), t + "mlp.fc1.weight")
        out[a + "mlp.fc1.bias"] = ((dhidden,), t + "mlp.fc1.bias")
        out[a + "mlp.fc2.weight"] = ((dd, dhidden), t + "mlp.fc2.weight")
        out[a + "mlp.fc2.bias"] = ((dd,), t + "mlp.fc2.bias")
        for i in range(arch.decoder_depth):
            for k, shape in _block_shapes(f"decoder_transformer.{i}.", dd, dhidden).items():
                out[a + k] = (shape, t + "blocks" + k[len("decoder_transformer"):])
        if dom.kind == "categorical":
            width = dom.num_classes * (p // dom.label_downsample) ** 2
        else:
            width = dom.num_channels * p * p
        out[a + "out_proj.weight"] = ((width, dd), t + "head.weight")
        out[a + "out_proj.bias"] = ((width,), t + "head.bias")
    return out


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    arch: ReferenceArchitecture | None = None,
    *,
    encoder_prefix: str = "",
    blocks_name: str = "blocks",
    decoder_prefix: str = "decoders.",
    pos_atol: float = _POS_ATOL,
) -> ConvertedReference:
    """Map a reference state dict onto this project's names; every key is copied, checked or refused.

    Target names: ``{encoder_prefix}input_adapters.<D>.*``, ``{encoder_prefix}{blocks_name}.<i>.*``,
    ``{encoder_prefix}global_tokens`` and ``{decoder_prefix}<D>.*`` with :class:`SpatialDecoder`'s
    sub-module names (module docstring). Position tables (``pos_emb``) are compared with the sin-cos
    table of their grid and not copied: the modules rebuild them (``pos_embed_grid`` option). The
    land-cover class embedding gets this project's zero no-data row; a decoder whose query domain is
    not an input gets a zero domain embedding for it (the reference adds none).

    Args:
        state_dict: Reference key names.
        arch: The architecture (default: :func:`infer_reference_architecture` without ``args``).
        encoder_prefix: Prefix of encoder keys (``""`` for the encoder module's own state dict).
        blocks_name: Name of the encoder's block list (``blocks``; ``encoder`` in today's MultiMAE).
        decoder_prefix: Prefix of decoder keys (``decoders.`` in the objective, ``output_adapters.``
            in today's MultiMAE).
        pos_atol: Largest difference tolerated between a stored table and the sin-cos table.

    Returns:
        The converted tensors (float32 copies as stored) and where each came from.

    Raises:
        ReferenceCheckpointError: One message listing missing keys, unexpected keys and wrong shapes
            (another checkpoint layout, e.g. EPFL's ImageNet MultiMAE), or naming a position table
            that is not the fixed sin-cos table.
    """
    if arch is None:
        arch = infer_reference_architecture(state_dict)
    expected = _expected(arch)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} (expected {expected[k][0]})"
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k][0]]
    if missing or unexpected or shapes:
        absent = [d for d in arch.source_in_domains
                  if not any(k.startswith(f"input_adapters.{d}.") for k in state_dict)]
        hint = (f" (it has no input adapter for {', '.join(absent)}: not a MultiMAE-EO checkpoint of these domains, "
                "e.g. EPFL's ImageNet MultiMAE has rgb, depth and a 133-class COCO semseg)" if absent else "")
        raise _fail(
            f"state dict does not match the MultiMAE-EO reference layout for inputs "
            f"{', '.join(arch.source_in_domains)} and outputs {', '.join(arch.source_out_domains) or 'none'}{hint}",
            missing=_fold_modules(missing, state_dict), unexpected=_fold_modules(unexpected, expected), shapes=shapes,
        )
    enc, dec, sources, checked, filled = {}, {}, {}, [], {}
    tables: dict[tuple[int, ...], torch.Tensor] = {}
    for key, (shape, target) in expected.items():
        value = state_dict[key].detach()
        if target is None:  # a fixed sin-cos table (1, D, H0, W0)
            width = shape[1]
            if width not in tables:
                table = sincos_pos_embed_2d(*arch.pos_embed_grid, width)  # (H0 * W0, D)
                tables[width] = table.T.reshape(1, width, *arch.pos_embed_grid)
            diff = (value.float() - tables[width]).abs().max().item()
            if not diff <= pos_atol:
                raise ReferenceCheckpointError(
                    f"{key} is not the fixed 2-D sin-cos table of a {arch.pos_embed_grid[0]}x{arch.pos_embed_grid[1]} "
                    f"grid (max difference {diff:.3g}); learned position embeddings are not supported"
                )
            checked.append(key)
            continue
        space, rel = target.split(":", 1)
        name = (encoder_prefix if space == "enc" else decoder_prefix) + rel.replace("<blocks>", blocks_name)
        if key.endswith("class_emb.weight"):  # append the zero no-data row (padding_idx K)
            value = torch.cat([value, value.new_zeros(1, value.shape[1])])
            filled[name] = f"row {value.shape[0] - 1} (no-data, padding_idx) = 0"
        (enc if space == "enc" else dec)[name] = value.clone()
        sources[name] = key
    for src in arch.source_out_domains:  # decode-only query domain: the reference adds no task embedding
        ours = REFERENCE_DOMAINS[src]
        query = DOMAINS[ours].source or ours
        if query not in arch.in_domains:
            name = f"{decoder_prefix}{ours}.domain_embeds.{query}"
            dec[name] = torch.zeros(1, 1, arch.decoder_dim)
            filled[name] = f"zeros ({query} is not an input; the reference adds no task embedding to its queries)"
    return ConvertedReference(arch, enc, dec, sources, checked, filled)
