"""A small, exactly resumable training loop for aefast's models.

* Data order: epoch e visits the items in ``np.random.default_rng([seed, e]).permutation(n)``,
  a pure function of (seed, epoch), so a resumed run sees the same batches.
* Randomness inside the model (corruption noise, VAE sampling) comes from torch's global RNG,
  whose state is saved in every checkpoint and restored on resume.
* Checkpoints hold the model, the optimizer, the RNG state, epoch and step, the partial epoch
  loss and the run's configuration; they are written atomically (a temporary file in the same
  folder, then ``os.replace``), so an interrupted write never leaves a torn checkpoint.

A run resumed from any checkpoint ends with the same parameters, bit for bit on one machine, as
the run that was never interrupted (tests/test_cli.py checks it).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

CHECKPOINT_VERSION = 1


def progress_bar(iterable=None, *, desc=None, total=None, disable=False, leave=False):
    """tqdm on stderr (a no-op wrapper when disabled), so that stdout stays the results."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then os.replace: atomic on POSIX."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors all mean the same thing to the user
        raise CheckpointError(f"{path!r} is not a readable aefast checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("aefast_checkpoint") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path!r} is not an aefast checkpoint (version {CHECKPOINT_VERSION})")
    return state


@dataclass
class FitResult:
    history: list = field(default_factory=list)   # mean training loss per completed epoch
    step_losses: list = field(default_factory=list)  # the loss of every optimizer step
    steps: int = 0                                  # optimizer steps taken in total
    finished: bool = True                           # False when stopped early by max_steps


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def fit(model, inputs: torch.Tensor, targets: torch.Tensor | None = None, *, epochs: int = 5, batch_size: int = 64,
        lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, device="cpu", checkpoint: str | None = None,
        resume: bool = False, checkpoint_every: int = 0, max_steps: int | None = None, progress: bool = True,
        desc: str = "train", config: dict | None = None) -> FitResult:
    """Trains ``model`` with Adam on ``model.training_loss(batch[, target_batch])``.

    ``checkpoint``: path written at the end of every epoch, every ``checkpoint_every`` steps (if > 0)
    and when ``max_steps`` stops the run early. ``resume``: continue from that checkpoint, which must
    come from a run with the same ``config`` (data set, model, batch size, lr, seed, ...).
    """
    n = len(inputs)
    if n == 0:
        raise ValueError("aefast: no training data")
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    run_config = dict(config or {}, n=n, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)
    result = FitResult()
    start_epoch, start_step, partial = 0, 0, 0.0
    if resume:
        if checkpoint is None:
            raise ValueError("aefast: --resume needs a checkpoint path")
        state = load_checkpoint(checkpoint)
        if state["config"] != run_config:
            diff = {k: (state["config"].get(k), v) for k, v in run_config.items() if state["config"].get(k) != v}
            raise CheckpointError(f"checkpoint {checkpoint!r} is from a different run; differing settings "
                                  f"(checkpoint, now): {diff}")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {checkpoint!r} does not fit this model: {exc}") from None
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, start_step, partial = state["epoch"], state["step_in_epoch"], state["partial_loss"]
        result.history, result.steps = list(state["history"]), state["steps"]
        result.step_losses = list(state["step_losses"])
    else:
        torch.manual_seed(seed)

    def snapshot(epoch, step_in_epoch, partial_loss):
        if checkpoint is None:
            return
        save_checkpoint(checkpoint, {
            "aefast_checkpoint": CHECKPOINT_VERSION, "config": run_config, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
            "step_in_epoch": step_in_epoch, "partial_loss": partial_loss, "history": list(result.history),
            "step_losses": list(result.step_losses), "steps": result.steps, "finished": epoch >= epochs,
        })

    model.train()
    for epoch in range(start_epoch, epochs):
        order = epoch_order(n, seed, epoch)
        first = start_step if epoch == start_epoch else 0
        total = partial if epoch == start_epoch else 0.0
        bar = progress_bar(range(first, steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                           total=steps_per_epoch, disable=not progress)
        if first:
            bar.update(first)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb = inputs[idx].to(device)
            loss = model.training_loss(xb) if targets is None else model.training_loss(xb, targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.steps += 1
            result.step_losses.append(float(loss.detach()))
            total += result.step_losses[-1] * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
            done_in_epoch = step + 1
            last_step = done_in_epoch == steps_per_epoch and epoch == epochs - 1
            if max_steps is not None and result.steps >= max_steps and not last_step:
                # Stopped early (as by an interruption): checkpoint exactly where we are.
                if done_in_epoch == steps_per_epoch:
                    result.history.append(total / n)
                    snapshot(epoch + 1, 0, 0.0)
                else:
                    snapshot(epoch, done_in_epoch, total)
                bar.close()
                result.finished = False
                return result
            if checkpoint_every and result.steps % checkpoint_every == 0 and done_in_epoch < steps_per_epoch:
                snapshot(epoch, done_in_epoch, total)
        bar.close()
        result.history.append(total / n)
        snapshot(epoch + 1, 0, 0.0)
    model.eval()
    return result


@torch.no_grad()
def batched(fn, inputs: torch.Tensor, batch_size: int = 256, device="cpu"):
    """Applies ``fn`` to ``inputs`` in batches (no grad) and concatenates the results on the CPU."""
    outs = [fn(inputs[i:i + batch_size].to(device)) for i in range(0, len(inputs), batch_size)]
    if isinstance(outs[0], tuple):
        return type(outs[0])(*(torch.cat([o[j] for o in outs]).cpu() for j in range(len(outs[0]))))
    return torch.cat(outs).cpu()
