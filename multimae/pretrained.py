"""A self-describing export of a pretrained encoder: ``model.safetensors`` + ``config.json`` + a model card.

An export folder holds everything needed to rebuild and feed the encoder, and nothing of the training code::

    <folder>/
      model.safetensors   the encoder's weights (:class:`~multimae.encoder.MultiModalEncoder` state dict);
                          its metadata repeats ``format_version`` and ``architecture``
      config.json         format_version, model_type, architecture (MultiModalEncoder.spec), token_layout,
                          domains (band names in order, units, normalisation and its statistics, class
                          tables), objective, pretraining (checkpoint provenance), code_commit
      README.md           model card (Hugging Face format): the inputs the encoder expects

The folder is laid out as a Hugging Face model repository (``huggingface_hub.upload_folder`` takes it as is).
:func:`save_pretrained` writes it, :func:`load_pretrained` rebuilds the encoder from it and refuses a folder
whose ``format_version``, ``model_type``, architecture or domains this code cannot honour, naming the file and
the field. This module reads and writes files (the one exception to ``multimae`` being free of file IO); it
needs only torch, safetensors and the rest of :mod:`multimae`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from multimae.domains import DOMAINS
from multimae.encoder import SPEC_KEYS, MultiModalEncoder
from multimae.metadata import METADATA_FIELDS

__all__ = [
    "FORMAT_VERSION",
    "MODEL_TYPE",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CARD_FILE",
    "DOMAIN_FIELDS",
    "save_pretrained",
    "read_pretrained_config",
    "load_pretrained",
    "model_card",
]

#: Version of the export folder layout this code writes; it reads this version and the ones before it.
FORMAT_VERSION = 1
#: ``model_type`` of config.json (the Hugging Face convention for "which code reads this").
MODEL_TYPE = "multimae-eo-encoder"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
#: Keys of one ``domains`` entry of config.json (a checkpoint's ``encoder.domains`` record, trimmed to its inputs).
DOMAIN_FIELDS = ("modality", "kind", "bands", "units", "normalization", "stats", "class_names", "class_values",
                 "nodata")


def _domain_keys(state: dict[str, torch.Tensor], in_domains: Sequence[str]) -> dict[str, torch.Tensor]:
    """The entries of an encoder state dict that an encoder of ``in_domains`` holds (other adapters dropped)."""
    keep = set(in_domains)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("input_adapters", "domain_embeds") and len(parts) > 1 and parts[1] not in keep:
            continue
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- writing
def save_pretrained(encoder: MultiModalEncoder, out_dir: str | Path, *, domains: dict[str, dict],
                    objective: dict | None = None, pretraining: dict | None = None,
                    code_commit: str = "unknown", code_version: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``encoder`` as an export folder (``model.safetensors``, ``config.json``, ``README.md``).

    Args:
        encoder: The encoder (its weights are written in float32 as they are, on the CPU).
        out_dir: Folder to write; created if absent.
        domains: {domain: record} for every input domain of the encoder, the record holding at least the
            keys of :data:`DOMAIN_FIELDS` (a checkpoint's ``encoder.domains`` entry: band names in the order
            the encoder sees them, units of the stored values, normalisation method and statistics).
        objective: ``{"name": ..., "config": its config section}`` of the pretraining objective, or None.
        pretraining: Provenance of the weights (checkpoint file name, step, epoch, ...), or None.
        code_commit: The git commit of the code that trained / exported it, or ``"unknown"``.
        code_version: The installed package version, or None.
        overwrite: Replace the files of an existing export in ``out_dir``.

    Returns:
        The folder written.

    Raises:
        FileExistsError: ``out_dir`` already holds an export and ``overwrite`` is False.
        ValueError: a domain record is missing or lacks a field (the message names domain and field).
    """
    out_dir = Path(out_dir)
    existing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)} (pass overwrite to replace them)")
    records = {}
    for name in encoder.in_domains:
        if name not in domains:
            raise ValueError(f"domains: no record for input domain {name!r} (its band names, units and "
                             "normalisation); the export would not say how to prepare its input")
        missing = [f for f in DOMAIN_FIELDS if f not in domains[name]]
        if missing:
            raise ValueError(f"domains.{name}: record lacks {', '.join(missing)}")
        records[name] = {f: domains[name][f] for f in DOMAIN_FIELDS}
    spec = encoder.spec
    config = {
        "format_version": FORMAT_VERSION,
        "model_type": MODEL_TYPE,
        "architecture": spec,
        "token_layout": encoder.layout().to_dict(),
        "domains": records,
        "objective": objective,
        "pretraining": pretraining,
        "code_commit": code_commit,
        "code_version": code_version,
        "weights": {"file": WEIGHTS_FILE, "dtype": "float32",
                    "num_parameters": sum(p.numel() for p in encoder.parameters())},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder.state_dict().items()}
    metadata = {"format": "pt", "format_version": str(FORMAT_VERSION), "model_type": MODEL_TYPE,
                "architecture": json.dumps(spec, sort_keys=True)}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata=metadata)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / CARD_FILE).write_text(model_card(config))
    return out_dir


