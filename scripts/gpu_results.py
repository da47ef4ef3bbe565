"""The GPU check's record (scripts/gpu_check.py imports it; not a command of its own): the figures each step
keeps, read from what its commands wrote (scripts/perf.py's JSON, a train.py run's metrics.jsonl and
summary.json), and the results, results/gpu/<gpu>.json (the record: every key is set here) and .md (its
tables), rewritten atomically after every step with the verdict of the steps so far.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

from harness.lifecycle.records import code_version
from runtime.files import atomic_write_json, atomic_write_text

PRESET = "gpt2_124m"  # the check's workload, scripts/perf.py's: the perf step's and every train.py run's
DETERMINISM_RTOL = 1e-2  # compiled bf16 on a GPU need not repeat bitwise; a gross mismatch fails


def record(runs: Path, planned: list[str], budgets: dict[str, float]) -> dict:
    """The record before any step: what ran it, on which code, with which budgets; the GPU when env reports it."""
    return {"schema": "gpu_check/1", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv),
            "code": code_version(), "gpu": None, "torch": None, "cuda": None, "budgets_s": budgets,
            "runs_dir": str(runs), "planned": planned, "steps": []}


# ---- a step's figures, from its commands' outputs --------------------------------------------------------------

def perf_figures(res: dict, measured_tflops: float | None) -> dict:
    """What the issue asks of scripts/perf.py's JSON, and the MFU against the env step's measured rate."""
    keys = ("step_s", "step_over_fwd_bwd", "step_over_adamw", "train_step_over_adamw", "state_bytes",
            "state_bytes_over_adamw")
    tflops = res.get("model_tflops")
    return {"tokens_per_s_fwd_bwd": res["tokens"] / res["fwd_bwd_s"] if res.get("fwd_bwd_s") else None,
            "tokens_per_s_train_step": res.get("references", {}).get("tokens_per_s_ours"),
            "tokens_per_s_over_transformers": res.get("tokens_per_s_over_transformers"), "model_tflops": tflops,
            "mfu_vs_measured_matmul": res.get("mfu_vs_measured_matmul"),
            "mfu_vs_env_matmul": tflops / measured_tflops if tflops and measured_tflops else None,
            "mfu_vs_datasheet_bf16": res.get("mfu_vs_datasheet_bf16"), "precision": res.get("precision"),
            "compiled": res.get("compiled"),
            "optimizers": {n: {k: o.get(k) for k in keys} for n, o in res.get("optimizers", {}).items()}}

def read_run(run_dir: Path, steps: int) -> dict:
    """A finished train.py run's records: losses, finiteness, throughput; `problems` lists what is wrong."""
    try:
        lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return {"problems": [f"records unreadable ({e.__class__.__name__}: {e})"]}
    train = [m["train_loss"] for m in lines if "train_loss" in m]
    val = [m["val_loss"] for m in lines if "val_loss" in m]
    bad = sorted({f"{k}@{m.get('step')}" for m in lines for k, v in m.items()
                  if isinstance(v, float) and not math.isfinite(v)})
    out = {"steps": len(train), "first_loss": (train or [None])[0], "last_loss": (train or [None])[-1],
           "val_first": (val or [None])[0], "val_last": (val or [None])[-1], "non_finite": bad, "losses": train,
           **{k: summary.get(k) for k in ("tokens_per_s", "mfu_vs_measured_matmul", "optimizer_step_share",
                                          "optimizer_state_bytes", "diverged", "train_time_s", "world_size")}}
    out["problems"] = ([f"{len(train)} of {steps} steps logged"] * (len(train) != steps)
                       + [f"non-finite {', '.join(bad[:5])}"] * bool(bad) + ["diverged"] * bool(summary.get("diverged"))
                       + [f"loss did not fall ({out['first_loss']} -> {out['last_loss']})"]
                       * (not train or not train[-1] < train[0]))
    return out


def determinism(a: list[float], b: list[float]) -> dict:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=False)]
    rel = [d / abs(x) for d, x in zip(diffs, a, strict=False) if x]
    return {"steps": len(diffs), "identical": a == b, "max_abs_diff": max(diffs, default=None),
            "max_rel_diff": max(rel, default=None), "rtol": DETERMINISM_RTOL,
            "ok": len(a) == len(b) > 0 and max(rel, default=0.0) <= DETERMINISM_RTOL}


# ---- the files ------------------------------------------------------------------------------------------------

