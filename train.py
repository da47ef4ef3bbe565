"""Pretrain a GPT-2- or Llama-style model with one optimizer and write a self-describing run record.

    python train.py optimizer=adamw model=gpt2_tiny data=kjv train.max_steps=300 seed=0
    python train.py experiment=bench_tiny hydra.run.dir=results/runs/mine

The loop is visible here top to bottom: batch, forward, backward, clip, schedule, step, evaluate, record.
Everything decided before the first FLOP (config checks, data, model, parameter split, optimizer) is in
harness/run.py; records and their atomic writes in harness/records.py.
"""

from __future__ import annotations

import dataclasses
import math
import netrc
import os
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
from harness.config import ConfigError, register_configs
from harness.device import autocast, matmul_rates, synchronize
from harness.records import MetricsLog, atomic_write_json, atomic_write_text, environment, summarize
from harness.run import Run, SetupError, banner, optimizer_name, setup
from harness.schedule import lr_factor

register_configs()


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module) -> float:
    """Mean cross-entropy over the fixed validation tokens (same tokens, same order, every run)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in run.data.val_batches(run.cfg.train.eval_batch_size):
        x, y = x.to(run.device), y.to(run.device)
        with autocast(run.device, run.precision):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


def init_wandb(run: Run):
    """W&B is optional: any failure (no network, bad key, not installed) leaves the local records intact.
    Runs are named so that W&B's UI groups them by benchmark (group), arm (job_type) and setting (name)."""
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
                          config=run.resolved)
    except Exception as e:  # noqa: BLE001 - a logging backend must never stop a run
        print(f"warning: W&B disabled for this run ({e.__class__.__name__}: {e}); local records only",
              file=sys.stderr)
        return None


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
    raw_model = run.model
    model = torch.compile(raw_model) if run.compile else raw_model
    # Measured dense-matmul rates of this device: the yardstick for model FLOPs utilisation (MFU) below.
    rates = matmul_rates(str(device), 512 if device.type == "cpu" else 4096)
    atomic_write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(run.resolved))
    atomic_write_json(run.run_dir / "env.json", environment(device, {
        "world_size": run.world_size, "precision": run.precision, "compile": run.compile,
        "matmul_gflops": rates, "workload_hash": run.workload_hash,
        "overrides": list(HydraConfig.get().overrides.task)}))
    print(banner(run), flush=True)
    wb = init_wandb(run)
    log = MetricsLog(run.run_dir / "metrics.jsonl")

    def record(entry: dict) -> None:
        log.log(entry)
        if wb is not None:
            wb.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    evals, train_time, opt_time, diverged, val = set(run.eval_steps), 0.0, 0.0, None, math.nan
    opt_flops = 0  # matmul FLOPs of one optimizer.step(), counted at step 1 (decompositions are not counted)
    blowup = math.inf  # a training loss above this counts as diverged (diverge_factor x the step-0 val loss)
    if 0 in evals:
        val = evaluate(run, model)
        record({"step": 0, "val_loss": val, "tokens": 0, "train_time_s": 0.0})
        blowup = t.diverge_factor * val
    bar = tqdm(total=t.max_steps, disable=not t.progress, mininterval=1.0, dynamic_ncols=True)
    step = 0
    try:
        for step in range(1, t.max_steps + 1):
            t0 = time.perf_counter()
            lr_mult = lr_factor(step - 1, t.max_steps, cfg.schedule)  # step is the number of updates after this one
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_mult
            if run.input_hooks:  # layer inputs for this step's micro-batches, only when the optimizer asks
                run.input_hooks.begin_step(step - 1)
            loss_sum = torch.zeros((), device=device)
            for micro in range(run.grad_accum):
                x, y = run.data.train_batch(step - 1, micro, t.micro_batch_size, run.grad_accum)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, run.precision):
                    _, loss = model(x, y)
                (loss / run.grad_accum).backward()
                loss_sum += loss.detach()
            if run.input_hooks:
                run.input_hooks.end_step()
            # clip_grad_norm_ returns the pre-clip global norm; max_norm=inf only measures it
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip or math.inf)
            synchronize(device)
            t_opt = time.perf_counter()  # optimizer.step() alone, for the overhead ratio of protocol.md
            if step == 1:
                with FlopCounterMode(display=False) as counter:
                    opt.step()
                opt_flops = counter.get_total_flops()
            else:
                opt.step()
            synchronize(device)
            opt_time += time.perf_counter() - t_opt
            raw_model.after_optimizer_step()  # e.g. PC layers' power iteration on the updated weights
            opt.zero_grad(set_to_none=True)
            train_loss = (loss_sum / run.grad_accum).item()
            synchronize(device)
            train_time += time.perf_counter() - t0

            tokens = step * run.tokens_per_step
            if step % t.log_every == 0 or step == t.max_steps or not math.isfinite(train_loss):
                record({"step": step, "train_loss": train_loss, "lr": lr_mult * opt.param_groups[0]["peak_lr"],
                        "lr_factor": lr_mult, "grad_norm": grad_norm.item(), "tokens": tokens,
                        "train_time_s": train_time})
            if not math.isfinite(train_loss) or train_loss > blowup:
                reason = (f"non-finite training loss ({train_loss})" if not math.isfinite(train_loss) else
                          f"training loss {train_loss:.3f} above {t.diverge_factor} x the initial val loss")
                diverged = {"step": step, "reason": reason}
                break
            if step in evals:
                val = evaluate(run, model)
                record({"step": step, "val_loss": val, "tokens": tokens, "train_time_s": train_time})
                log.flush()
            bar.set_postfix_str(f"loss {train_loss:.3f} val {val:.3f} {tokens / train_time:,.0f} tok/s", refresh=False)
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
        "seed": cfg.seed, "data_seed": cfg.data.seed, "experiment": cfg.experiment,
    })
    if t.save_final:
        tmp = run.run_dir / ".model_final.pt.tmp"
        torch.save({"model_config": dataclasses.asdict(cfg.model), "state_dict": raw_model.state_dict()}, tmp)
        tmp.replace(run.run_dir / "model_final.pt")
    atomic_write_json(run.run_dir / "summary.json", summary)
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
    except (ConfigError, DataError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra made it for this run; leave no empty directory behind
        sys.exit(2)
    if isinstance(run, dict):  # train.skip_complete and the record is already there
        print(f"skip: {run_dir} holds a complete run (final val loss {run.get('final_val_loss')})", flush=True)
        return
    train(run)


if __name__ == "__main__":
    main()