# ---------------------------------------------------------------------------------------------- reading
def _field(config: dict, path: Path, key: str, types: type | tuple[type, ...]) -> Any:
    if key not in config:
        raise ValueError(f"{path}: no field {key!r} (not an export of this code base?)")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{path}: field {key!r} has the wrong type: {value!r}")
    return value


def read_pretrained_config(path: str | Path) -> dict:
    """Read and check the ``config.json`` of an export folder.

    Args:
        path: The export folder (or its ``config.json``).

    Returns:
        The config dict (see the module docstring).

    Raises:
        FileNotFoundError: the folder or its config.json is missing.
        ValueError: not JSON; ``format_version`` missing, newer than this code (:data:`FORMAT_VERSION`) or
            not a version; another ``model_type``; an ``architecture`` with missing or unknown keys; ``domains``
            that are not the architecture's input domains, lack a field, or name bands other than this code's
            domain of that name. The message names the file and the field.
    """
    path = Path(path)
    folder = path.parent if path.name == CONFIG_FILE else path
    file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} not found")
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: an export folder holds {CONFIG_FILE}, {WEIGHTS_FILE} and "
                                f"{CARD_FILE} (tools/export_encoder.py writes them)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    version = _field(config, file, "format_version", int)
    if version > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version} is newer than this code reads (1..{FORMAT_VERSION}); "
                         "install a newer multimae-eo")
    if version < 1:
        raise ValueError(f"{file}: format_version {version} is not a version (1..{FORMAT_VERSION})")
    model_type = _field(config, file, "model_type", str)
    if model_type != MODEL_TYPE:
        raise ValueError(f"{file}: model_type {model_type!r} is not {MODEL_TYPE!r}")
    arch = _field(config, file, "architecture", dict)
    missing = [k for k in SPEC_KEYS if k not in arch]
    unknown = [k for k in arch if k not in SPEC_KEYS]
    if missing or unknown:
        raise ValueError(f"{file}: architecture " + "; ".join(
            ([f"lacks {', '.join(missing)}"] if missing else [])
            + ([f"has keys this code does not know: {', '.join(unknown)} (written by a newer version?)"]
               if unknown else [])))
    domains = _field(config, file, "domains", dict)
    if list(domains) != list(arch["in_domains"]):
        raise ValueError(f"{file}: domains {list(domains)} are not architecture.in_domains {arch['in_domains']}")
    for name, record in domains.items():
        gaps = [f for f in DOMAIN_FIELDS if f not in record]
        if gaps:
            raise ValueError(f"{file}: domains.{name} lacks {', '.join(gaps)}")
        if name not in DOMAINS:
            raise ValueError(f"{file}: domains.{name} is not a domain this code knows (written by a newer version?)")
        if list(record["bands"]) != list(DOMAINS[name].bands):
            raise ValueError(f"{file}: domains.{name}.bands {record['bands']} differ from this code's domain "
                             f"{name!r} ({list(DOMAINS[name].bands)}): its adapter would read other bands")
    return config


def _check_weights(folder: Path, config: dict) -> None:
    """Compare the architecture in the weights' metadata with config.json's (names each differing key)."""
    file = folder / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a safetensors file ({err})") from None
    if "architecture" not in metadata:
        return  # written by another tool: the shapes are checked on load
    written = json.loads(metadata["architecture"])
    arch = config["architecture"]
    differ = [f"{k} {arch.get(k)!r} vs {written.get(k)!r}" for k in sorted(set(arch) | set(written))
              if arch.get(k) != written.get(k)]
    if differ:
        raise ValueError(f"{folder / CONFIG_FILE}: architecture does not match the one {WEIGHTS_FILE} was written "
                         f"for (config.json vs weights): {'; '.join(differ)}")