def slug(name: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (name or "unknown gpu").lower()).strip("-")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return "" if v is None else (", ".join(map(str, v)) or "none") if isinstance(v, list) else str(v)


def md_table(rows: dict[str, dict], cols: dict[str, tuple[str, float]]) -> list[str]:
    """| name | header... | rows: column header -> (key, scale: the value shown is value x scale)."""
    out = [f"| | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [r.get(k) * f if isinstance(r.get(k), (int, float)) and f != 1 else r.get(k)
                 for k, f in cols.values()]
        out.append(f"| {name} | {' | '.join(map(_fmt, cells))} |")
    return out


def markdown(res: dict) -> str:
    """The readable tables of a results dict (the JSON's content)."""
    by = {s["name"]: s.get("figures") or {} for s in res["steps"]}
    jobs = {s["name"]: s.get("jobs") for s in res["steps"]}
    lines = [f"# GPU check: {res.get('gpu') or 'unknown GPU'} ({res['date']})", "",
             f"torch {res.get('torch')}, CUDA {res.get('cuda')}, code {(res.get('code') or {}).get('commit')}: "
             + f"`{res['command']}`", "", f"**{res['verdict']}**", "",
             *md_table({s["name"]: {**s, "text": s.get("detail") if s["status"] == "ok" else s.get("reason")}
                        for s in res["steps"]}, {"status": ("status", 1), "time (s)": ("seconds", 1),
                                                 "budget (s)": ("budget_s", 1), "detail": ("text", 1)})]
    if env := by.get("env"):
        lines += ["", "## Environment", "", *[f"- {k}: {_fmt(v)}" for k, v in env.items()]]
    if p := by.get("perf"):
        lines += ["", f"## scripts/perf.py {PRESET}", "", *[f"- {k}: {_fmt(p.get(k))}" for k in p if k not in (
            "optimizers", "perf_json")], "", *md_table(p.get("optimizers", {}), {
                "step (ms)": ("step_s", 1e3), "step / fwd+bwd": ("step_over_fwd_bwd", 1),
                "step / AdamW's": ("step_over_adamw", 1), "training step / AdamW's": ("train_step_over_adamw", 1),
                "state (MB)": ("state_bytes", 1e-6), "state / AdamW's": ("state_bytes_over_adamw", 1)})]
    if runs := {k: v for k, v in by.get("train", {}).items() if k != "determinism"}:
        lines += ["", "## Training runs (GPT-2 124M, KJV, bf16, compiled)", "", *md_table(runs, {
            "status": ("status", 1), "time (s)": ("seconds", 1), "first loss": ("first_loss", 1),
            "last loss": ("last_loss", 1), "val first": ("val_first", 1), "val last": ("val_last", 1),
            "non-finite": ("non_finite", 1), "tokens/s": ("tokens_per_s", 1),
            "MFU (measured)": ("mfu_vs_measured_matmul", 1), "state (MB)": ("optimizer_state_bytes", 1e-6)}),
            "", f"Up to {jobs.get('train')} runs shared the GPU at a time: their tokens/s and MFU are lower "
            + "bounds (scripts/perf.py's are the clean figures)."]
    if d := by.get("train", {}).get("determinism"):
        lines += ["", f"AdamW twice, same seed, {d['steps']} steps: identical {d['identical']}, max |diff| "
                  + f"{_fmt(d['max_abs_diff'])}, max relative {_fmt(d['max_rel_diff'])} (fails above {d['rtol']})"]
    for name in ("torchrun", "fsdp"):
        if by.get(name):
            lines += ["", f"## {name}", "", *[f"- {k}: {json.dumps(v, default=str)[:1500]}"
                                               for k, v in by[name].items()]]
    return "\n".join(lines) + "\n"


def write_results(res: dict, out: Path) -> tuple[Path, Path]:
    """<out>/<gpu-slug>.json and .md, atomically, with the verdict of the steps so far (set in `res`)."""
    failed = [f"{s['name']}: {s.get('reason')}" for s in res["steps"] if s["status"] in ("failed", "timed_out")]
    res["failures"], res["ok"] = failed, not failed
    complete = {s["name"] for s in res["steps"]} >= set(res["planned"])
    res["verdict"] = (f"FAILED: {len(failed)} step(s)" if failed else "all steps passed" if complete
                      else "incomplete, no failure so far")
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{slug(res.get('gpu'))}.json", out / f"{slug(res.get('gpu'))}.md"
    atomic_write_json(json_path, res)
    atomic_write_text(md_path, markdown(res))
    return json_path, md_path
