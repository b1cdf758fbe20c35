"""The training loop: one for every task.

Mixed precision, gradient clipping, schedules, early stopping, a wall-time limit,
atomic checkpoints with exact resume, non-finite loss detection, DDP and logging all
live here once; tasks only say what a batch's loss and a data set's metrics are.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepscope import __version__
from deepscope.config import save_yaml, to_dict
from deepscope.engine.checkpoint import (
    copy_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from deepscope.engine.distributed import DistInfo, all_reduce_max, barrier, init_distributed
from deepscope.engine.logging import RunLogger
from deepscope.engine.optim import build_optimizer, build_scheduler
from deepscope.engine.task import Task
from deepscope.errors import CheckpointError, DeepscopeError, TrainingError
from deepscope.models import count_parameters

CHECK_EVERY_STEPS = 20  # how often (in steps) losses are checked and progress is drawn


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: 'auto' is bf16 (or fp16 without bf16 support) on CUDA and off on CPU."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode in ("bf16", "fp16"):
        return torch.bfloat16 if mode == "bf16" else torch.float16
    raise DeepscopeError(f"unknown amp mode {mode!r}; choose auto, off, bf16 or fp16")


def first_nonfinite(values: torch.Tensor) -> int | None:
    """Index of the first NaN or infinite value, or None."""
    bad = (~torch.isfinite(values)).nonzero()
    return int(bad[0]) if len(bad) else None


def write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.replace(path)


class Trainer:
    """Runs ``task`` as configured by ``task.config``; ``resume`` continues from ``out/last.pt``."""

    def __init__(self, task: Task, resume: bool = False) -> None:
        self.task = task
        self.config = task.config
        self.resume = resume
        self.run_dir = Path(self.config.out)

    def fit(self) -> dict[str, Any]:
        dist, device = init_distributed(self.config.device)
        log = RunLogger(self.run_dir, dist.is_main)
        try:
            return self._fit(dist, device, log)
        finally:
            log.close()

    def _fit(self, dist: DistInfo, device: torch.device, log: RunLogger) -> dict[str, Any]:
        cfg, task = self.config, self.task
        t_start = time.time()
        deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        last_path, best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        state = self._resume_state(last_path) if self.resume else None
        seed_everything(cfg.seed)
        task.setup(device, dist)
        model = task.build_model()
        if state is not None:
            load_weights(model, state["model"], last_path)
        if dist.enabled and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch (CUDA only)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        n_params = count_parameters(model)
        if dist.is_main:
            save_yaml(cfg, self.run_dir / "config.yaml")
        log.info(f"{cfg.task}: model {cfg.model} with {n_params:,} parameters on {device} x{dist.world}")

        train, val = task.train_batches(), task.val_batches()
        steps = len(train)
        if steps == 0:
            raise DeepscopeError("no training batches: the training set is smaller than one batch")
        optimizer = build_optimizer(model, cfg.optim)
        scheduler, sched_when = build_scheduler(optimizer, cfg.optim, steps * cfg.epochs, cfg.monitor_mode)
        amp_dtype = resolve_amp(cfg.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        start_epoch, skip_steps, history, best = 0, 0, [], {"value": None, "epoch": None}
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            history, best = state["history"], state["best"]
            start_epoch = state["epoch"] + 1 if state["epoch_complete"] else state["epoch"]
            skip_steps = 0 if state["epoch_complete"] else state["step"]
            log.info(f"resuming from {last_path} at epoch {start_epoch + 1}, step {skip_steps}")

        def autocast() -> torch.autocast:
            return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model

        def checkpoint(epoch: int, step: int, complete: bool) -> dict[str, Any]:
            return {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "epoch": epoch,
                "step": step,
                "epoch_complete": complete,
                "history": history,
                "best": best,
                "config": to_dict(cfg),
                "task_state": task.inference_state(),
                "parameters": n_params,
                "version": __version__,
            }

        stop_reason = "completed"
        val_metrics: dict[str, Any] = {}
        for epoch in range(start_epoch, cfg.epochs):
            train.set_epoch(epoch)
            net.train()
            log.start_epoch(epoch, cfg.epochs, steps)
            losses = torch.zeros(steps, device=device)
            first = skip_steps if epoch == start_epoch else 0
            checked, seen, t_epoch, step = first, 0, time.time(), first - 1
            for step, batch in enumerate(train):
                if step < first:
                    continue  # resuming inside an epoch: the loader replays the same batches, skip those done
                if step == first and dist.is_main:
                    log.images("train/samples", task.display_images(batch), epoch)
                with autocast():
                    loss = task.loss(net, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if sched_when == "step":
                    scheduler.step()
                losses[step] = loss.detach().float()
                seen += len(batch[0])
                late = time.time() > deadline
                if step % CHECK_EVERY_STEPS and step != steps - 1 and not (late and not dist.enabled):
                    continue
                # losses are checked in windows so the GPU is not synchronised at every step
                bad = first_nonfinite(losses[checked : step + 1])
                nonfinite, late = all_reduce_max([float(bad is not None), float(late)], device)
                if nonfinite:
                    where = f"step {checked + bad + 1}" if bad is not None else f"step {step + 1} (on another process)"
                    kept = f"last good checkpoint: {last_path}" if last_path.exists() else "no checkpoint was written yet"
                    raise TrainingError(f"non-finite loss at epoch {epoch + 1}, {where}; training stopped, {kept}")
                checked = step + 1
                rate = seen * dist.world / max(1e-9, time.time() - t_epoch)
                log.update(step + 1, float(losses[first : step + 1].mean()), rate, self._metric_text(history))
                log.scalars({"loss_step": float(losses[step])}, epoch * steps + step, "train/")
                if late:
                    stop_reason = "max_minutes"
                    break
            log.end_epoch()
            complete = step == steps - 1
            ran = max(1, step + 1 - first)
            with autocast():
                val_metrics = task.evaluate(model, val) if val is not None else {}
            record = {
                "epoch": epoch + 1,
                "train_loss": float(losses[first : step + 1].sum()) / ran,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen * dist.world / max(1e-9, time.time() - t_epoch),
                "time_s": time.time() - t_start,
            }
            record.update({f"val_{k}": v for k, v in val_metrics.items() if isinstance(v, float)})
            history.append(record)
            if sched_when == "epoch" and val_metrics:
                scheduler.step(val_metrics[cfg.monitor])
            improved = self._improved(best, val_metrics.get(cfg.monitor))
            if improved:
                best = {"value": val_metrics.get(cfg.monitor), "epoch": epoch + 1}
            if dist.is_main:
                save_checkpoint(checkpoint(epoch, step + 1, complete), last_path)
                if improved:
                    copy_checkpoint(last_path, best_path)
            barrier()
            log.scalars(record, epoch + 1, "epoch/")
            log.info(self._epoch_line(record, cfg.epochs))
            if stop_reason != "completed":
                log.info(f"stopping: wall-time limit of {cfg.max_minutes} min reached")
                break
            if cfg.early_stopping and best["epoch"] is not None and epoch + 1 - best["epoch"] >= cfg.early_stopping:
                stop_reason = "early_stopping"
                log.info(f"stopping early: no improvement of {cfg.monitor} for {cfg.early_stopping} epochs")
                break

        if best_path.exists():
            load_weights(model, load_checkpoint(best_path)["model"], best_path)
        summary = {
            "task": cfg.task,
            "model": cfg.model,
            "parameters": n_params,
            "device": str(device),
            "processes": dist.world,
            "stopped": stop_reason,
            "epochs_completed": sum(1 for _ in history),
            "best_epoch": best["epoch"],
            f"best_val_{cfg.monitor}": best["value"],
            "train_time_s": time.time() - t_start,
            "val": val_metrics,
        }
        with autocast():
            summary.update(task.finish(model, self.run_dir, history, summary))
        summary["wall_time_s"] = time.time() - t_start
        summary["history"] = history
        if dist.is_main:
            write_json(self.run_dir / "metrics.json", summary)
            task.write_report(self.run_dir, history, summary)
            log.info(f"run written to {self.run_dir} (report.html, metrics.json, last.pt, best.pt)")
        return summary

    def _resume_state(self, last_path: Path) -> dict[str, Any]:
        if not last_path.exists():
            raise CheckpointError(f"{last_path}: nothing to resume, no checkpoint in {self.run_dir}")
        return load_checkpoint(last_path, task=self.config.task, model=self.config.model)

    def _improved(self, best: dict[str, Any], value: float | None) -> bool:
        if value is None:
            return True  # no validation data: the latest weights are the best we know
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
        parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:,.0f} img/s", f"{record['time_s']:.1f}s"]
        return "  ".join(parts)