def load_pretrained(path: str | Path, *, in_domains: Sequence[str] | None = None, input_size: int | None = None,
                    device: torch.device | str = "cpu") -> MultiModalEncoder:
    """Rebuild the encoder of an export folder (see :func:`save_pretrained`) and load its weights.

    Args:
        path: The export folder (``config.json``, ``model.safetensors``).
        in_domains: Input domains to keep, a subset of the exported ones in any order (default: all, in the
            exported order); the others' adapters are dropped.
        input_size: Image side in pixels to build the position embeddings for (default: the architecture's);
            any size divisible by the patch sizes works in eager mode either way.
        device: Device of the returned encoder.

    Returns:
        The :class:`~multimae.encoder.MultiModalEncoder` in eval mode. ``encoder.encode(inputs, valid=...,
        metadata=...)`` takes ``{domain: float32 (B, C, H, W)}`` normalised as config.json's ``domains.<d>`` says
        (class maps: int64 (B, H, W) class ids, -1 = no-data) and, for an encoder with metadata tokens
        (``architecture.metadata``), ``{field: float32 (B, 2)}`` (sin, cos) pairs (NaN or absent: the learned
        missing embedding); it returns (B, N + G, D) tokens: the patch tokens, the metadata tokens, then the G
        global tokens last.

    Raises:
        FileNotFoundError: the folder, its config.json or model.safetensors is missing.
        ValueError: what :func:`read_pretrained_config` refuses; a domain the encoder was not trained with;
            an architecture that does not match the weights (the differing keys, or the tensors whose keys or
            shapes differ).
    """
    folder = Path(path)
    config = read_pretrained_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (the export folder {folder} lacks its weights)")
    _check_weights(folder, config)
    trained = list(config["architecture"]["in_domains"])
    chosen = trained if in_domains is None else list(in_domains)
    unknown = [d for d in chosen if d not in trained]
    if unknown:
        raise ValueError(f"{folder / CONFIG_FILE}: domains: the encoder was not trained with {', '.join(unknown)} "
                         f"(trained with: {', '.join(trained)})")
    encoder = MultiModalEncoder.from_spec(config["architecture"], in_domains=chosen, input_size=input_size,
                                          init_weights=False)
    state = _domain_keys(load_file(str(weights)), chosen)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {', '.join(missing[:5])}" if missing else "",
                 f"not in the architecture {', '.join(unexpected[:5])}" if unexpected else "",
                 f"shapes differ (weights vs architecture) {'; '.join(shapes[:5])}" if shapes else ""]
        raise ValueError(f"{weights} does not fit architecture of {folder / CONFIG_FILE}: "
                         + "; ".join(p for p in parts if p))
    encoder.load_state_dict(state)
    return encoder.to(device).eval()


# ---------------------------------------------------------------------------------------------- model card
def _normalisation_text(record: dict) -> str:
    method = record["normalization"]
    if record["kind"] == "categorical":
        return (f"int64 class ids 0..{len(record['class_names']) - 1} in the order of the class table (stored code "
                "-> id below); no-data = -1")
    if method == "per_tile":
        return ("per tile and band: (x - m) / max(s, 1) with m, s the mean and standard deviation of the valid "
                "values between the 10th and 90th percentile of the tile (units as stored)")
    if method == "band_stats":
        keys = list(record["stats"])
        which = (" with the statistics of the tile's product (" + ", ".join(keys) + ")") if len(keys) > 1 else ""
        return f"per band: (x - mean) / std{which}"
    return str(method)


