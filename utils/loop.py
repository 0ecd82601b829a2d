"""The one training loop of pretraining and fine-tuning: schedule, micro-batches, cadence, checkpoints, resume.

A run script supplies a :class:`LoopTask` (its data, its model and engine, its training step, its checkpoint
entries and what it does at the end of an epoch); :class:`TrainLoop` does everything else the same way for
both, with the run-wide config keys meaning the same in both:

- the schedule: ``steps_per_epoch = floor(train samples / world_size / batch_size) // accum_steps``; linear
  warm-up over ``optim.warmup_epochs`` then a half cosine to ``optim.min_lr`` at ``epochs`` (a warm-up that
  would cover the whole run is clipped to a tenth of it, with a warning naming the keys); ``max_steps`` only
  stops early;
- every optimizer step takes ``accum_steps`` micro-batches (:class:`utils.engine.Engine`); the task's
  ``after_step`` hook runs after every step that was not skipped;
- cadence: one ``log.jsonl`` record every ``log_every_steps`` steps (and at step 1), ``checkpoint-last.pth``
  every ``save_every_steps`` steps and at every epoch end, ``checkpoint-epoch<N>.pth`` every
  ``keep_every_epochs`` epochs and at the last epoch;
- exact resume: model and task state, optimizer, scaler, step / epoch / position in the epoch, the sampler and
  the RNG states of every rank (a checkpoint of another world size resumes with a warning: the trajectory
  then differs);
- pre-emption: SIGTERM or SIGUSR1 (what SLURM sends before it stops a job) makes every rank finish its step,
  write ``checkpoint-last.pth`` and exit with status :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``): running
  the same command again resumes on the same trajectory;
- throughput facts in every step record: ``data_wait_fraction`` (share of the wall time since the last record
  spent waiting for the loader), ``samples_per_s``, ``peak_mem_mb`` (max allocated on GPU, peak RSS on CPU) and,
  on a known GPU, ``mfu`` (FLOPs of one step counted once with torch's flop counter); ``skipped_rows`` (damaged
  rows the dataset replaced, see :class:`utils.data.mmearth.MMEarthDataset`);
- a resume whose training data changed (band statistics, split, steps per epoch) is refused unless
  ``resume_anyway`` (:func:`utils.checkpoint.check_resume_data`).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils import checkpoint as ckpt
from utils.config import effective_lr, total_batch_size
from utils.dist import DistInfo, all_gather_object, all_reduce_mean
from utils.engine import Engine, autocast
from utils.logger import RunLogger, truncate_log
from utils.optim import cosine_lr, set_lr
from utils.throughput import count_flops, peak_memory_mb, peak_tflops

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "Progress", "LoopTask", "TrainLoop", "schedule"]

#: Exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint (sysexits EX_TEMPFAIL: retry).
PREEMPTED_EXIT_CODE = 75
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The run was asked to stop by a signal; ``checkpoint-last.pth`` holds the step it stopped at.

    A ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE`, so the command exits with it without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message


class _StopRequest:
    """Handlers of SIGTERM and SIGUSR1 that only record the request (installed in the main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, world_size: int) -> bool:
        """True when any rank got a stop signal (one all-reduce of a scalar with several ranks)."""
        local = torch.tensor([1.0 if self.signum is not None else 0.0])
        return bool(all_reduce_mean(local).item() > 0) if world_size > 1 else local.item() > 0


@dataclass
class Progress:
    """Where the run stands: ``step`` optimizer steps done, ``epoch`` current epoch, ``epoch_step`` steps done
    within it."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


class LoopTask:
    """What a run script gives the loop. Subclasses set the attributes and override the methods they need.

    Attributes:
        kind: Checkpoint kind, ``pretraining`` or ``finetuning``.
        engine: The :class:`utils.engine.Engine` of the trained module (its optimizer, precision, DDP wrap).
        train_set: The training dataset (its ``set_epoch`` seeds the augmentation, when it has one).
        train_loader: DataLoader over a :class:`utils.sampler.ResumableDistributedSampler`.
        train_gen: The loader's generator (reseeded per epoch, saved with the RNG states).
        loop: The :class:`TrainLoop` running the task (set by the loop; ``loop.progress`` is where it stands).
    """

    kind: str
    engine: Engine
    train_set: object
    train_loader: DataLoader
    train_gen: torch.Generator
    loop: "TrainLoop"

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One forward pass through ``engine.model``: ``{"loss": fp32 scalar, ...}``."""
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """After optimizer step ``step`` (1-based) that was not skipped."""

    def state(self) -> dict:
        """The task's checkpoint entries (model weights, objective state, best score, ...)."""
        raise NotImplementedError

    def load_state(self, state: dict, path: Path) -> None:
        """Restore :meth:`state` from a (v2) checkpoint read from ``path``."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, last: bool, log: RunLogger) -> tuple[dict, list[str]]:
        """After epoch ``epoch`` (1-based) ended; ``last`` when the run ends with it.

        Returns:
            Entries for the epoch's log record (e.g. validation metrics), and names of extra checkpoints to write
            with this epoch's state (e.g. ``checkpoint-best.pth``).
        """
        return {}, []

    def finish(self, log: RunLogger) -> None:
        """When the run has reached ``epochs`` or ``max_steps`` (also when resumed complete)."""

    def describe(self) -> str:
        """One line printed when training starts."""
        return ""

    def peak_lr(self, cfg: dict, world_size: int) -> float:
        """The schedule's peak lr: ``optim.blr * total_batch / 256`` unless the task has its own (a linear probe)."""
        return effective_lr(cfg, world_size)


