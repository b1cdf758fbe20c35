"""The training loop: one for every task.

Mixed precision, gradient clipping, schedules, early stopping, a wall-time limit,
atomic checkpoints with exact resume, non-finite loss detection, DDP and logging all
live here once; tasks only say what a batch's loss and a data set's metrics are.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepscope import __version__
from deepscope.atomic import atomic_write, leftovers
from deepscope.config import save_yaml, to_dict
from deepscope.engine.checkpoint import (
    copy_checkpoint,
    load_checkpoint,
    load_init_weights,
    load_weights,
    random_state_kept,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from deepscope.engine.distributed import DistInfo, all_reduce_max, barrier, init_distributed
from deepscope.engine.ema import WeightAverage
from deepscope.engine.logging import RunLogger, per_second
from deepscope.engine.optim import build_optimizer, build_scheduler
from deepscope.engine.plan import Plan, Schedule, budget_of, fit_schedule, refit_epochs
from deepscope.engine.precision import Precision, resolve_precision
from deepscope.engine.probe import seconds_per_step
from deepscope.engine.stream import EpochBatches
from deepscope.engine.task import Batches, Task
from deepscope.errors import DeepscopeError, TrainingError
from deepscope.models import count_parameters

CHECK_EVERY_STEPS = 20  # how often (in steps) losses are checked and progress is drawn
PROBE_STEPS = 8  # training steps timed to plan the schedule (the first is warm-up)
PROBE_VAL_BATCHES = 2  # validation batches timed; the whole validation is estimated from them
KEEPS = ("best", "last")  # what best.pt holds (TrainConfig.keep)


def first_nonfinite(values: torch.Tensor) -> int | None:
    """Index of the first NaN or infinite value, or None."""
    bad = (~torch.isfinite(values)).nonzero()
    return int(bad[0]) if len(bad) else None


def write_json(path: Path, values: dict[str, Any]) -> None:
    text = json.dumps(values, indent=2).encode()
    atomic_write(path, lambda handle: handle.write(text), "metrics file")


@dataclass
class Run:
    """Everything one training run carries between epochs (and into its checkpoints)."""

    train: Batches
    val: Batches | None
    model: nn.Module
    net: nn.Module  # the model, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sched_when: str
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    dist: DistInfo
    parameters: int
    steps: int
    epochs: int
    t_start: float
    deadline: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"value": None, "epoch": None})
    val_metrics: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = "completed"
    ema: WeightAverage | None = None  # the moving average of the weights, when cfg.ema asks for one

    def weights(self) -> nn.Module:
        """The weights to validate, save as "model" and predict with: the moving average where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def autocast(self) -> torch.autocast:
        return self.precision.autocast(self.device)


