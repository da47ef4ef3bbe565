"""Pretrain a GPT-2- or Llama-style model with one optimizer and write a self-describing run record.

    python train.py optimizer=adamw model=gpt2_tiny data=kjv train.max_steps=300 seed=0
    python train.py experiment=bench_tiny hydra.run.dir=results/runs/mine

The loop is visible here top to bottom: batch, forward, backward, clip, schedule, step, evaluate, record.
Everything decided before the first FLOP (config checks, data, model, parameter split, optimizer) is in
harness/run.py; records and their atomic writes in harness/records.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import netrc
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from data.shards import DataError
from harness import checkpoint
from harness.checkpoint import CheckpointError
from harness.config import ConfigError, register_configs
from harness.diagnostics import flat_for_wandb
from harness.preflight import preflight
from harness.records import (
    MetricsLog,
    code_version,
    environment,
    summarize,
)
from harness.run import Run, SetupError, banner, divergence, optimizer_name, setup
from harness.schedule import lr_factor
from optimizers.sharded import full
from runtime.device import autocast, matmul_rates, synchronize
from runtime.distributed import LaunchError, shutdown
from runtime.files import atomic_write_json, atomic_write_text

register_configs()
STARTED = time.time()
# Fault injection for the resume tests (tests/test_resume.py): SIGKILL this process right after this step.
KILL_AT_STEP = int(os.environ.get("OPTBENCH_KILL_AT_STEP", "0"))


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module) -> float:
    """Mean cross-entropy over the fixed validation tokens (same tokens, same order, every run). With several
    DDP processes, rank r scores batches r, r + W, ... and the sums are all-reduced; under FSDP every rank
    runs every batch (its forwards gather parameters, so all ranks must run the same number)."""
    model.eval()
    total, count = 0.0, 0
    split = run.dist.world > 1 and not run.dist.fsdp
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


def init_wandb(run: Run, run_id: str | None = None):
    """W&B is optional: any failure (no network, bad key, not installed) leaves the local records intact.
    Runs are named so that W&B's UI groups them by benchmark (group), arm (job_type) and setting (name).
    A resumed run continues its W&B run (run_id from the checkpoint)."""
    if not run.cfg.wandb.enabled:
        return None
    try:
        import wandb

        w, b = run.cfg.wandb, run.cfg.bench
        mode = w.mode
        if mode == "auto":  # online only with credentials: never wait on a network that is not there
            mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"
        optimizer = HydraConfig.get().runtime.choices.get("optimizer")
        name = f"{b.arm}/{b.trial}/s{run.cfg.seed}" if b.arm else run.cfg.name
        tags = [*w.tags, *(t for t in (b.phase, optimizer) if t)]
        return wandb.init(project=w.project, entity=w.entity, mode=mode, group=w.group or b.name or run.cfg.experiment,
                          job_type=w.job_type or b.arm or optimizer, tags=tags, name=name, dir=str(run.run_dir),
                          config=run.resolved, id=run_id, resume="allow" if run_id else None,
                          settings=wandb.Settings(init_timeout=w.init_timeout))
    except Exception as e:  # noqa: BLE001 - a logging backend must never stop a run
        print(f"warning: W&B disabled for this run ({e.__class__.__name__}: {' '.join(str(e).split())[:300]}); "
              "local records only", file=sys.stderr)
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _netrc_has_wandb() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def state_bytes(opt) -> int:
    """Measured bytes of every tensor in the optimizer's state (protocol.md: state memory vs AdamW's)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def train(run: Run) -> dict:
    cfg, t, device, opt = run.cfg, run.cfg.train, run.device, run.optimizer
    raw_model, main = run.model, run.dist.main  # main: rank 0, the only one that writes records and logs
    fast = torch.compile(raw_model) if run.compile else raw_model  # evaluation runs on this one
    model = run.dist.wrap(fast)  # DDP over the processes of a multi-process run (FSDP: sharded in setup)
    # Measured dense-matmul rates of this device: the yardstick for model FLOPs utilisation (MFU) below.
    rates = matmul_rates(str(device), 512 if device.type == "cpu" else 4096) if main else {}
    env_extra = {"world_size": run.world_size, "precision": run.precision, "compile": run.compile,
                 "matmul_gflops": rates, "workload_hash": run.workload_hash,
                 "overrides": list(HydraConfig.get().overrides.task)}
    resumes = []
    if run.branch_start:  # a cooldown branch: a resume from the parent's checkpoint, into a new record
        resumes = list(run.resume[1].get("resumes", []))  # the parent's own resumes before the branch step
        env_extra["branch"] = run.branch
    elif run.resume is not None:  # continue from the checkpoint; env.json keeps the first launch's facts
        ckpt_path, state = run.resume
        resumes = [*state.get("resumes", []), checkpoint.resume_note(ckpt_path, state, code_version())]
        env_extra = {**_read_json(run.run_dir / "env.json"), "resumes": resumes}
        if resumes[-1]["code"] != resumes[-1]["checkpoint_code"]:
            print(f"warning: {ckpt_path} was written by code {resumes[-1]['checkpoint_code']}, resuming with "
                  f"{resumes[-1]['code']}: bit-exact continuation holds only for the same code", file=sys.stderr)
    if main:
        atomic_write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(run.resolved))
        own_resume = run.resume is not None and not run.branch_start
        atomic_write_json(run.run_dir / "env.json", env_extra if own_resume else environment(device, env_extra))
        print(banner(run), flush=True)
    wb = init_wandb(run, run.resume[1].get("wandb_id") if run.resume and not run.branch_start else None) if main else None
    log = MetricsLog(run.run_dir / "metrics.jsonl", write=main)

    def wb_log(values: dict, step: int) -> None:
        nonlocal wb
        if wb is not None:
            try:
                wb.log(values, step=step)
            except Exception as e:  # noqa: BLE001 - a logging backend must never stop a run
                print(f"warning: W&B logging failed ({e.__class__.__name__}: {' '.join(str(e).split())[:300]}); "
                      f"local records only from step {step}", file=sys.stderr)
                wb = None

    def record(entry: dict) -> None:
        log.log(entry)
        wb_log({k: v for k, v in entry.items() if k != "step"}, entry["step"])

    evals, diverged, val = set(run.eval_steps), None, math.nan
    # The loop's own state, all of it in the checkpoint: training / optimizer clocks, the optimizer's matmul
    # FLOPs (counted at step 1; decompositions are not counted), the divergence watch (a training loss above
    # `blowup` = diverge_factor x the initial loss for diverge_patience consecutive steps ends the run).
    loop = {"train_time": 0.0, "opt_time": 0.0, "opt_flops": 0, "blowup": math.inf, "over": 0, "diag_time": 0.0}
    diag = run.diagnostics  # harness/diagnostics.py, rank 0 only; None when diagnostics.every = 0
    start = 1
    if run.resume is not None:
        ckpt_path, state = run.resume
        start = state["step"] + 1
        loop.update(state["loop"])
        checkpoint.set_rng_state(state["rng"])
        for line in state["metrics"]:  # metrics.jsonl back to the checkpoint's prefix: no step twice
            log.log(json.loads(line))
        log.flush()
        if diag is not None:
            diag.truncate(state["step"])  # likewise diagnostics.jsonl
        if main and run.branch_start:
            print(f"branched from {ckpt_path} at step {state['step']} (parent train.max_steps="
                  f"{run.branch['parent_max_steps']}, this run's {t.max_steps})", flush=True)
        elif main:
            print(f"resumed from {ckpt_path} at step {state['step']} ({len(resumes)} resume(s) so far)", flush=True)
    elif 0 in evals:
        val = evaluate(run, fast)
        record({"step": 0, "val_loss": val, "tokens": 0, "train_time_s": 0.0})
        loop["blowup"] = t.diverge_factor * val

    def save_checkpoint(step: int) -> None:
        if not main:
            return
        log.flush()
        checkpoint.save(run.run_dir, step, {
            "workload_hash": run.workload_hash, "config": run.resolved, "code": code_version(),
            "model": raw_model.state_dict(), "optimizer": opt.state_dict(), "rng": checkpoint.rng_state(),
            "loop": dict(loop), "metrics": list(log.lines), "resumes": resumes,
            "wandb_id": getattr(wb, "id", None), "branch": run.branch}, keep=t.ckpt_keep, pinned=t.ckpt_steps)

    bar = tqdm(total=t.max_steps, initial=start - 1, disable=not (t.progress and main), mininterval=1.0, dynamic_ncols=True)
    step = start - 1
    try:
        for step in range(start, t.max_steps + 1):
            t0 = time.perf_counter()
            lr_mult = lr_factor(step - 1, t.max_steps, cfg.schedule)  # step is the number of updates after this one
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_mult
            if run.input_hooks:  # layer inputs for this step's micro-batches, only when the optimizer asks
                run.input_hooks.begin_step(step - 1)
            loss_sum = torch.zeros((), device=device)
            for micro in range(run.grad_accum):
                x, y = run.data.train_batch(step - 1, micro, t.micro_batch_size, run.grad_accum, run.dist.rank,
                                            run.dist.world)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with run.dist.no_sync(model, sync=micro == run.grad_accum - 1):  # DDP: all-reduce on the last
                    with autocast(device, run.precision):
                        _, loss = model(x, y)
                    (loss / run.grad_accum).backward()
                loss_sum += loss.detach()
            if run.input_hooks:
                run.input_hooks.end_step()
            # clip_grad_norm_ returns the pre-clip global norm; max_norm=inf only measures it
            grad_norm = full(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip or math.inf))
            synchronize(device)
            if diag is not None and diag.due(step):  # snapshots and gradient noise, off the training clock
                t_diag = time.perf_counter()
                diag.before_step(step)
                synchronize(device)
                t0 += time.perf_counter() - t_diag
                loop["diag_time"] += time.perf_counter() - t_diag
            t_opt = time.perf_counter()  # optimizer.step() alone, for the overhead ratio of protocol.md
            if step == 1:
                with FlopCounterMode(display=False) as counter:
                    opt.step()
                loop["opt_flops"] = counter.get_total_flops()
            else:
                opt.step()
            synchronize(device)
            loop["opt_time"] += time.perf_counter() - t_opt
            raw_model.after_optimizer_step()  # e.g. PC layers' power iteration on the updated weights
            opt.zero_grad(set_to_none=True)
            train_loss = run.dist.mean(loss_sum / run.grad_accum).item()  # the global batch's mean loss
            synchronize(device)
            loop["train_time"] += time.perf_counter() - t0

            tokens = step * run.tokens_per_step
            reason = divergence(loop, train_loss, t.diverge_factor, t.diverge_patience)
            if step % t.log_every == 0 or step == t.max_steps or not math.isfinite(train_loss) or loop["over"]:
                record({"step": step, "train_loss": train_loss, "lr": lr_mult * opt.param_groups[0]["peak_lr"],
                        "lr_factor": lr_mult, "grad_norm": grad_norm.item(), "tokens": tokens,
                        "train_time_s": loop["train_time"]})
            if reason:
                diverged = {"step": step, "reason": reason}
                break
            if step in evals:
                val = evaluate(run, fast)
                record({"step": step, "val_loss": val, "tokens": tokens, "train_time_s": loop["train_time"]})
                log.flush()
            if diag is not None and diag.due(step):  # update geometry and curvature, off the training clock
                t_diag = time.perf_counter()
                wb_log(flat_for_wandb(diag.after_step(step, tokens)), step)
                loop["diag_time"] += time.perf_counter() - t_diag
            if (t.ckpt_every and step % t.ckpt_every == 0 and step < t.max_steps) or step in t.ckpt_steps:
                save_checkpoint(step)  # outside the training clock, like evaluation (protocol.md)
            if step == KILL_AT_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            bar.set_postfix_str(f"loss {train_loss:.3f} val {val:.3f} {tokens / loop['train_time']:,.0f} tok/s",
                                refresh=False)
            bar.update(1)
    except Exception as e:
        # In a benchmark (train.skip_complete) a run that crashes (e.g. a failed decomposition) is recorded
        # as failed and counts in the tuning budget instead of stopping the sweep (protocol.md rule 6).
        if not t.skip_complete:
            raise
        traceback.print_exc()
        diverged = {"step": step, "reason": f"error: {e.__class__.__name__}: {str(e)[:200]}"}
    bar.close()
    log.flush()
    train_time, opt_time, opt_flops = loop["train_time"], loop["opt_time"], loop["opt_flops"]

    if run.dist.fsdp and t.save_final:  # a collective: every rank sends its shards, rank 0 keeps the whole
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        final_state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        final_state = raw_model.state_dict() if main else None
    if not main:
        return {}  # rank 0 writes the records
    fpt = raw_model.flops_per_token(t.seq_len)
    # Per step: the model's training FLOPs (6N + attention per token; PC layers' weight polynomials per
    # forward, x3 for forward + backward, per micro-batch) plus the optimizer's own matmuls (protocol.md).
    model_flops_step = run.tokens_per_step * fpt + 3 * run.grad_accum * raw_model.pc_flops_per_forward()
    flops_step = model_flops_step + opt_flops
    tokens_per_s = step * run.tokens_per_step / train_time if train_time > 0 else None
    summary = summarize(log.records, t.target_loss, run.tokens_per_step, flops_step / run.tokens_per_step)
    summary.update({
        "workload_hash": run.workload_hash, "diverged": diverged is not None,
        "diverged_at_step": diverged and diverged["step"], "diverged_reason": diverged and diverged["reason"],
        "steps": step, "tokens": step * run.tokens_per_step, "train_time_s": train_time,
        "optimizer_step_time_s": opt_time,  # included in train_time_s
        "optimizer_step_share": opt_time / train_time if train_time > 0 else None,
        "tokens_per_s": tokens_per_s, "n_params": raw_model.num_params(), "flops_per_token": fpt,
        "model_flops_per_step": model_flops_step, "optimizer_flops_per_step": opt_flops, "flops_per_step": flops_step,
        "optimizer_state_bytes": state_bytes(opt), "pc_level": cfg.model.pc_level, "bench": dataclasses.asdict(cfg.bench),
        # MFU against the *measured* matmul rate of this device in the run's precision (not a datasheet peak)
        "model_flops_per_s": tokens_per_s and tokens_per_s * fpt,
        "mfu_vs_measured_matmul": tokens_per_s and tokens_per_s * fpt / 1e9
        / rates["bfloat16" if run.precision == "bf16" else "float32"],
        "unigram_entropy_nats": run.data.unigram_entropy_nats, "world_size": run.world_size,
        "optimizer": HydraConfig.get().runtime.choices.get("optimizer"), "optimizer_class": optimizer_name(opt),
        "optimizer_target": run.resolved["optimizer"]["_target_"],
        # PolarGrad's lr_scale=muon_at_init: raw lr = lr x calibration, fixed on the first step
        "lr_calibration": next((g["lr_calibration"] for g in opt.param_groups if "lr_calibration" in g), None),
        "seed": cfg.seed, "data_seed": cfg.data.seed, "experiment": cfg.experiment,
        "resumes": resumes, "resumed_from_steps": [r["from_step"] for r in resumes],
        "branch": run.branch,  # a cooldown branch: {"from": parent run dir, "step", ...}; None for other runs
        # harness/diagnostics.py: seconds spent on diagnostics, outside train_time_s (0 when they are off)
        "diagnostics_time_s": loop.get("diag_time", 0.0), "diagnostics_every": cfg.diagnostics.every,
    })
    if t.save_final:
        tmp = run.run_dir / ".model_final.pt.tmp"
        torch.save({"model_config": dataclasses.asdict(cfg.model), "state_dict": final_state}, tmp)
        tmp.replace(run.run_dir / "model_final.pt")
    atomic_write_json(run.run_dir / "summary.json", summary)
    if not t.ckpt_keep_final:
        # the records are complete: model_final.pt is the run's weights (train.ckpt_steps' are kept for branches)
        checkpoint.remove_all(run.run_dir, pinned=t.ckpt_steps)
    if run.lock is not None:
        run.lock.release(remove=True)
    if wb is not None:
        wb.summary.update({k: v for k, v in summary.items() if v is not None})
        wb.finish()
    status = f"DIVERGED at step {diverged['step']}: {diverged['reason']}" if diverged else f"{step} steps"
    print(f"done: {status}, final val loss {summary['final_val_loss']}, {tokens_per_s or 0:,.0f} tokens/s, "
          f"MFU {summary['mfu_vs_measured_matmul'] or 0:.1%} of measured matmul rate, records in {run.run_dir}",
          flush=True)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run = setup(dcfg, run_dir)
    except (ConfigError, DataError, SetupError, CheckpointError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        if run_dir.is_dir() and not any(run_dir.iterdir()) and run_dir.stat().st_mtime >= STARTED - 1:
            run_dir.rmdir()  # Hydra made it for this run (a user's own empty directory is older): leave none
        sys.exit(2)
    if isinstance(run, dict):  # train.skip_complete and the record is already there
        print(f"skip: {run_dir} holds a complete run (final val loss {run.get('final_val_loss')})", flush=True)
        return
    train(run)


if __name__ == "__main__":
    problem = preflight(Path(__file__).parent / "conf", sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
    shutdown()  # multi-process runs: leave the process group together
