"""Pretrain a GPT-2- or Llama-style model with one optimizer and write a self-describing run record.

    python train.py optimizer=adamw model=gpt2_tiny data=kjv train.max_steps=300 seed=0
    python train.py experiment=bench_micro optimizer=muon hydra.run.dir=results/runs/mine

The loop is `train()`, top to bottom: batch, forward, backward, clip, schedule, step, evaluate, record,
checkpoint. What is settled before the first FLOP (config checks, run directory, data, model, parameter split,
optimizer) is harness/lifecycle/prepare.py; the records rank 0 writes, harness/lifecycle/recorder.py; the
loop's state and clocks, harness/loop/state.py (harness/__init__.py maps the rest).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from data.shards import DataError
from harness.config.preflight import preflight
from harness.config.schema import ConfigError, register_configs
from harness.config.search import with_user_dirs
from harness.lifecycle import checkpoint
from harness.lifecycle.checkpoint import CheckpointError
from harness.lifecycle.prepare import CompleteRun, PreparedRun, SetupError, prepare_run
from harness.lifecycle.recorder import Recorder, end_loss, run_summary
from harness.loop.schedule import lr_factor
from harness.loop.state import LoopState
from harness.probes.diagnostics import flat_for_wandb
from optimizers.external import eval_weights, step_closure
from optimizers.sharded import unshard
from runtime.device import autocast
from runtime.distributed import LaunchError, shutdown

register_configs()
STARTED = time.time()
# Fault injection for the resume tests (tests/test_resume.py): SIGKILL this process right after this step.
KILL_AT_STEP = int(os.environ.get("OPTBENCH_KILL_AT_STEP", "0"))


def train(run: PreparedRun, optimizer_choice: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    t, opt, device, diag = run.cfg.train, run.optimizer, run.device, run.diagnostics
    eval_model = torch.compile(run.model) if run.compile else run.model
    model = run.dist.wrap(eval_model)  # DDP over the processes of a multi-process run (FSDP: sharded already)
    recorder, state = Recorder(run, optimizer_choice, list(overrides)), LoopState(device)
    val = begin(run, state, recorder, eval_model)
    failure = None
    bar = tqdm(total=t.max_steps, initial=state.step, disable=not (t.progress and run.dist.is_rank0), mininterval=1.0,
               dynamic_ncols=True)
    state.train.resume()
    try:
        for step in range(state.step + 1, t.max_steps + 1):
            state.step, tokens = step, step * run.tokens_per_step
            lr_mult = lr_factor(step - 1, t.max_steps, run.cfg.schedule)  # step - 1 updates done before this one
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_mult
            loss = forward_backward(run, model, step)
            # clip_grad_norm_ returns the pre-clip global norm; max_norm=inf only measures it
            grad_norm = unshard(torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip or math.inf))
            if diag is not None and diag.due(step):  # snapshots and gradient noise, off the training clock
                with state.train.paused(), state.diagnostics.running():
                    diag.before_step(step)
            closure = step_closure(opt, lambda s=step: forward_backward(run, model, s))  # None: no member needs one
            with state.optimizer.running():  # optimizer.step() alone, closures included: docs/protocol.md's ratio
                if step == 1:
                    with FlopCounterMode(display=False) as counter:
                        opt.step(closure)
                    state.opt_flops = counter.get_total_flops()
                else:
                    opt.step(closure)
            run.model.after_optimizer_step()  # e.g. PC layers' power iteration on the updated weights
            opt.zero_grad(set_to_none=True)
            train_loss = run.dist.mean(loss).item()  # the global batch's mean loss
            failure = state.watch(train_loss, t.diverge_factor, t.diverge_patience)
            if step % t.log_every == 0 or step == t.max_steps or not math.isfinite(train_loss) or state.over:
                recorder.log({"step": step, "train_loss": train_loss, "lr": lr_mult * opt.param_groups[0]["peak_lr"],
                              "lr_factor": lr_mult, "grad_norm": grad_norm.item(), "tokens": tokens,
                              "train_time_s": state.train.read()})
            if failure:
                break
            if step in run.eval_steps:
                with state.train.paused():
                    val = evaluate(run, eval_model)
                    recorder.log({"step": step, "val_loss": val, "tokens": tokens, "train_time_s": state.train.seconds})
                    recorder.flush()
            if diag is not None and diag.due(step):  # update geometry and curvature, off the training clock
                with state.train.paused(), state.diagnostics.running():
                    recorder.to_wandb(flat_for_wandb(diag.after_step(step, tokens)), step)
            if (t.ckpt_every and step % t.ckpt_every == 0 and step < t.max_steps) or step in t.ckpt_steps:
                with state.train.paused():
                    save_checkpoint(run, state, recorder)
            if step == KILL_AT_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            bar.set_postfix_str(f"loss {train_loss:.3f} val {val:.3f} {tokens / state.train.read():,.0f} tok/s",
                                refresh=False)
            bar.update(1)
    except Exception as e:
        if t.on_crash == "raise":
            raise
        # train.on_crash=record (benchmarks): a run that crashes (e.g. a failed decomposition) is recorded as
        # failed and counts in the tuning budget instead of stopping the sweep (docs/protocol.md rule 6)
        traceback.print_exc()
        failure = f"error: {e.__class__.__name__}: {str(e)[:200]}"
    state.train.pause()
    bar.close()
    recorder.flush()
    return finish(run, state, recorder, failure)


def begin(run: PreparedRun, state: LoopState, recorder: Recorder, eval_model: torch.nn.Module) -> float:
    """The loop's starting point: a checkpoint's state (a resumed run, a new branch), or step 0 with its
    evaluation, whose loss sets the divergence threshold. Returns the latest validation loss (NaN: none yet)."""
    if run.resume is None:
        if 0 not in run.eval_steps:
            return math.nan
        val = evaluate(run, eval_model)
        recorder.log({"step": 0, "val_loss": val, "tokens": 0, "train_time_s": 0.0})
        state.blowup = run.cfg.train.diverge_factor * val
        return val
    path, payload = run.resume
    state.load_state_dict(payload["step"], payload["loop"])
    checkpoint.set_rng_state(payload["rng"])
    recorder.restore(payload)
    if run.dist.is_rank0 and run.branch_start:
        print(f"branched from {path} at step {state.step} (parent train.max_steps={run.branch['parent_max_steps']}, "
              f"this run's {run.cfg.train.max_steps})", flush=True)
    elif run.dist.is_rank0:
        print(f"resumed from {path} at step {state.step} ({len(recorder.resumes)} resume(s) so far)", flush=True)
    return math.nan


def forward_backward(run: PreparedRun, model: torch.nn.Module, step: int) -> torch.Tensor:
    """Gradients of the global batch of `step` (this rank's share, over its micro-batches); the mean loss."""
    t = run.cfg.train
    if run.input_hooks:  # layer inputs for this step's micro-batches, only when the optimizer asks
        run.input_hooks.begin_step(step - 1)
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(run.grad_accum):
        x, y = run.data.train_batch(step - 1, micro, t.micro_batch_size, run.grad_accum, run.dist.rank, run.dist.world)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with run.dist.no_sync(model, sync=micro == run.grad_accum - 1):  # DDP: all-reduce on the last
            with autocast(run.device, run.precision):
                _, loss = model(x, y)
            (loss / run.grad_accum).backward()
        loss_sum += loss.detach()
    if run.input_hooks:
        run.input_hooks.end_step()
    return loss_sum / run.grad_accum


@torch.no_grad()
def evaluate(run: PreparedRun, model: torch.nn.Module) -> float:
    """Mean cross-entropy over the fixed validation tokens (same tokens, same order, every run). With several
    DDP processes, rank r scores batches r, r + W, ... and the sums are all-reduced; under FSDP every rank
    runs every batch (its forwards gather parameters, so all ranks must run the same number)."""
    model.eval()
    total, count, split = 0.0, 0, run.dist.world > 1 and not run.dist.fsdp
    with eval_weights(run.optimizer):  # the optimizer's evaluation weights (Schedule-Free: its average x)
        for i, (x, y) in enumerate(run.data.val_batches(run.cfg.train.eval_batch_size)):
            if split and i % run.dist.world != run.dist.rank:
                continue
            x, y = x.to(run.device), y.to(run.device)
            with autocast(run.device, run.precision):
                _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    model.train()
    if split:
        sums = run.dist.sum(torch.tensor([total, count], dtype=torch.float64, device=run.device))
        total, count = sums.tolist()
    return total / count


def save_checkpoint(run: PreparedRun, state: LoopState, recorder: Recorder) -> None:
    checkpoint.save_run(run, state, recorder)  # rank 0's file; under FSDP every rank's shards (a collective)


def finish(run: PreparedRun, state: LoopState, recorder: Recorder, failure: str | None) -> dict:
    """The final weights, summary.json, the checkpoints' clean-up and the lock; rank 0 returns the summary."""
    t = run.cfg.train
    with eval_weights(run.optimizer):  # the final weights in eval mode (Schedule-Free: its average x)
        weights = checkpoint.whole_weights(run.model, run.dist) if t.save_final else None  # FSDP: a collective
        if run.dist.is_rank0 and t.save_final:
            tmp = run.run_dir / ".model_final.pt.tmp"
            torch.save({"model_config": dataclasses.asdict(run.cfg.model), "state_dict": weights}, tmp)
            tmp.replace(run.run_dir / "model_final.pt")
    if not run.dist.is_rank0:
        return {}
    summary = run_summary(run, state, recorder, failure)
    recorder.finish(summary)
    if not t.ckpt_keep_final:  # model_final.pt is the run's weights; train.ckpt_steps' are kept for branches
        checkpoint.remove_all(run.run_dir, pinned=t.ckpt_steps)
    run.lock.release(remove=True)
    status = f"DIVERGED at step {state.step}: {failure}" if failure else f"{state.step} steps"
    final = summary["final_val_loss"]
    print(f"done: {status}, final val loss {'none' if final is None else f'{final:.4f}'}, "
          f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, "
          f"MFU {summary['mfu_vs_measured_matmul'] or 0:.1%} of measured matmul rate, records in {run.run_dir}",
          flush=True)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> float | None:
    """The end-of-schedule validation loss (inf for a diverged run): what a Hydra sweeper (hydra/sweeper=optuna)
    minimizes; None on ranks other than 0."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run = prepare_run(dcfg, run_dir)
    except (ConfigError, DataError, SetupError, CheckpointError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        if run_dir.is_dir() and not any(run_dir.iterdir()) and run_dir.stat().st_mtime >= STARTED - 1:
            run_dir.rmdir()  # Hydra made it for this run (a user's own empty directory is older): leave none
        sys.exit(2)
    if isinstance(run, CompleteRun):
        print(f"skip: {run_dir} holds a complete run (final val loss {run.summary.get('final_val_loss')})", flush=True)
        return end_loss(run.summary)
    return end_loss(train(run, hydra_cfg.runtime.choices.get("optimizer"), tuple(hydra_cfg.overrides.task)))


if __name__ == "__main__":
    if problem := preflight(Path(__file__).parent / "conf", sys.argv[1:]):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = with_user_dirs(sys.argv[1:])  # OPTBENCH_CONFIG_PATH: on Hydra's search path and sys.path
    main()
    shutdown()  # multi-process runs: leave the process group together
