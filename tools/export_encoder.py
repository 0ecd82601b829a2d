"""Export the encoder of a pretraining checkpoint as a self-describing folder (safetensors + config.json + card).

Usage::

    python tools/export_encoder.py output/demo/pretrain/checkpoint-last.pth output/demo/export

writes ``OUT_DIR/model.safetensors`` (the encoder alone), ``OUT_DIR/config.json`` (architecture, token layout,
the input domains with band names in order, units, normalisation and statistics, the objective and its
settings, ``format_version``, the code commit) and ``OUT_DIR/README.md`` (a model card listing the inputs):
a folder that ``huggingface_hub.upload_folder`` uploads as is and that ``multimae.load_pretrained`` rebuilds
the encoder from (:mod:`multimae.pretrained`). Checkpoints of any objective and of format v1 or v2
(:func:`utils.checkpoint.read_checkpoint`) are read; the exported encoder computes exactly what the
checkpoint's does.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimae.encoder import MultiModalEncoder  # noqa: E402
from multimae.pretrained import save_pretrained  # noqa: E402
from utils.checkpoint import CheckpointError, code_commit, load_state_checked, read_checkpoint  # noqa: E402
from utils.config import user_errors  # noqa: E402

__all__ = ["export_encoder", "main"]


def _package_version() -> str | None:
    try:
        return metadata.version("multimae-eo")
    except metadata.PackageNotFoundError:
        return None


def export_encoder(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the export folder of a pretraining checkpoint's encoder.

    Args:
        checkpoint: A pretraining checkpoint (``run_pretraining.py``; any objective, format v1 or v2).
        out_dir: The export folder to write.
        overwrite: Replace an existing export in ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: unreadable, not a pretraining checkpoint, or its encoder weights do not fit its
            ``encoder.spec``.
        ValueError: the checkpoint's ``encoder.domains`` lacks an input domain's record (names the file,
            domain and field), or ``out_dir`` already holds an export and ``overwrite`` is False.
    """
    checkpoint = Path(checkpoint)
    try:
        state = read_checkpoint(checkpoint, kind="pretraining")
    except CheckpointError as err:
        raise CheckpointError(f"{err} (export_encoder reads checkpoints of run_pretraining.py)") from None
    entry = state["encoder"]
    encoder = MultiModalEncoder.from_spec(entry["spec"], init_weights=False)
    load_state_checked(encoder, entry["state_dict"], what=f"encoder of {checkpoint}")
    cfg = state.get("config") or {}
    name = state["objective"]["name"]
    pretraining = {"checkpoint": checkpoint.name, "step": state.get("step"), "epoch": state.get("epoch"),
                   "data": Path(str(cfg["data_path"])).name if cfg.get("data_path") else None,
                   "input_size": (cfg.get("data") or {}).get("input_size")}
    try:
        return save_pretrained(encoder, out_dir, domains=entry.get("domains") or {},
                               objective={"name": name, "config": cfg.get(name)}, pretraining=pretraining,
                               code_commit=state.get("code_commit") or code_commit(), code_version=_package_version(),
                               overwrite=overwrite)
    except FileExistsError as err:
        raise ValueError(f"{err}; use --overwrite") from None
    except ValueError as err:
        raise ValueError(f"{checkpoint}: encoder.{err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="pretraining checkpoint (checkpoint-last.pth)")
    parser.add_argument("out_dir", help="export folder to write (model.safetensors, config.json, README.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT_DIR")
    args = parser.parse_args(argv)
    with user_errors():
        out = export_encoder(args.checkpoint, args.out_dir, overwrite=args.overwrite)
        print(f"wrote {out}/model.safetensors, config.json, README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
