"""Run logging on rank 0: a tqdm progress bar, ``<output_dir>/log.jsonl`` and optional wandb.

``log.jsonl`` holds one JSON object per logged optimizer step (and one per epoch with validation
values). Every other rank gets a ``RunLogger`` whose methods do nothing, so callers never branch
on the rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["RunLogger", "read_log", "truncate_log"]


def _plain(value: Any) -> Any:
    """JSON-safe value: floats stay floats (NaN / inf as strings), tensors become numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(path: str | Path) -> list[dict]:
    """Records of a ``log.jsonl`` file (empty when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: str | Path, step: int) -> None:
    """Drop records with ``step`` beyond ``step``: a resumed run repeats them from its checkpoint."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class RunLogger:
    """Progress bar, JSON-lines log and wandb for one run.

    Args:
        output_dir: Folder of ``log.jsonl``.
        enabled: False on every rank but 0.
        total_steps: Optimizer steps of the whole run (sets the bar's length and ETA).
        start_step: Steps already done (when resuming).
        wandb_cfg: Config section ``wandb`` (mode, project, entity, run_name, tags).
        config: The resolved config, passed to ``wandb.init`` as a plain dict.
        world_size: Written into the first record this logger writes.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 wandb_cfg: dict | None = None, config: dict | None = None, world_size: int = 1) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self.world_size = world_size
        self._first = True
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0)
        wandb_cfg = wandb_cfg or {"mode": "disabled"}
        if wandb_cfg["mode"] != "disabled":
            import wandb  # imported only when used: it is slow to import

            self.wandb = wandb.init(
                mode=wandb_cfg["mode"], project=wandb_cfg["project"], entity=wandb_cfg["entity"],
                name=wandb_cfg["run_name"], tags=list(wandb_cfg["tags"]), config=config,
                dir=str(self.path.parent), resume="allow", id=self.wandb_id(self.path.parent),
            )

    @staticmethod
    def wandb_id(output_dir: Path) -> str:
        """wandb run id derived from the output folder, so a resumed run continues the same wandb run."""
        return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]

    def start_at(self, step: int) -> None:
        """Start the bar (and its rate and ETA) at ``step`` optimizer steps done, after a resume."""
        if self.bar is not None:
            self.bar.reset(total=self.bar.total)
            self.bar.initial = self.bar.n = self.bar.last_print_n = step
            self.bar.refresh()

    def advance(self, step: int, postfix: dict[str, float] | None = None) -> None:
        """Move the bar to ``step`` and show ``postfix`` (e.g. loss, lr, samples/s)."""
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``step``) to ``log.jsonl`` and to wandb."""
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        if self._first:
            record["world_size"] = self.world_size
            self._first = False
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def log_images(self, step: int, paths: list[Path]) -> None:
        """Send saved pictures to wandb as ``wandb.Image`` (files are already on disk)."""
        if self.wandb is None or not paths:
            return
        import wandb

        self.wandb.log({f"reconstructions/{p.stem.split('_step')[0]}": wandb.Image(str(p)) for p in paths},
                       step=step)

    def write(self, message: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        """Close the bar and finish the wandb run."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
