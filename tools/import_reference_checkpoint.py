"""Convert a MultiMAE-EO reference checkpoint into this project's pretraining checkpoint; check parity on a fixture.

Usage::

    python tools/import_reference_checkpoint.py SRC OUT [--num-heads N] [--decoder-heads N] [--input-size PX] \\
        [--band-stats data_1M_v001_64_band_stats.json] [--overwrite]
    python tools/import_reference_checkpoint.py --check FIXTURE

The reference is the pretraining code of Sosa et al., "MultiMAE Meets Earth Observation", ICIP 2025
(github ``josesosajs/multimae-meets-eo``). ``SRC`` is what its ``utils/checkpoint.save_model`` writes
(``{"model", "optimizer", "epoch", "scaler", "args"}``, ``args`` an ``argparse.Namespace``; read without
unpickling anything else) or a bare state dict with the reference's key names (:mod:`multimae.reference`).

``OUT`` becomes a checkpoint of format v2 (docs/DESIGN.md "Checkpoint contract"), kind ``pretraining``, step and
epoch 0, without optimizer state:

- ``encoder``: the architecture (from the tensor shapes and ``args``), its token layout, the weights, and per
  domain the band names and the normalisation the reference used: Sentinel-2 z-scored with the MMEarth band
  stats of L2A (for every tile; the values are recorded when ``--band-stats`` names the MMEarth file set's
  ``<stem>_band_stats.json``), elevation standardised per tile (or z-scored with the ``aster`` stats when the run
  had ``standardize_depth`` off), land cover as the reference's 12 class ids (``worldcover12``);
- ``objective``: the MultiMAE-EO decoders (``multimae``);
- ``config``: ``cfgs/pretrain/reference.yaml`` with the checkpoint's architecture and the run's masking and loss
  settings from ``args`` (the schedule stays the recipe's), also written next to ``OUT`` as ``<OUT stem>.yaml``;
- ``imported_from``: the source file, its epoch and how every source key was handled.

Every state-dict key is copied, checked (the fixed sin-cos position tables) or refused with one error listing the
missing, unexpected and mis-shaped keys; the other top-level entries (optimizer, scaler, loss balancer) are
reported as not converted. The result fine-tunes with ``run_finetuning.py finetune.checkpoint=OUT`` and continues
pretraining with ``run_pretraining.py --config <OUT stem>.yaml resume=OUT`` (or as
``<output_dir>/checkpoint-last.pth``; the optimizer starts fresh).

``--check FIXTURE`` reads a parity fixture (weights, inputs, masks and outputs computed by the reference
itself: ``state_dict``, ``config``, ``inputs``, ``task_masks``, ``encoder_tokens``, ``encoder_tokens_masked``,
``preds``, ``preds_unmasked``, ``losses``), converts its state dict as above, runs this project's encoder and
objective on its inputs and masks (CPU, float32, eval mode), prints the maximum absolute difference of every
compared tensor and every loss, and exits 1 when one is beyond the fixture's tolerances (atol 1e-5 and rtol
1e-5 for tensors, rtol 1e-5 for losses), 0 otherwise. Bad input exits 2 with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from multimae.build import build_pretraining, data_domains  # noqa: E402
from multimae.domains import DOMAINS, get_domain, get_modality  # noqa: E402
from multimae.masking import mask_to_ids  # noqa: E402
from multimae.objectives import Objective  # noqa: E402
from multimae.reference import (  # noqa: E402
    REFERENCE_DOMAINS, ConvertedReference, ReferenceArchitecture, ReferenceCheckpointError,
    convert_reference_state_dict, infer_reference_architecture, load_reference_checkpoint,
)
from utils.checkpoint import FORMAT_VERSION, encoder_entry, load_state_checked, save_checkpoint  # noqa: E402
from utils.config import load_config, merge_config, user_errors  # noqa: E402
from utils.data.mmearth import domain_record  # noqa: E402
from utils.data.mmearth_files import load_band_stats  # noqa: E402

__all__ = ["RECIPE", "Comparison", "reference_config", "reference_domains", "build_reference_model", "config_path",
           "check_out", "convert_checkpoint", "write_checkpoint", "check_fixture", "format_rows", "main"]

#: The reference-compatible recipe every converted checkpoint's config starts from.
RECIPE = REPO / "cfgs" / "pretrain" / "reference.yaml"
#: Tolerances of the parity fixture (its README, section 6): tensors atol + rtol * |reference|, losses rtol.
ATOL, RTOL, LOSS_RTOL = 1e-5, 1e-5, 1e-5
#: Reference run arguments (``args`` of its checkpoint) -> this project's config key and value.
_ARGS = {
    "num_encoded_tokens": ("multimae.masking.num_encoded_tokens", int),
    "alphas": ("multimae.masking.alphas", lambda v: list(v) if isinstance(v, (list, tuple)) else float(v)),
    "sample_tasks_uniformly": ("multimae.masking.sample_domains_uniformly", bool),
    "loss_on_unmasked": ("multimae.loss.on_unmasked", bool),
    "standardize_depth": ("data.elevation_norm", lambda v: "per_tile" if v else "band_stats"),
    "hflip": ("data.hflip", float),
}
#: ``args`` entries :func:`multimae.reference.infer_reference_architecture` reads.
_ARCH_ARGS = ("model", "in_domains", "out_domains", "extra_norm_pix_loss", "decoder_num_heads")
_FIXTURE_KEYS = ("state_dict", "config", "inputs", "task_masks", "encoder_tokens", "encoder_tokens_masked", "preds",
                 "preds_unmasked", "losses")
_L2A = "sentinel2_l2a"  # the reference normalises every Sentinel-2 tile with the L2A statistics


# ------------------------------------------------------------------------------------------ config
def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def reference_config(arch: ReferenceArchitecture, args: dict | None = None, *, input_size: int | None = None,
                     in_domains: list[str] | None = None) -> tuple[dict, list[str]]:
    """The resolved config of a converted checkpoint: :data:`RECIPE` with its architecture and run arguments.

    Args:
        arch: The architecture (:func:`multimae.reference.infer_reference_architecture`).
        args: The reference run's arguments (``args`` of its checkpoint), or None.
        input_size: Training image side in px when ``args`` does not give it (default: the recipe's 56).
        in_domains: Another token order of the same input domains (a fixture's ``token_order``).

    Returns:
        The config, and the ``args`` entries it took (``"name -> config key"``).

    Raises:
        ReferenceCheckpointError: ``input_size`` contradicts ``args.input_size``, ``in_domains`` are other domains,
            or the run used uncertainty loss weighting (its balancer weights are not converted).
        ConfigError: an ``args`` value of the wrong type for its config key.
    """
    args = dict(args or {})
    if args.get("task_balancer") not in (None, "none"):
        raise ReferenceCheckpointError(
            f"args.task_balancer is {args['task_balancer']!r}: the run's loss_balancer weights are not converted "
            "(only the reference's default 'none', the plain sum, is supported)")
    over = arch.config_overrides()
    used = ["input_size -> data.input_size"] if arch.input_size is not None else []
    shapes = {"patch_size": arch.patch_size, "num_global_tokens": arch.num_global_tokens,
              "decoder_dim": arch.decoder_dim, "decoder_depth": arch.decoder_depth}
    for name, value in shapes.items():
        if args.get(name) is not None:
            if int(args[name]) != value:
                raise ReferenceCheckpointError(f"args.{name} is {args[name]}, but the weights have {value}")
            used.append(f"{name} (= the weights')")
    if args.get("task_balancer") is not None:
        used.append("task_balancer (none = multimae.loss.weighting none)")
    if input_size is not None:
        if arch.input_size is not None and arch.input_size != input_size:
            raise ReferenceCheckpointError(f"--input-size {input_size} contradicts args.input_size {arch.input_size}")
        _set(over, "data.input_size", int(input_size))
    for name, (key, convert) in _ARGS.items():
        if args.get(name) is not None:
            _set(over, key, convert(args[name]))
            used.append(f"{name} -> {key}")
    if in_domains is not None:
        if sorted(in_domains) != sorted(arch.in_domains):
            raise ReferenceCheckpointError(f"token order {in_domains} holds other domains than {list(arch.in_domains)}")
        over["in_domains"] = list(in_domains)
    return merge_config(load_config(RECIPE), over, "the reference checkpoint's architecture and args"), used


def reference_domains(cfg: dict, band_stats: str | Path | None = None) -> dict:
    """Per-domain description (``encoder.domains`` of a checkpoint) of what the reference fed its model.

    Sentinel-2 band groups: z-scored with the ``sentinel2_l2a`` band stats (the reference uses them for L1C
    tiles too); elevation: standardised per tile when ``data.elevation_norm`` is ``per_tile``, else z-scored
    with the ``aster`` stats; land cover: class ids. Statistic values come from ``band_stats``; without it
    ``stats`` stays empty.

    Args:
        cfg: The converted checkpoint's config (its ``in_domains`` and ``multimae.out_domains``).
        band_stats: An MMEarth ``<stem>_band_stats.json`` (the reference read ``data_1M_v001_64_band_stats.json``).

    Returns:
        ``{domain: utils.data.mmearth.domain_record(...)}`` for every domain a batch carries.

    Raises:
        FileNotFoundError / KeyError / ValueError: an unreadable band-stats file, or one lacking a needed key.
    """
    per_tile = cfg["data"]["elevation_norm"] == "per_tile"
    keys: dict[str, str] = {}  # domain -> stats key of its z-score
    needed, used, tiled = {}, {}, set()  # stats key -> modality, -> band indices; domains standardised per tile
    for name in data_domains(cfg):
        src = get_domain(get_domain(name).source or name)
        mod = get_modality(src.modality)
        if mod.kind != "continuous":
            continue
        if per_tile and src.modality == "aster" and tuple(src.bands) == ("elevation",):
            tiled.add(name)
            continue
        keys[name] = _L2A if mod.stats_key == "sentinel2" else mod.stats_key
        needed[keys[name]] = mod
        used.setdefault(keys[name], []).extend(src.band_indices)
    stats = {}
    if band_stats is not None:
        if not Path(band_stats).is_file():
            raise FileNotFoundError(f"--band-stats: no file {band_stats}")
        stats = load_band_stats(Path(band_stats), needed, used)
    out = {}
    for name in data_domains(cfg):
        key, idx = keys.get(name), get_domain(name).band_indices
        entry = {key: {"mean": stats[key]["mean"][idx].tolist(), "std": stats[key]["std"][idx].tolist()}
                 } if key in stats else {}
        out[name] = domain_record(name, per_tile=name in tiled, stats=entry)
    return out


def build_reference_model(cfg: dict, converted: ConvertedReference) -> Objective:
    """This project's encoder and MultiMAE-EO objective for ``cfg``, loaded with the converted weights (exact key
    check), in eval mode.

    Raises:
        CheckpointError: the converted weights do not match the model ``cfg`` describes.
    """
    model = build_pretraining(cfg)
    weights = {**{f"encoder.{k}": v for k, v in converted.encoder.items()}, **converted.decoders}
    load_state_checked(model, weights, what="the model of the reference-compatible config")
    return model.eval()


# ------------------------------------------------------------------------------------------ import
def config_path(out: str | Path) -> Path:
    """Where the converted checkpoint's config is written: ``<OUT stem>.yaml`` next to ``OUT``."""
    out = Path(out)
    return out.with_name(out.stem + ".yaml")


def convert_checkpoint(src: str | Path, *, num_heads: int | None = None, decoder_heads: int | None = None,
                       input_size: int | None = None, band_stats: str | Path | None = None) -> tuple[dict, list[str]]:
    """Read a reference checkpoint and build the v2 pretraining checkpoint (see the module docstring).

    Returns:
        The checkpoint dict, and report lines saying how every source entry was handled.

    Raises:
        FileNotFoundError: ``src`` or ``band_stats`` missing.
        ReferenceCheckpointError: not a reference checkpoint this project can map (the message lists the
            missing, unexpected and mis-shaped keys), or without decoders.
    """
    ref = load_reference_checkpoint(src)
    arch = infer_reference_architecture(ref.state_dict, ref.args, num_heads=num_heads, decoder_heads=decoder_heads)
    if not arch.out_domains:
        raise ReferenceCheckpointError(f"{src}: the state dict has no output adapters (decoders), so it is no "
                                       "pretraining checkpoint; only full MultiMAE-EO pretraining models convert")
    cfg, used = reference_config(arch, ref.args, input_size=input_size)
    conv = convert_reference_state_dict(ref.state_dict, arch)
    model = build_reference_model(cfg, conv)
    domains = reference_domains(cfg, band_stats)
    pairs = ", ".join(f"{s} -> {d}" for s, d in zip(arch.source_out_domains, arch.out_domains))
    lines = [
        f"read {src}: " + ("a bare state dict" if ref.args is None else
                           f"a reference checkpoint (epoch {ref.epoch}, {len(ref.args)} args)")
        + f", {len(ref.state_dict)} tensors",
        f"domains: {pairs}",
        f"encoder: {arch.dim} wide, depth {arch.depth}, {arch.num_heads} heads, patch {arch.patch_size}, "
        f"{arch.num_global_tokens} global token(s), position tables {arch.pos_embed_grid[0]}x{arch.pos_embed_grid[1]}; "
        f"decoders: {arch.decoder_dim} wide, depth {arch.decoder_depth}, {arch.decoder_heads} heads; "
        f"input {cfg['data']['input_size']} px",
        *conv.report(),
        "args used: " + (", ".join(used) if used else "none (the recipe's settings)"),
    ]
    if ref.args is not None:
        taken = {u.split(" ")[0] for u in used} | set(_ARCH_ARGS)
        rest = sorted(k for k in ref.args if k not in taken)
        lines.insert(-1, "architecture from args: " + (", ".join(k for k in _ARCH_ARGS if k in ref.args) or "none"))
        if rest:
            lines.append(f"args not used (schedule, paths, run time: the recipe's values apply): {', '.join(rest)}")
    if ref.other_keys:
        lines.append(f"not converted: {', '.join(ref.other_keys)} (the reference run's training state; "
                     "the optimizer starts fresh)")
    if band_stats is None:
        lines.append("statistics: not recorded (pass --band-stats <stem>_band_stats.json of the MMEarth file set the "
                     f"reference used); the reference z-scored Sentinel-2 with its {_L2A} entry")
    else:
        lines.append(f"statistics: {', '.join(sorted({k for d in domains.values() for k in d['stats']}))} from "
                     f"{band_stats}")
    state = {
        "format_version": FORMAT_VERSION, "kind": "pretraining",
        "encoder": encoder_entry(model.encoder, domains), "objective": model.objective_state(),
        "step": 0, "epoch": 0, "epoch_step": 0, "config": cfg,
        "imported_from": {"path": str(src), "code": "josesosajs/multimae-meets-eo", "epoch": ref.epoch,
                          "not_converted": list(ref.other_keys), "report": list(lines)},
    }
    return state, lines


def check_out(out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """The checkpoint and config paths of ``OUT``, checked before anything is converted.

    Raises:
        ValueError: ``out`` exists and not ``overwrite``, or is a ``.yaml`` path (it would be its own config file).
    """
    out, cfg_path = Path(out), config_path(out)
    if cfg_path == out:
        raise ValueError(f"OUT {out} must not end in .yaml (its config is written as {cfg_path})")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    return out, cfg_path


def write_checkpoint(state: dict, out: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Save the checkpoint (atomically) and its config as ``<OUT stem>.yaml``.

    Raises:
        ValueError: ``out`` exists and not ``overwrite``, or is a ``.yaml`` path (it would be its own config file).
    """
    out, cfg_path = check_out(out, overwrite)
    save_checkpoint(state, out)
    src = state["imported_from"]["path"]
    header = (f"# The config of {out.name}, converted from {src} by tools/import_reference_checkpoint.py:\n"
              "# cfgs/pretrain/reference.yaml with the checkpoint's architecture. Continue pretraining with\n"
              f"#   python run_pretraining.py --config {cfg_path} data_path=DATA output_dir=DIR resume={out}\n")
    cfg_path.write_text(header + yaml.safe_dump(state["config"], sort_keys=False))
    return out, cfg_path


# ------------------------------------------------------------------------------------------- check
@dataclass
class Comparison:
    """One compared quantity of ``--check``.

    Attributes:
        name: Fixture entry (``preds.rgb``), with this project's domain in parentheses.
        max_abs: Maximum absolute difference (inf for a shape mismatch).
        max_rel: Relative difference (losses), else None.
        tolerance: The tolerance applied, as text.
        ok: Within tolerance.
    """

    name: str
    max_abs: float
    max_rel: float | None
    tolerance: str
    ok: bool


def _compare(name: str, ours: torch.Tensor, ref: torch.Tensor) -> Comparison:
    if tuple(ours.shape) != tuple(ref.shape):
        return Comparison(name, float("inf"), None, f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}", False)
    exact = not ref.is_floating_point()  # indices
    ours, ref = ours.detach().double(), ref.double()
    diff = float((ours - ref).abs().max()) if ref.numel() else 0.0
    if exact:
        return Comparison(name, diff, None, "exact", diff == 0)
    return Comparison(name, diff, None, f"atol {ATOL:g} + rtol {RTOL:g}",
                      bool(torch.isclose(ours, ref, rtol=RTOL, atol=ATOL).all()))


def _compare_loss(name: str, ours: torch.Tensor, ref: torch.Tensor) -> Comparison:
    a, b = float(ours), float(ref)
    diff = abs(a - b)
    rel = diff / abs(b) if b else (0.0 if diff == 0 else float("inf"))
    return Comparison(name, diff, rel, f"rtol {LOSS_RTOL:g}", diff <= LOSS_RTOL * abs(b))


def _load_fixture(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--check: no fixture file {path}")
    try:
        fx = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one holding objects outside weights_only
        raise ValueError(f"{path}: cannot be read as a parity fixture: {str(err).strip().splitlines()[0]}") from None
    missing = [k for k in _FIXTURE_KEYS if not isinstance(fx, dict) or k not in fx]
    if missing:
        raise ValueError(f"{path}: not a parity fixture: missing entries {', '.join(missing)} "
                         f"(a fixture holds {', '.join(_FIXTURE_KEYS)})")
    if "token_order" not in fx["config"] or "num_heads" not in fx["config"]:
        raise ValueError(f"{path}: the fixture's config lacks token_order or num_heads")
    return fx


@torch.no_grad()
def check_fixture(path: str | Path) -> tuple[list[Comparison], list[str]]:
    """Run this project's model, converted from a fixture's reference weights, on the fixture's inputs and masks.

    The architecture comes from the state dict and the fixture's ``config`` (heads, decoder heads, input size,
    domains, token order); the land-cover input is the fixture's 1/4-resolution class map repeated to full
    resolution (the project's adapter majority-pools it back exactly).

    Returns:
        One :class:`Comparison` per compared tensor and loss, and the conversion report lines.

    Raises:
        FileNotFoundError / ValueError: not a readable fixture. ReferenceCheckpointError: its state dict does not
            convert.
    """
    fx = _load_fixture(path)
    c = fx["config"]
    args = {**c, "in_domains": list(c["token_order"])}
    if "output_adapters" in c:
        args["out_domains"] = list(c["output_adapters"])
    arch = infer_reference_architecture(fx["state_dict"], args, num_heads=int(c["num_heads"]))
    order = [REFERENCE_DOMAINS[d] for d in c["token_order"]]
    cfg, _ = reference_config(arch, args, in_domains=order)
    conv = convert_reference_state_dict(fx["state_dict"], arch)
    model = build_reference_model(cfg, conv)
    names = (*fx["inputs"], *fx["preds"], *fx["preds_unmasked"], *fx["task_masks"])
    unknown = sorted({d for d in names if d not in REFERENCE_DOMAINS})
    if unknown:
        raise ValueError(f"{path}: fixture entries of unknown reference domains: {', '.join(unknown)}")
    ours = {d: REFERENCE_DOMAINS[d] for d in names}
    inputs = {}
    for ref_name, x in fx["inputs"].items():
        dom = DOMAINS[ours[ref_name]]
        if dom.kind == "categorical":  # (B, H/ds, W/ds) class ids -> full resolution, constant on ds x ds blocks
            x = x.repeat_interleave(dom.label_downsample, 1).repeat_interleave(dom.label_downsample, 2)
        inputs[ours[ref_name]] = x
    masks = {ours[k]: v.float() for k, v in fx["task_masks"].items()}
    rows = [_compare("encoder_tokens", model.encoder.encode(inputs), fx["encoder_tokens"])]
    tok = model.encoder.tokenize(inputs)
    ids_keep, _ = mask_to_ids(torch.cat([masks[d] for d in model.encoder.in_domains], dim=1))
    if "visible_index" in fx:
        rows.append(_compare("visible_index", ids_keep, fx["visible_index"]))
    rows.append(_compare("encoder_tokens_masked", model.encoder.encode_visible(tok.tokens, ids_keep),
                         fx["encoder_tokens_masked"]))
    preds, out_masks = model.predict(inputs, masks={d: masks[d] for d in model.encoder.in_domains})
    rows += [_compare(f"preds.{k} ({ours[k]})", preds[ours[k]], v) for k, v in fx["preds"].items()]
    unmasked, _ = model.predict(inputs, mask_all_visible=True)
    rows += [_compare(f"preds_unmasked.{k} ({ours[k]})", unmasked[ours[k]], v) for k, v in fx["preds_unmasked"].items()]
    losses = model.criterion(preds, inputs, out_masks)
    for k, v in fx["losses"].items():
        if k == "total":
            rows.append(_compare_loss("losses.total (loss)", losses["loss"], v))
        elif k in REFERENCE_DOMAINS and REFERENCE_DOMAINS[k] in losses:
            rows.append(_compare_loss(f"losses.{k} ({REFERENCE_DOMAINS[k]})", losses[REFERENCE_DOMAINS[k]], v))
        else:
            rows.append(Comparison(f"losses.{k}", float("inf"), None, "no such loss in this project's model", False))
    report = [f"fixture {path}: reference {fx.get('reference_commit', 'commit unknown')}, "
              f"{len(fx['state_dict'])} tensors", *conv.report(),
              f"model: in_domains {', '.join(order)}; out_domains {', '.join(arch.out_domains)}; "
              f"encoder {arch.dim} wide, depth {arch.depth}, {arch.num_heads} heads; decoders {arch.decoder_dim} "
              f"wide, depth {arch.decoder_depth}, {arch.decoder_heads} heads; {cfg['data']['input_size']} px; "
              "CPU, float32, eval mode"]
    return rows, report


def format_rows(rows: list[Comparison]) -> list[str]:
    """The ``--check`` table: one line per quantity, then a verdict."""
    width = max(len(r.name) for r in rows)
    out = [f"{'quantity':<{width}}  {'max abs diff':>12}  {'rel diff':>9}  {'tolerance':<23}  result"]
    for r in rows:
        rel = f"{r.max_rel:9.2e}" if r.max_rel is not None else f"{'':9}"
        out.append(f"{r.name:<{width}}  {r.max_abs:12.3e}  {rel}  {r.tolerance:<23}  {'ok' if r.ok else 'FAIL'}")
    bad = [r.name for r in rows if not r.ok]
    out.append(f"all {len(rows)} quantities within tolerance" if not bad else
               f"{len(bad)} of {len(rows)} beyond tolerance: {', '.join(bad)}")
    return out


# --------------------------------------------------------------------------------------------- CLI
def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", help="reference checkpoint (save_model format) or bare state dict")
    parser.add_argument("out", nargs="?", help="the converted pretraining checkpoint to write (.pth)")
    parser.add_argument("--check", metavar="FIXTURE", help="parity check on a reference fixture instead of a conversion")
    parser.add_argument("--num-heads", type=int, help="encoder heads (needed when args.model and width / 64 do not say)")
    parser.add_argument("--decoder-heads", type=int, help="decoder heads (default: args.decoder_num_heads, else 8)")
    parser.add_argument("--input-size", type=int, help="training image side in px when args lacks it (default 56)")
    parser.add_argument("--band-stats", help="MMEarth <stem>_band_stats.json whose statistics the reference used")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    if args.check:
        if args.src or args.out:
            parser.error("--check FIXTURE takes no SRC / OUT")
        rows, report = check_fixture(args.check)
        print("\n".join(report + [""] + format_rows(rows)))
        return 0 if all(r.ok for r in rows) else 1
    if not (args.src and args.out):
        parser.error("SRC and OUT are required (or --check FIXTURE)")
    check_out(args.out, args.overwrite)
    state, lines = convert_checkpoint(args.src, num_heads=args.num_heads, decoder_heads=args.decoder_heads,
                                      input_size=args.input_size, band_stats=args.band_stats)
    out, cfg_path = write_checkpoint(state, args.out, overwrite=args.overwrite)
    norm = state["config"]["data"]["elevation_norm"]
    print("\n".join(lines + [
        f"wrote {out} (format v{FORMAT_VERSION}, kind pretraining, step 0, no optimizer state) and its config {cfg_path}",
        f"fine-tune:  python run_finetuning.py --config ... finetune.checkpoint={out} data.elevation_norm={norm}",
        f"pretrain:   python run_pretraining.py --config {cfg_path} data_path=DATA output_dir=DIR resume={out}",
    ]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: the exit status (0 ok, 1 ``--check`` beyond tolerance, 2 bad input with one
    ``error:`` line)."""
    with user_errors():
        return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