def model_card(config: dict) -> str:
    """The model card (README.md, Hugging Face format with a YAML header) of an export's ``config.json``.

    Lists what a user must feed the encoder: domains, band names in order, units, normalisation and its
    statistics, class tables, image size, patch sizes, metadata fields, the token layout of the output, and the
    provenance.
    """
    arch, layout, domains = config["architecture"], config["token_layout"], config["domains"]
    size, p0 = arch["input_size"], arch["patch_size"]
    modalities = sorted({r["modality"] for r in domains.values()})
    fields = list(arch.get("metadata") or [])
    blocks = "".join([", mixture-of-experts feed-forwards" if arch.get("ffn", "mlp") != "mlp" else "",
                      f", grouped-query attention with {arch['kv_groups']} key / value heads"
                      if arch.get("kv_groups") else ""])
    lines = [
        "---",
        "library_name: multimae-eo",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        *[f"- {t}" for t in ("earth-observation", "remote-sensing", "multimae", "safetensors", *modalities)],
        "---",
        "",
        f"# MultiMAE-EO encoder ({', '.join(arch['in_domains'])})",
        "",
        f"A multi-modal ViT encoder (width {arch['dim']}, {arch['depth']} blocks, {arch['num_heads']} heads{blocks}, "
        f"{arch['num_global_tokens']} global token{'s' if arch['num_global_tokens'] > 1 else ''}"
        + (f", {len(fields)} metadata token{'s' if len(fields) > 1 else ''}" if fields else "") + ") pretrained with "
        f"the `{(config.get('objective') or {}).get('name', 'unknown')}` objective. Load it with the "
        "`multimae-eo` package (`pip install <a clone of its repository>`):",
        "",
        "```python",
        "from multimae import load_pretrained",
        "encoder = load_pretrained(\"path/to/this/folder\")          # or in_domains=[...] for a subset",
        ("tokens = encoder.encode(inputs, valid=valid, metadata=metadata)  # (B, N + G, D)" if fields else
         "tokens = encoder.encode(inputs, valid=valid)               # (B, N + G, D)"),
        "```",
        "",
        "## Inputs",
        "",
        f"`inputs` is a dict `{{domain: tensor}}`: continuous domains float32 (B, C, H, W) normalised as below, "
        f"class maps int64 (B, H, W). Image size: {size} x {size} px at {arch['gsd']} m "
        f"(any H, W divisible by the patch sizes works; the token grids follow). Base patch size: {p0} px"
        + (f"; per domain: {arch['patch_sizes']}" if arch["patch_sizes"] else "") + ". "
        "`valid` (optional) is `{domain: bool (B, H, W)}`, True where the pixel holds data; invalid pixels are "
        "set to 0 (continuous, after normalisation) or -1 (class maps) before embedding; without `valid`, fill them so.",
        "",
        "| domain | modality | bands, in this order | units (as stored) | normalisation |",
        "|---|---|---|---|---|",
    ]
    for name, r in domains.items():
        lines.append(f"| `{name}` | {r['modality']} | {', '.join(r['bands'])} | {r['units']} | "
                     f"{_normalisation_text(r)} |")
    for name, r in domains.items():
        if r["kind"] == "categorical":
            lines += ["", f"`{name}` classes (id: name, stored code): "
                      + "; ".join(f"{i}: {n} ({c})" for i, (n, c) in enumerate(zip(r["class_names"],
                                                                                  r["class_values"])))
                      + f". No-data codes: {', '.join(map(str, r['nodata']))}."]
        elif r["stats"]:
            lines += ["", f"`{name}` statistics (mean / std per band in stored units, rounded; exact in config.json):", "",
                      "| statistics | " + " | ".join(r["bands"]) + " |", "|---|" + "---|" * len(r["bands"])]
            for key, st in r["stats"].items():
                lines.append(f"| {key} | " + " | ".join(f"{m:.4g} / {s:.4g}" for m, s in zip(st["mean"], st["std"]))
                             + " |")
        if r["kind"] != "categorical" and r["nodata"]:
            lines += ["", f"`{name}` no-data values (mark them invalid): {', '.join(map(str, r['nodata']))}."]
    if fields:
        lines += ["", "## Metadata", "",
                  "`metadata` is a dict `{field: float32 (B, 2)}`: the pair (sin, cos) of 2 pi value / period for "
                  "each field below, one always-visible token each. A NaN pair, or a field left out (or "
                  "`metadata=None`), gives that field's learned missing embedding.", "",
                  "| field | value | period |", "|---|---|---|"]
        lines += [f"| `{f}` | {METADATA_FIELDS[f].units} | {METADATA_FIELDS[f].period:g} |" for f in fields]
    lines += [
        "",
        "## Output",
        "",
        f"(B, N + G, D) tokens, D = {arch['dim']}: each domain's patch tokens in the order above (row-major over "
        f"its grid), " + (f"the metadata tokens ({', '.join(fields)}), " if fields else "")
        + f"then the {layout['num_global_tokens']} global token(s) **last**. At {size} px:",
        "",
        "| domain | tokens | grid | patch (px) |",
        "|---|---|---|---|",
    ]
    for s in layout["segments"]:
        grid = f"{s['grid'][0]} x {s['grid'][1]}" if s["grid"] else "-"
        lines.append(f"| `{s['domain']}` | {s['num_tokens']} | {grid} | {s['patch_size'] or '-'} |")
    pre = config.get("pretraining") or {}
    lines += [
        "",
        "## Provenance",
        "",
        f"- objective: `{(config.get('objective') or {}).get('name', 'unknown')}` (its settings are in config.json)",
        f"- code commit: `{config['code_commit']}`" + (f" (package {config['code_version']})"
                                                       if config.get("code_version") else ""),
        *[f"- {k}: {v}" for k, v in pre.items()],
        f"- export format_version: {config['format_version']}",
        "",
    ]
    return "\n".join(lines)