class Trainer:
    """Runs ``task`` as configured by ``task.config``; ``resume`` continues from ``out/last.pt``."""

    def __init__(self, task: Task, resume: bool = False) -> None:
        self.task = task
        self.config = task.config
        self.resume = resume
        if not self.config.out:
            named = [self.config.task, self.config.model]  # a model the plan will choose is not named yet
            self.config.out = f"runs/{'-'.join(filter(None, named))}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(self.config.out)
        self.last_path = self.run_dir / "last.pt"
        self.best_path = self.run_dir / "best.pt"
        # epochs the engine planned for a budget: (as first planned, the time the training should end by)
        self.refit: tuple[int, float] | None = None

    def fit(self) -> dict[str, Any]:
        dist, device = init_distributed(self.config.device)
        self.log = RunLogger(self.run_dir, dist.is_main)
        try:
            run, start_epoch, skip_steps = self._start(dist, device)
            epoch, trained_s = start_epoch, 0.0
            while epoch < run.epochs:
                started = time.time()
                if not self._epoch(run, epoch, skip_steps if epoch == start_epoch else 0):
                    break
                epoch, trained_s = epoch + 1, trained_s + time.time() - started
                self._refit(run, epoch, trained_s / (epoch - start_epoch))
            return self._finish(run)
        except BaseException as exc:
            self.log.fail(str(exc) or type(exc).__name__)
            raise
        finally:
            self.log.close()

    def _start(self, dist: DistInfo, device: torch.device) -> tuple[Run, int, int]:
        """Read data, build model and optimizer, and restore them from ``last.pt`` when resuming."""
        cfg, task = self.config, self.task
        t_start = time.time()
        if not self.resume and self.last_path.exists():
            raise DeepscopeError(
                f"{self.run_dir}: already holds a run (last.pt); pass --resume to continue it or choose another --out"
            )
        state = self._resume_state() if self.resume else None
        if self.resume and dist.is_main:
            for partial in leftovers(self.run_dir):  # half written by the run that was killed
                partial.unlink(missing_ok=True)
        model, train, val, precision = self._build(device, dist, state, t_start)
        if state is not None and state.get("plan"):
            task.plan = Plan(**state["plan"])  # what the run planned when it started
        if cfg.steps_per_epoch and cfg.steps_per_epoch != len(train):
            train = EpochBatches(train, cfg.steps_per_epoch)
        if dist.is_main:
            save_yaml(cfg, self.run_dir / "config.yaml", header=task.plan.reasons)
        assert cfg.epochs is not None  # _build planned it or refused a run without it
        steps = len(train)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler, sched_when = build_scheduler(optimizer, cfg.optim, steps * cfg.epochs, cfg.monitor_mode)
        net = (
            DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=task.find_unused_parameters,
            )
            if dist.enabled
            else model
        )
        run = Run(
            train=train,
            val=val,
            model=model,
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            sched_when=sched_when,
            scaler=torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16),
            precision=precision,
            device=device,
            dist=dist,
            parameters=count_parameters(model),
            steps=steps,
            epochs=cfg.epochs,
            t_start=t_start,
            deadline=t_start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf,
            ema=WeightAverage(model, cfg.ema, steps * cfg.epochs) if cfg.ema else None,
        )
        self.log.info(f"{cfg.task}: model {cfg.model} with {run.parameters:,} parameters on {device} x{dist.world}")
        for note in task.notes:
            self.log.info(note)
        for line in task.plan.reasons:
            self.log.info(f"plan: {line}")
        self.log.info(f"precision: {precision.name} ({precision.reason})")
        if precision.warning:
            self.log.info(f"warning: {precision.warning}")
        if state is None:
            if self.resume:
                self.log.info(
                    f"resuming: {self.run_dir} holds no checkpoint yet (the run stopped in its first epoch); starting from the beginning"
                )
            return run, 0, 0
        if run.ema is not None and "train_model" in state:
            run.ema.restore(state["model"], state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        run.history, run.best, run.val_metrics = state["history"], state["best"], state.get("val_metrics", {})
        start_epoch = state["epoch"] + 1 if state["epoch_complete"] else state["epoch"]
        skip_steps = 0 if state["epoch_complete"] else state["step"]
        self.log.info(f"resuming from {self.last_path} at epoch {start_epoch + 1}, step {skip_steps}")
        return run, start_epoch, skip_steps

    def plan(self) -> Plan:
        """The plan alone: the data read, the settings left open chosen and the steps timed; nothing trained or
        written (``deepscope plan``, ``train --plan-only``)."""
        dist, device = init_distributed(self.config.device)
        self.log = RunLogger(None, dist.is_main)
        try:
            self._build(device, dist, None, time.time())
            return self.task.plan
        finally:
            self.log.close()

    def _build(
        self, device: torch.device, dist: DistInfo, state: dict[str, Any] | None, t_start: float
    ) -> tuple[nn.Module, Batches, Batches | None, Precision]:
        """Data, model and batches; for a new run, the epochs and steps planned for the budget where left open."""
        cfg, task = self.config, self.task
        precision = resolve_precision(cfg.amp, device)  # a bad mode fails before any data is read
        seed_everything(cfg.seed)
        task.setup(device, dist)
        if cfg.keep not in KEEPS:  # checked after setup: a task may plan it
            raise DeepscopeError(f"keep must be {' or '.join(KEEPS)}, got {cfg.keep!r}")
        model = task.build_model()
        if cfg.init_from:  # also when resuming: it decides which tensors stay frozen
            note = load_init_weights(model, cfg.init_from, freeze=cfg.freeze_encoder)
            if state is None:
                task.notes.append(note)
        elif cfg.freeze_encoder:
            raise DeepscopeError("--freeze-encoder needs --init-from FILE, the weights to freeze")
        if state is not None:
            load_weights(model, state.get("train_model", state["model"]), self.last_path)
        if dist.enabled and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch (CUDA only)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        train = task.train_batches()
        if len(train) == 0:
            raise DeepscopeError("no training batches: the training set is smaller than one batch")
        val = task.val_batches()
        if state is None and self._needs_schedule():
            schedule = self._plan_schedule(model, train, val, precision, device, t_start)
            if cfg.epochs is None:
                self.refit = (schedule.epochs, time.time() + schedule.seconds)
            cfg.epochs, cfg.steps_per_epoch = schedule.epochs, schedule.steps_per_epoch
        if cfg.epochs is None:
            raise DeepscopeError(f"{self.run_dir}: the run's settings name no number of epochs")
        task.schedule((cfg.steps_per_epoch or len(train)) * cfg.epochs)
        return model, train, val, precision

    def _needs_schedule(self) -> bool:
        """Whether the engine plans epochs or steps per epoch: one is open, and the task does not plan them itself
        (steps per epoch are planned only against a budget the user gave; without one, an epoch is one pass)."""
        cfg = self.config
        if self.task.plans_schedule:
            return False
        return cfg.epochs is None or (cfg.steps_per_epoch is None and cfg.max_minutes is not None)

    def _plan_schedule(
        self,
        model: nn.Module,
        train: Batches,
        val: Batches | None,
        precision: Precision,
        device: torch.device,
        t_start: float,
    ) -> Schedule:
        """Epochs and steps per epoch for the budget, from training steps and validation batches timed on a copy of
        the model (so the run's weights, and with the random state restored its randomness, are as unplanned)."""
        cfg, task = self.config, self.task
        budget = budget_of(cfg, task.default_budget_minutes)
        task.plan.observe(f"budget: {budget.describe()} on {device} in {precision.name}", budget_minutes=budget.minutes)
        with random_state_kept():
            probe = copy.deepcopy(model)
            first = EpochBatches(train, PROBE_STEPS)  # the first steps of the run, over passes when one is shorter
            step_s = seconds_per_step(probe, first, task.loss, precision, device)
            val_s = 0.0
            if val is not None and len(val):
                count = max(1, -int(all_reduce_max([-min(PROBE_VAL_BATCHES, len(val))], device)[0]))
                started = time.perf_counter()
                with precision.autocast(device), torch.no_grad():
                    task.evaluate(probe, itertools.islice(val, count))
                val_s = (time.perf_counter() - started) * len(val) / count
            started = time.perf_counter()
            torch.save({"model": probe.state_dict(), "optimizer": probe.state_dict()}, io.BytesIO())
            val_s += (
                time.perf_counter() - started
            )  # an epoch's checkpoint: the weights and about as much optimizer state
            del probe
        step_s, val_s = all_reduce_max([step_s, val_s], device)  # every process plans the same schedule
        task.plan.observe(
            f"timing: {step_s:.3f} s per training step, {val_s:.1f} s per validation and checkpoint (measured)",
            step_s=step_s,
            validation_s=val_s,
        )
        return fit_schedule(
            task.plan,
            budget=budget,
            spent_s=time.time() - t_start,
            step_s=step_s,
            val_s=val_s,
            pass_steps=len(train),
            epochs=cfg.epochs,
            steps_per_epoch=cfg.steps_per_epoch,
        )

    def _epoch(self, run: Run, epoch: int, first: int) -> bool:
        """Train one epoch (from step ``first``), validate, checkpoint; False when training must stop."""
        cfg, task, log = self.config, self.task, self.log
        run.train.set_epoch(epoch)
        run.net.train()
        log.start_epoch(epoch, run.epochs, run.steps)
        losses = torch.zeros(run.steps, device=run.device)
        checked, seen, t_epoch, step = first, 0, time.time(), first - 1
        for step, batch in enumerate(run.train):
            if step < first:
                continue  # resuming inside an epoch: the loader replays the same batches, skip those done
            if step == first and run.dist.is_main:
                log.images("train/samples", task.display_images(batch), epoch)
            losses[step] = self._step(run, batch)
            log.advance(step + 1)
            seen += len(batch[0])
            late: float = time.time() > run.deadline  # a flag, then the largest over the processes (0.0 or 1.0)
            if step % CHECK_EVERY_STEPS and step != run.steps - 1 and not (late and not run.dist.enabled):
                continue
            # losses are checked in windows so the GPU is not synchronised at every step
            bad = first_nonfinite(losses[checked : step + 1])
            nonfinite, late = all_reduce_max([float(bad is not None), float(late)], run.device)
            if nonfinite:
                where = f"step {checked + bad + 1}" if bad is not None else f"step {step + 1} (on another process)"
                kept = (
                    f"last good checkpoint: {self.last_path}"
                    if self.last_path.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingError(f"non-finite loss at epoch {epoch + 1}, {where}; training stopped, {kept}")
            checked = step + 1
            rate = seen * run.dist.world / max(1e-9, time.time() - t_epoch)
            log.update(step + 1, float(losses[first : step + 1].mean()), rate, self._metric_text(run.history))
            log.scalars({"loss_step": float(losses[step])}, epoch * run.steps + step, "train/")
            if late:
                run.stop_reason = "max_minutes"
                break
        log.end_epoch()
        with run.autocast():
            run.val_metrics = task.evaluate(run.weights(), run.val) if run.val is not None else {}
        record = {
            "epoch": epoch + 1,
            "train_loss": float(losses[first : step + 1].sum()) / max(1, step + 1 - first),
            "lr": run.optimizer.param_groups[0]["lr"],
            "images_per_s": seen * run.dist.world / max(1e-9, time.time() - t_epoch),
            "time_s": time.time() - run.t_start,
        }
        record.update({f"val_{k}": v for k, v in run.val_metrics.items() if isinstance(v, float)})
        run.history.append(record)
        if run.sched_when == "epoch" and run.val_metrics:
            run.scheduler.step(run.val_metrics[cfg.monitor])
        self._save(run, epoch, step + 1, complete=step == run.steps - 1)
        log.scalars(record, epoch + 1, "epoch/")
        log.info(self._epoch_line(record, run.epochs))
        log.epoch_done(epoch + 1, run.history)
        if run.stop_reason == "max_minutes":
            log.info(f"stopping: wall-time limit of {cfg.max_minutes} min reached")
            return False
        if cfg.early_stopping and run.best["epoch"] is not None and epoch + 1 - run.best["epoch"] >= cfg.early_stopping:
            run.stop_reason = "early_stopping"
            log.info(f"stopping early: no improvement of {cfg.monitor} for {cfg.early_stopping} epochs")
            return False
        return True

    def _refit(self, run: Run, done: int, epoch_s: float) -> None:
        """Re-fit the epochs the engine planned to the time planned for them, from the epochs trained (``done``, in
        ``epoch_s`` seconds each on average: single epochs' times vary by a tenth with mosaics drawn or not), as
        ultralytics re-plans its epochs to ``time=`` after each epoch.
        The plan timed a few cold steps, where a run's steps get faster as its shapes' kernels are cached and slower
        when the machine is shared: Penn-Fudan's planned steps took 0.198 s in the probe and 0.153 s by the third
        epoch, which would leave a fifth of the budget unused. The learning-rate schedule is rebuilt for the new
        length at the step it stands at, the task told (detection's last steps without mosaic), and config.yaml
        rewritten so that a resumed run keeps the new length."""
        if self.refit is None or done >= run.epochs:
            return
        planned, finish_by = self.refit
        epochs = refit_epochs(planned, run.epochs, done, epoch_s, finish_by - time.time())
        epochs = -int(all_reduce_max([-float(epochs)], run.device)[0])  # the fewest of the processes', so all agree
        if epochs == run.epochs:
            return
        cfg, task = self.config, self.task
        before, run.epochs, cfg.epochs = run.epochs, epochs, epochs
        total = run.steps * epochs
        if run.sched_when == "step":
            run.scheduler, _ = build_scheduler(run.optimizer, cfg.optim, total, cfg.monitor_mode)
            run.scheduler.last_epoch = done * run.steps - 1
            run.scheduler.step()  # the rate of the step the run stands at, on the new schedule
        task.schedule(total)
        why = (
            f"re-fitted after epoch {done} (epochs took {epoch_s:.1f} s on average) to the "
            f"{max(0.0, finish_by - time.time()) / 60:.1f} min left of the planned training time; {before} before"
        )
        task.plan.revise("epochs", epochs, why)
        self.log.info(f"plan: epochs = {epochs}: {why}")
        if run.dist.is_main:
            save_yaml(cfg, self.run_dir / "config.yaml", header=task.plan.reasons)

    def _step(self, run: Run, batch: Any) -> torch.Tensor:
        """One optimizer step; returns the batch loss (still on the device)."""
        with run.autocast():
            loss = self.task.loss(run.net, batch)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if self.config.optim.grad_clip:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), self.config.optim.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(run.model)
        if run.sched_when == "step":
            run.scheduler.step()
        return loss.detach().float()

    def _save(self, run: Run, epoch: int, step: int, complete: bool) -> None:
        """Write ``last.pt`` (and ``best.pt`` when the monitored metric improved) from rank 0.

        ``best.pt`` is written before ``last.pt``: a run killed between the two resumes from the previous ``last.pt``
        and trains the epoch again, which improves again and rewrites ``best.pt`` identically. The other order would
        leave a ``last.pt`` whose record names an epoch as best that ``best.pt`` never received."""
        value = run.val_metrics.get(self.config.monitor)
        improved = self._improved(run.best, value)
        if improved:
            run.best = {"value": value, "epoch": epoch + 1}
        if run.dist.is_main:
            state = {
                "model": run.weights().state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
                "scaler": run.scaler.state_dict(),
                "rng": rng_state(),
                "epoch": epoch,
                "step": step,
                "epoch_complete": complete,
                "history": run.history,
                "best": run.best,
                "val_metrics": run.val_metrics,
                "config": to_dict(self.config),
                "task_state": self.task.inference_state(),
                "plan": self.task.plan.as_dict(),
                "parameters": run.parameters,
                "version": __version__,
            }
            if (
                run.ema is not None
            ):  # "model" holds the average, what evaluate and predict load; training goes on from these
                state.update(train_model=run.model.state_dict(), ema_updates=run.ema.updates)
            if improved:
                save_checkpoint(state, self.best_path)
                copy_checkpoint(self.best_path, self.last_path)
            else:
                save_checkpoint(state, self.last_path)
        barrier()

    def _finish(self, run: Run) -> dict[str, Any]:
        """Load the best weights, let the task score them (test set) and write metrics and report."""
        cfg = self.config
        if self.best_path.exists():
            load_weights(run.model, load_checkpoint(self.best_path)["model"], self.best_path)
        summary = {
            "task": cfg.task,
            "model": cfg.model,
            "parameters": run.parameters,
            "device": str(run.device),
            "processes": run.dist.world,
            "precision": run.precision.summary(),
            "stopped": run.stop_reason,
            "epochs_completed": len(run.history),
            "best_epoch": run.best["epoch"],
            f"best_val_{cfg.monitor}": run.best["value"],
            "train_time_s": time.time() - run.t_start,
            "val": run.val_metrics,
            "plan": self.task.plan.as_dict(),
        }
        with run.autocast():
            summary.update(self.task.finish(run.model, self.run_dir, run.history, summary))
        summary["wall_time_s"] = time.time() - run.t_start
        summary["history"] = run.history
        if run.dist.is_main:
            write_json(self.run_dir / "metrics.json", summary)
            self.task.write_report(self.run_dir, run.history, summary)
            self.log.info(f"run written to {self.run_dir} (report.html, metrics.json, last.pt, best.pt)")
        self.log.finish(run.stop_reason)
        return summary

    def _resume_state(self) -> dict[str, Any] | None:
        """The state in ``last.pt``; None when the run was stopped before it wrote one (it starts again)."""
        if not self.last_path.exists():
            return None
        return load_checkpoint(self.last_path, task=self.config.task, model=self.config.model)

    def _improved(self, best: dict[str, Any], value: float | None) -> bool:
        if value is None or self.config.keep == "last":
            return True  # no validation data, or the last epoch kept: the latest weights are the ones to keep
        if best["value"] is None:
            return True
        return value > best["value"] if self.config.monitor_mode == "max" else value < best["value"]

    def _metric_text(self, history: list[dict[str, Any]]) -> str:
        key = f"val_{self.config.monitor}"
        return f"{key} {history[-1][key]:.4f}" if history and key in history[-1] else ""

    def _epoch_line(self, record: dict[str, Any], epochs: int) -> str:
        parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
        shown = ("val_loss", f"val_{self.config.monitor}")
        parts += [f"{k} {record[k]:.4f}" for k in dict.fromkeys(shown) if k in record]
        parts += [f"lr {record['lr']:.3g}", f"{per_second(record['images_per_s'])} img/s", f"{record['time_s']:.1f}s"]
        return "  ".join(parts)
