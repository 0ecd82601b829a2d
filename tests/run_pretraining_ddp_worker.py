"""Worker of the 2-process DDP test: run ``run_pretraining.main`` under torchrun, then save this rank's
parameters to ``<output_dir>/params_rank<r>.pth`` so the test can compare ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import run_pretraining
from utils.config import load_config

_finish = run_pretraining.PretrainTask.finish


def _finish_and_dump(self, log):
    _finish(self, log)
    params = {k: v.detach().cpu().clone() for k, v in self.objective.state_dict().items()}
    torch.save(params, Path(self.cfg["output_dir"]) / f"params_rank{self.info.rank}.pth")


if __name__ == "__main__":
    run_pretraining.PretrainTask.finish = _finish_and_dump
    run_pretraining.main(load_config(None, sys.argv[1:]))
