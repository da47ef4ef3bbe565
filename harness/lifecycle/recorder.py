"""What a run writes about itself while it trains: rank 0's records and its W&B run, in one place.

    config.yaml, env.json     at start (a resumed run keeps its first launch's env.json, adding the resume)
    metrics.jsonl             every logged step and evaluation (harness/lifecycle/records.py: MetricsLog)
    summary.json              at the end, built by `run_summary` from the records and the loop's state

W&B is optional and never stops a run: any failure (no network, bad key, not installed) leaves the local
records intact. On every other rank the recorder writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import netrc
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from harness.lifecycle import checkpoint
from harness.lifecycle.prepare import PreparedRun, banner, optimizer_name
from harness.lifecycle.records import MetricsLog, code_version, environment, state_bytes, summarize
from harness.loop.state import LoopState
from optimizers import external
from runtime.device import matmul_rates
from runtime.files import atomic_write_json, atomic_write_text


class Recorder:
    """Rank 0's records and W&B run. `optimizer` is the conf/optimizer/ choice and `overrides` the command line's
    overrides (Hydra's), both as the records name them."""

    def __init__(self, run: PreparedRun, optimizer: str | None, overrides: list[str]):
        self.run, self.optimizer, self.is_rank0 = run, optimizer, run.dist.is_rank0
        self.resumes = resumes_of(run)
        # Measured dense-matmul rates of this device: the yardstick for model FLOPs utilisation (MFU)
        self.rates = matmul_rates(str(run.device), 512 if run.device.type == "cpu" else 4096) if self.is_rank0 else {}
        self.metrics = MetricsLog(run.run_dir / "metrics.jsonl", write=self.is_rank0)
        self.wandb_run = None
        if not self.is_rank0:
            return
        atomic_write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(run.resolved))
        if run.continues:  # env.json keeps the first launch's facts
            env = {**_read_json(run.run_dir / "env.json"), "resumes": self.resumes}
        else:
            env = environment(run.device, {
                "world_size": run.dist.world, "precision": run.precision, "compile": run.compile,
                "matmul_gflops": self.rates, "workload_hash": run.workload_hash, "overrides": overrides,
                **({"precision_probe": run.precision_probe} if run.precision_probe else {}),
                **({"branch": run.branch} if run.branch_start else {})})
        atomic_write_json(run.run_dir / "env.json", env)
        print(banner(run), flush=True)
        self.wandb_run = init_wandb(run, optimizer, run.resume[1].get("wandb_id") if run.continues else None)

    def restore(self, state: dict[str, Any]) -> None:
        """metrics.jsonl (and diagnostics.jsonl) back to the checkpoint's prefix: no step recorded twice."""
        for line in state["metrics"]:
            self.metrics.log(json.loads(line))
        self.flush()
        if self.run.diagnostics is not None:
            self.run.diagnostics.truncate(state["step"])

    def log(self, entry: dict[str, Any]) -> None:
        """One metrics record (its "step" says when), to metrics.jsonl and W&B."""
        self.metrics.log(entry)
        self.to_wandb({k: v for k, v in entry.items() if k != "step"}, entry["step"])

    def to_wandb(self, values: dict[str, Any], step: int) -> None:
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.log(values, step=step)
        except Exception as e:  # noqa: BLE001 - a logging backend must never stop a run
            print(f"warning: W&B logging failed ({_one_line(e)}); local records only from step {step}", file=sys.stderr)
            self.wandb_run = None

    def flush(self) -> None:
        self.metrics.flush()

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint keeps of the records: the code, the metrics so far, the resumes, the W&B run."""
        return {"code": code_version(), "metrics": list(self.metrics.lines), "resumes": self.resumes,
                "wandb_id": getattr(self.wandb_run, "id", None)}

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.run.run_dir / "summary.json", summary)
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
            self.wandb_run.finish()


def resumes_of(run: PreparedRun) -> list[dict[str, Any]]:
    """The run's resumes so far: a branch inherits its parent's before the branch step; a resumed run adds this
    launch (warning when the code differs from the checkpoint's: bit-exact continuation holds only for the same)."""
    if run.resume is None:
        return []
    path, state = run.resume
    if run.branch_start:
        return list(state.get("resumes", []))
    note = checkpoint.resume_note(path, state, code_version())
    if note["code"] != note["checkpoint_code"]:
        print(f"warning: {path} was written by code {note['checkpoint_code']}, resuming with {note['code']}: "
              "bit-exact continuation holds only for the same code", file=sys.stderr)
    return [*state.get("resumes", []), note]


def run_summary(run: PreparedRun, state: LoopState, recorder: Recorder, failure: str | None) -> dict[str, Any]:
    """summary.json: the record's figures (harness/lifecycle/records.py: summarize) and what the run cost."""
    cfg, model, opt, t = run.cfg, run.model, run.optimizer, run.cfg.train
    fpt = model.flops_per_token(t.seq_len)
    # Per step: the model's training FLOPs (6N + attention per token; PC layers' weight polynomials per
    # forward, x3 for forward + backward, per micro-batch) plus the optimizer's own matmuls (docs/protocol.md).
    model_flops_step = run.tokens_per_step * fpt + 3 * run.grad_accum * model.pc_flops_per_forward()
    flops_step = model_flops_step + state.opt_flops
    train_time, opt_time = state.train.seconds, state.optimizer.seconds
    tokens_per_s = state.step * run.tokens_per_step / train_time if train_time > 0 else None
    peak = recorder.rates["bfloat16" if run.precision == "bf16" else "float32"]
    return {
        **summarize(recorder.metrics.records, t.target_loss, run.tokens_per_step, flops_step / run.tokens_per_step),
        "workload_hash": run.workload_hash, "diverged": failure is not None,
        "diverged_at_step": state.step if failure else None, "diverged_reason": failure,
        "steps": state.step, "tokens": state.step * run.tokens_per_step, "train_time_s": train_time,
        "optimizer_step_time_s": opt_time,  # included in train_time_s
        "optimizer_step_share": opt_time / train_time if train_time > 0 else None,
        "tokens_per_s": tokens_per_s, "n_params": model.num_params(), "flops_per_token": fpt,
        "model_flops_per_step": model_flops_step, "optimizer_flops_per_step": state.opt_flops,
        "flops_per_step": flops_step, "optimizer_state_bytes": state_bytes(opt), "pc_level": cfg.model.pc_level,
        "bench": dataclasses.asdict(cfg.bench),
        # MFU against the *measured* matmul rate of this device in the run's precision (not a datasheet peak)
        "model_flops_per_s": tokens_per_s * fpt if tokens_per_s else None,
        "mfu_vs_measured_matmul": tokens_per_s * fpt / 1e9 / peak if tokens_per_s else None,
        "unigram_entropy_nats": run.data.unigram_entropy_nats, "world_size": run.dist.world,
        "optimizer": recorder.optimizer, "optimizer_class": optimizer_name(opt),
        "optimizer_target": run.resolved["optimizer"]["_target_"],
        # an external torch.optim.Optimizer (optimizers/external.py): its class, every keyword argument it ran with,
        # its package's version; and the forward+backward evaluations its closures made (LBFGS): extra compute
        "optimizer_external": external.record(opt), "closure_evals": external.closure_evals(opt),
        # PolarGrad's lr_scale=muon_at_init: raw lr = lr x calibration, fixed on the first step
        "lr_calibration": next((g["lr_calibration"] for g in opt.param_groups if "lr_calibration" in g), None),
        "seed": cfg.seed, "data_seed": cfg.data.seed, "experiment": cfg.experiment,
        "resumes": recorder.resumes, "resumed_from_steps": [r["from_step"] for r in recorder.resumes],
        "branch": run.branch,  # a cooldown branch: {"from": parent run dir, "step", ...}; None for other runs
        # seconds spent on diagnostics (harness/probes/diagnostics.py), outside train_time_s (0 when they are off)
        "diagnostics_time_s": state.diagnostics.seconds, "diagnostics_every": cfg.diagnostics.every,
    }


def init_wandb(run: PreparedRun, optimizer: str | None, run_id: str | None = None):
    """The run's W&B run, or None (disabled, or it failed to start). Runs are named so that W&B's UI groups them
    by benchmark (group), arm (job_type) and setting (name); a resumed run continues its W&B run (run_id)."""
    if not run.cfg.wandb.enabled:
        return None
    try:
        import wandb

        w, b = run.cfg.wandb, run.cfg.bench
        mode = w.mode
        if mode == "auto":  # online only with credentials: never wait on a network that is not there
            mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"
        name = f"{b.arm}/{b.trial}/s{run.cfg.seed}" if b.arm else run.cfg.name
        tags = [*w.tags, *(t for t in (b.phase, optimizer) if t)]
        offline = mode == "offline"  # quiet: one line saying where the run went, not wandb's ~30
        wandb_run = wandb.init(project=w.project, entity=w.entity, mode=mode,
                               group=w.group or b.name or run.cfg.experiment, job_type=w.job_type or b.arm or optimizer,
                               tags=tags, name=name, dir=str(run.run_dir), config=run.resolved, id=run_id,
                               resume="allow" if run_id else None,
                               settings=wandb.Settings(init_timeout=w.init_timeout, silent=offline))
        if offline:
            print(f"W&B offline run: `wandb sync {Path(wandb_run.dir).parent}` uploads it", flush=True)
        return wandb_run
    except Exception as e:  # noqa: BLE001 - a logging backend must never stop a run
        print(f"warning: W&B disabled for this run ({_one_line(e)}); local records only", file=sys.stderr)
        return None


def _one_line(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}"


def _read_json(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _netrc_has_wandb() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def end_loss(summary: dict) -> float | None:
    """What train.py's Hydra main returns for a sweeper to minimize: the end-of-schedule validation loss, inf
    for a diverged or unscored run, None where there is no summary (ranks other than 0)."""
    if not summary:
        return None
    return math.inf if summary["diverged"] or summary["final_val_loss"] is None else summary["final_val_loss"]