def schedule(cfg: dict, steps_per_epoch: int) -> tuple[int, int, str | None]:
    """Total and warm-up optimizer steps of a run, with the warm-up guard.

    Returns:
        ``(total_steps, warmup_steps, warning or None)``: a warm-up of ``optim.warmup_epochs`` that would
        cover the whole run (``epochs``) is clipped to a tenth of the run, and the warning says so.
    """
    total = cfg["epochs"] * steps_per_epoch
    warmup = round(cfg["optim"]["warmup_epochs"] * steps_per_epoch)
    if warmup >= total > 0:
        clipped = max(1, total // 10)
        return total, clipped, (f"optim.warmup_epochs={cfg['optim']['warmup_epochs']} covers the whole run "
                                f"(epochs={cfg['epochs']}, {total} steps): warm-up clipped to {clipped} steps")
    return total, warmup, None


class TrainLoop:
    """Epochs of optimizer steps for a :class:`LoopTask`, with logging, checkpoints and exact resume.

    Args:
        cfg: The resolved config.
        info: This process's rank, world size and device.
        task: The run's task.
        out: Output folder (rank 0 writes ``log.jsonl`` and checkpoints there).

    Raises:
        ValueError: the training split is smaller than one optimizer step.
    """

    def __init__(self, cfg: dict, info: DistInfo, task: LoopTask, out: Path) -> None:
        self.cfg, self.info, self.task, self.out = cfg, info, task, Path(out)
        per_rank = len(task.train_loader.sampler) // cfg["batch_size"]
        self.steps_per_epoch = per_rank // cfg["accum_steps"]
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(task.train_set)} samples: fewer than one optimizer step needs "
                f"(batch_size x accum_steps x world_size = {total_batch_size(cfg, info.world_size)})"
            )
        self.total_steps, self.warmup_steps, self.warning = schedule(cfg, self.steps_per_epoch)
        self.lr = task.peak_lr(cfg, info.world_size)
        self.progress = Progress()
        self.flops_per_step: float | None = None
        self.code_commit = ckpt.code_commit()
        task.loop = self

    # ------------------------------------------------------------------ checkpoints
    def _samples_done(self) -> int:
        """Samples this rank has consumed in the current epoch (the sampler's resume position)."""
        return self.progress.epoch_step * self.cfg["accum_steps"] * self.cfg["batch_size"]

    def state(self) -> dict:
        """The checkpoint dict (docs/DESIGN.md); gathers every rank's RNG state, so all ranks call it."""
        rngs = all_gather_object(ckpt.rng_state({"loader": self.task.train_gen}))
        p = self.progress
        sampler = {**self.task.train_loader.sampler.state_dict(), "epoch": p.epoch, "start": self._samples_done()}
        return {"format_version": ckpt.FORMAT_VERSION, "kind": self.task.kind, **self.task.state(),
                "data_fingerprint": self._fingerprint(),
                **self.task.engine.state_dict(), "step": p.step, "epoch": p.epoch, "epoch_step": p.epoch_step,
                "steps_per_epoch": self.steps_per_epoch, "rng": rngs, "sampler": sampler, "config": self.cfg,
                "code_commit": self.code_commit}

    def _fingerprint(self) -> dict:
        """What a resume must find unchanged about the training data (:func:`utils.checkpoint.data_fingerprint`;
        steps per epoch only for a dataset without domain records and a split digest)."""
        ds = self.task.train_set
        if hasattr(ds, "domain_info") and hasattr(ds, "rows_digest"):
            return ckpt.data_fingerprint(ds, self.steps_per_epoch)
        return {"steps_per_epoch": self.steps_per_epoch}

    def save(self, *names: str) -> None:
        """Write the checkpoint atomically under each of ``names`` in the output folder (rank 0; all ranks call)."""
        state = self.state()
        if self.info.is_main:
            for name in names:
                ckpt.save_checkpoint(state, self.out / name)

    def resume(self, path: Path, log: RunLogger) -> None:
        """Restore the task, optimizer, scaler, progress and RNG states from ``path``.

        A weights-only checkpoint (no optimizer or RNG state, e.g. one written by
        ``tools/import_reference_checkpoint.py``) starts a fresh optimizer and keeps this run's seeding, and says so.
        """
        state = ckpt.read_checkpoint(path, kind=self.task.kind)
        missing = [k for k in ("epoch",) if k not in state]
        if missing:
            raise ckpt.CheckpointError(f"{path}: checkpoint entry {missing[0]!r} is missing (not written by this code's "
                                       f"training loop?); resume=never starts over elsewhere")
        for line in ckpt.check_resume_data(state.get("data_fingerprint", {}), self._fingerprint(), path,
                                           resume_anyway=self.cfg["resume_anyway"]):
            log.write(f"warning: resume_anyway: {line}")
        self.task.load_state(state, path)
        fresh = {} if self.task.engine.load_state_dict(state) else {"optimizer": "the optimizer starts fresh"}
        epoch = int(state["epoch"])
        self.progress = Progress(int(state.get("step", epoch * self.steps_per_epoch)), epoch,
                                 int(state.get("epoch_step", 0)))
        if self.info.is_main:  # records after the checkpoint are repeated by this run
            truncate_log(self.out / "log.jsonl", self.progress.step)
        if state.get("rng") is None:
            fresh["RNG"] = "this run's seeds are used"
        elif len(state["rng"]) == self.info.world_size:
            ckpt.set_rng_state(state["rng"][self.info.rank], {"loader": self.task.train_gen})
        else:
            log.write(f"warning: resume: {path} holds RNG states of {len(state['rng'])} ranks, this run has "
                      f"{self.info.world_size}: the run continues, but not on the identical trajectory")
        if fresh:
            log.write(f"note: {path} holds no {' or '.join(fresh)} state: {', '.join(fresh.values())}")
        log.write(f"resumed from {path} at step {self.progress.step} (epoch {self.progress.epoch})")

    # ------------------------------------------------------------------ loop
    def finished(self) -> bool:
        """True once ``epochs`` are done or ``max_steps`` optimizer steps are reached."""
        cap = self.cfg["max_steps"]
        return self.progress.epoch >= self.cfg["epochs"] or (cap is not None and self.progress.step >= cap)

    def logger(self) -> RunLogger:
        """The run's :class:`utils.logger.RunLogger` (progress bar over the steps this run will take)."""
        cap = self.cfg["max_steps"]
        return RunLogger(self.out, enabled=self.info.is_main,
                         total_steps=self.total_steps if cap is None else min(cap, self.total_steps),
                         wandb_cfg=self.cfg["wandb"], config=self.cfg, world_size=self.info.world_size)

    def run(self, log: RunLogger) -> dict:
        """Resume from ``cfg["resume"]`` (if any), train until ``epochs`` or ``max_steps``, then the task's finish.

        Returns:
            The last logged step record (empty when the run was already complete).
        """
        resume = ckpt.resume_path(self.cfg["resume"], self.out)
        if resume is not None:
            self.resume(resume, log)
            log.start_at(self.progress.step)
        if self.warning:
            log.write(f"warning: {self.warning}")
        if self.finished():
            log.write(f"{self.out}: run already complete at step {self.progress.step}; nothing to do")
            self.task.finish(log)
            return {}
        log.write(f"{self.task.describe()}; {self.steps_per_epoch} steps/epoch, lr {self.lr:.3g}, world size "
                  f"{self.info.world_size}, device {self.info.device}, precision {self.task.engine.precision}")
        with _StopRequest() as stop:
            last = self._train(log, stop)
        self.task.finish(log)
        return last

    def _count_flops(self, micro: list[dict]) -> None:
        """FLOPs of one step (forward + backward of every micro-batch), on CUDA only; RNG and gradients untouched."""
        engine = self.task.engine
        if engine.device.type != "cuda" or peak_tflops(engine.device) is None:
            return
        with torch.random.fork_rng(devices=[engine.device]):
            def step():
                for batch in micro:
                    with autocast(engine.device, engine.precision):
                        loss = self.task.step(engine.to_device(batch))["loss"]
                    loss.float().backward()
            self.flops_per_step = count_flops(step) * self.info.world_size
        engine.optimizer.zero_grad(set_to_none=True)

    def _preempt(self, stop: _StopRequest, log: RunLogger) -> None:
        p = self.progress
        if p.step % self.cfg["save_every_steps"] != 0:
            self.save("checkpoint-last.pth")
        name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
        message = (f"stopped by {name} at step {p.step}: {self.out / 'checkpoint-last.pth'} written; run the same "
                   f"command to resume (exit status {PREEMPTED_EXIT_CODE})")
        log.write(message)
        raise Preempted(message)

    def _start_epoch(self):
        p, cfg, task = self.progress, self.cfg, self.task
        if hasattr(task.train_set, "set_epoch"):
            task.train_set.set_epoch(p.epoch)
        task.train_loader.sampler.set_epoch(p.epoch, start=self._samples_done())
        task.train_gen.manual_seed(cfg["seed"] * 100_003 + p.epoch * 1_009 + self.info.rank)
        return iter(task.train_loader)

    def _train(self, log: RunLogger, stop: _StopRequest) -> dict:
        cfg, p, engine = self.cfg, self.progress, self.task.engine
        samples_per_step = total_batch_size(cfg, self.info.world_size)
        peak = peak_tflops(engine.device)
        last, t0, n0, waited = {}, time.perf_counter(), p.step, 0.0
        while not self.finished():
            batches, t_epoch, losses = self._start_epoch(), time.perf_counter(), []
            while p.epoch_step < self.steps_per_epoch and not self.finished():
                t_wait = time.perf_counter()
                micro = [next(batches) for _ in range(cfg["accum_steps"])]
                waited += time.perf_counter() - t_wait
                if self.flops_per_step is None and peak is not None:
                    self._count_flops(micro)
                lr = cosine_lr(p.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                               base_lr=self.lr, min_lr=cfg["optim"]["min_lr"])
                set_lr(engine.optimizer, lr)
                out = engine.train_step(self.task.step, micro)
                p.step, p.epoch_step = p.step + 1, p.epoch_step + 1
                if not out.skipped:
                    self.task.after_step(p.step, self.total_steps)
                    losses.append(out.values["loss"])
                if p.step % cfg["log_every_steps"] == 0 or p.step == 1:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    rate = (p.step - n0) * samples_per_step / elapsed
                    last = {"step": p.step, "epoch": round(p.epoch + p.epoch_step / self.steps_per_epoch, 4),
                            **out.values, "lr": lr, "grad_norm": out.grad_norm, "samples_per_s": rate,
                            "skipped_steps": engine.nonfinite_total, "data_wait_fraction": round(waited / elapsed, 4),
                            "skipped_rows": int(getattr(self.task.train_set, "skipped_rows", 0)),
                            "peak_mem_mb": round(peak_memory_mb(engine.device), 1)}
                    if self.flops_per_step is not None and peak is not None:
                        steps_per_s = (p.step - n0) / elapsed
                        last["mfu"] = self.flops_per_step * steps_per_s / (peak * 1e12 * self.info.world_size)
                    log.log(last)
                    log.advance(p.step, {"loss": out.values["loss"], "lr": lr, "samples/s": rate})
                    t0, n0, waited = time.perf_counter(), p.step, 0.0
                if p.step % cfg["save_every_steps"] == 0:
                    self.save("checkpoint-last.pth")
                if stop.agreed(self.info.world_size):
                    del batches
                    self._preempt(stop, log)
            del batches  # shut the workers down before evaluation starts its own
            if p.epoch_step == self.steps_per_epoch:
                self._end_epoch(log, losses, time.perf_counter() - t_epoch)
                t0 = time.perf_counter()  # samples/s counts training only
            elif p.step % cfg["save_every_steps"] != 0:
                self.save("checkpoint-last.pth")  # stopped mid-epoch by max_steps
        return last

    def _end_epoch(self, log: RunLogger, losses: list[float], seconds: float) -> None:
        cfg, p = self.cfg, self.progress
        p.epoch, p.epoch_step = p.epoch + 1, 0
        entries, extra = self.task.end_epoch(p.epoch, self.finished(), log)
        record = {"step": p.step, "epoch": p.epoch, "epoch_s": round(seconds, 3)}
        if losses:
            record["train_loss"] = sum(losses) / len(losses)
        log.log({**record, **entries})
        names = ["checkpoint-last.pth", *extra]
        if p.epoch % cfg["keep_every_epochs"] == 0 or p.epoch == cfg["epochs"]:
            names.append(f"checkpoint-epoch{p.epoch}.pth")
        self.save(*names)
