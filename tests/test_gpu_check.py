"""scripts/gpu_check.py without a GPU: the dry run's plan (every step, every conf/optimizer file, budgets within
the 480 s of a loan), a broken override named, the refusal to run without CUDA, the budget enforcement of the
command runner, the FSDP refusal step for real (it is refused before any device is touched), and the
JSON/markdown writer (scripts/gpu_results.py) on a fabricated step list. No training runs here."""

import contextlib
import io
import json
import math
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from scripts import gpu_check as g
from scripts import gpu_results as gr
from scripts import perf

REPO = Path(__file__).resolve().parent.parent
OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))


def gpu_check(*args):
    """`python scripts/gpu_check.py ARGS` in-process (its main, as the script's `__main__` calls it): exit status
    and what it printed. A launch per case cost ~4 s of imports; the dry run starts no process itself."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = g.main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def plan_of(stdout: str) -> dict[str, dict]:
    """step -> {budget, count, commands: key -> command line} from the printed plan."""
    steps, current = {}, None
    for line in stdout.splitlines():
        if m := re.fullmatch(r"step (\w+): budget (\d+) s, (\d+) command\(s\)", line):
            current = steps[m[1]] = {"budget": int(m[2]), "count": int(m[3]), "commands": {}}
        elif current is not None and (m := re.fullmatch(r"  (\w+): (.*)", line)):
            current["commands"][m[1]] = m[2]
    return steps


def test_dry_run_plans_every_step_and_every_optimizer(tmp_path):
    proc = gpu_check("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    steps = plan_of(proc.stdout)
    assert list(steps) == ["env", "perf", "train", "torchrun", "fsdp"]
    assert {k: s["budget"] for k, s in steps.items()} == {"env": 30, "perf": 240, "train": 150, "torchrun": 45,
                                                          "fsdp": 15}
    assert sum(s["budget"] for s in steps.values()) == 480 <= g.TOTAL_LIMIT
    assert "5 steps, 480 s in all" in proc.stdout.splitlines()[0]
    train = steps["train"]["commands"]
    # the project's eight; the shipped zoo (three) only when named (gpu_check.zoo: Shampoo's SVDs at 124M)
    assert len(OPTIMIZERS) == 11 and sorted(train) == sorted([*(o for o in OPTIMIZERS if not g.zoo(o)), "adamw_repeat"])
    assert len(train) == 9 and "not in the train step (--optimizers): psgd_kron, schedulefree_adamw, shampoo; the " \
        "shipped zoo is left out" in proc.stdout
    assert list(train)[:2] == ["adamw", "adamw_repeat"]  # the repeatability pair first
    for key, cmd in train.items():
        name = "adamw" if key == "adamw_repeat" else key
        assert f" train.py {' '.join(perf.PRESETS['gpt2_124m'])} optimizer={name} logger=none " in cmd
        assert " model=gpt2_124m " in cmd and " train.max_steps=30 " in cmd
        assert re.search(rf" hydra\.run\.dir={tmp_path}/runs/\d{{8}}-\d{{6}}/train/{key}$", cmd), cmd
    perf_cmd = steps["perf"]["commands"]["perf"]
    assert " scripts/perf.py gpt2_124m --repeats 3 --optimizers adamw,muon,muon_fp32,normuon,polargrad," \
           "newton_muon,adam_mini,soap --out " in perf_cmd
    torchrun = steps["torchrun"]["commands"]
    assert "-m torch.distributed.run --standalone --nproc_per_node 1 scripts/gpu_check.py --probe nccl" in torchrun["nccl"]
    assert "-m torch.distributed.run --standalone --nproc_per_node 1 train.py " in torchrun["train"]
    assert " train.max_steps=5 " in torchrun["train"]
    assert " train.parallel=fsdp " in steps["fsdp"]["commands"]["fsdp"]
    assert [s["count"] for s in steps.values()] == [1, 1, len(OPTIMIZERS) - 3 + 1, 2, 1]  # the zoo (3) left out
    assert f"dry run: every command composes ({len(OPTIMIZERS) - 3 + 6} commands)" in proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing created


@pytest.mark.parametrize("args, first_error", [
    (["--only", "train", "--optimizers", "adamw,adamz"],
     "error: train[adamz]: optimizer=adamz: no conf/optimizer/adamz.yaml (options: " + ", ".join(OPTIMIZERS) + ")"),
    (["--only", "fsdp,torchrun", "--extra", "optimizer.lr=0"],
     "error: torchrun[train]: optimizer.lr: must be > 0 (got 0.0)"),
    (["--only", "perf", "--perf-optimizers", "muon,bogus"],
     f"error: perf: --perf-optimizers: bogus (scripts/perf.py knows {', '.join(perf.optimizer_names())})"),
])
def test_dry_run_names_the_first_broken_command(tmp_path, args, first_error):
    proc = gpu_check("--dry-run", "--out", str(tmp_path), *args)
    assert proc.returncode == 1
    errors = proc.stderr.splitlines()
    assert errors[0] == first_error
    assert "every command composes" not in proc.stdout
    if "--extra" in args:  # the same override breaks the FSDP command too, listed after the first
        assert errors[1:] == ["also: fsdp[fsdp]: optimizer.lr: must be > 0 (got 0.0)"]


def test_budget_scale_and_one_step_budget(tmp_path):
    proc = gpu_check("--dry-run", "--out", str(tmp_path), "--only", "env,perf", "--budget-scale", "0.5",
                     "--budget", "perf=100")
    assert proc.returncode == 0, proc.stderr
    assert {k: s["budget"] for k, s in plan_of(proc.stdout).items()} == {"env": 15, "perf": 50}
    assert "2 steps, 65 s in all (budget scale 0.5)" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_exits_2_in_one_line(tmp_path):
    t0 = time.monotonic()
    proc = gpu_check("--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        (f"error: no CUDA device (torch {torch.__version__}): the GPU check needs a GPU; "
         "`python scripts/gpu_check.py --dry-run` checks its plan without one")]
    assert time.monotonic() - t0 < 30 and not any(tmp_path.iterdir())


def test_runner_kills_at_the_deadline_and_skips_the_rest(tmp_path):
    """A command past the deadline is killed with its process group (here a grandchild sleeper), one not
    started is skipped, one that finished keeps its exit status."""
    pid_file = tmp_path / "grandchild.pid"
    sleeper = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    cmds = {"quick": [sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"],
            "slow": [sys.executable, "-c", sleeper], "slow2": [sys.executable, "-c", "import time; time.sleep(60)"],
            "late": [sys.executable, "-c", "print(1)"]}
    t0 = time.monotonic()
    out = g.run_all(cmds, t0 + 3, tmp_path / "logs", jobs=2)  # quick, then slow2 beside slow; late waits
    assert time.monotonic() - t0 < 15
    assert [out[k]["status"] for k in cmds] == ["ran", "timed_out", "timed_out", "skipped"]
    assert out["quick"]["rc"] == 3 and (tmp_path / "logs" / "quick.log").read_text() == "hi\n"
    assert g.verdict("quick", out["quick"]) == "quick: exit 3: hi"
    assert 2.5 <= out["slow"]["seconds"] < 12 and out["slow"]["reason"].endswith("s, the step's budget")
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "zombie" in status.read_text()
    assert out["late"] == {"status": "skipped", "rc": None, "seconds": 0.0,
                    "reason": "not started: the step's budget was spent"}


def test_fsdp_refusal_step_matches_the_harness(tmp_path):
    """The step for real: train.py with train.parallel=fsdp in one process, refused in setup before any
    device work, with exactly FSDP_REFUSAL, on a CPU as on a GPU."""
    args = g.parser().parse_args(["--out", str(tmp_path)])
    args.extra, args.optimizers, args.perf_optimizers = [], ["adamw"], g.PERF_OPTIMIZERS
    args.runs = tmp_path / "runs" / "now"
    ctx = g.Ctx(args, g.plan(args), {"steps": []})
    ctx.deadline = time.monotonic() + 60
    rec = g.step_fsdp(ctx)
    assert rec["status"] == "ok", rec
    assert rec["figures"] == {"rc": 2, "error_lines": [g.FSDP_REFUSAL]}
    assert not (args.runs / "fsdp").exists()  # train.py removed the empty run directory Hydra made


def test_read_run_and_determinism(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 0, "val_loss": 10.9}, {"step": 1, "train_loss": 10.8, "grad_norm": 2.0},
             {"step": 2, "train_loss": math.nan, "grad_norm": math.inf}, {"step": 3, "train_loss": 11.0},
             {"step": 3, "val_loss": 10.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (run / "summary.json").write_text(json.dumps({"tokens_per_s": 1234.5, "world_size": 1, "diverged": False}))
    r = gr.read_run(run, 3)
    assert (r["steps"], r["first_loss"], r["last_loss"], r["val_first"], r["val_last"]) == (3, 10.8, 11.0, 10.9, 10.5)
    assert r["non_finite"] == ["grad_norm@2", "train_loss@2"] and r["tokens_per_s"] == 1234.5
    assert r["problems"] == ["non-finite grad_norm@2, train_loss@2", "loss did not fall (10.8 -> 11.0)"]
    assert gr.read_run(run, 30)["problems"][0] == "3 of 30 steps logged"
    assert gr.read_run(tmp_path / "missing", 3)["problems"][0].startswith("records unreadable (FileNotFoundError")
    d = gr.determinism([10.0, 8.0, 6.0], [10.0, 8.004, 6.0])
    assert d["identical"] is False and d["ok"] is True and d["steps"] == 3
    assert d["max_abs_diff"] == pytest.approx(0.004) and d["max_rel_diff"] == pytest.approx(5e-4)
    assert gr.determinism([10.0, 8.0], [10.0, 7.0])["ok"] is False  # 12.5% apart: a gross mismatch
    assert gr.determinism([10.0, 8.0], [10.0])["ok"] is False  # one run stopped early


def fake_results() -> dict:
    perf_json = {"tokens": 32768, "fwd_bwd_s": 0.08, "model_tflops": 300.0, "mfu_vs_measured_matmul": 0.45,
                 "mfu_vs_datasheet_bf16": 0.303, "precision": "bf16", "compiled": True,
                 "references": {"tokens_per_s_ours": 350000.0}, "tokens_per_s_over_transformers": 1.3,
                 "optimizers": {"adamw": {"step_s": 0.002, "step_over_adamw": 1.0, "train_step_over_adamw": 1.0,
                                          "state_bytes": 995_000_000, "state_bytes_over_adamw": 1.0},
                                "muon": {"step_s": 0.004, "step_over_adamw": 2.0, "train_step_over_adamw": 1.025,
                                         "state_bytes": 700_000_000, "state_bytes_over_adamw": 0.7}}}
    train = {"adamw": {"status": "ok", "seconds": 41.0, "first_loss": 10.9, "last_loss": 6.5, "non_finite": [],
                       "tokens_per_s": 400000.0, "optimizer_state_bytes": 995_000_000, "losses": [10.9, 6.5]},
             "muon": {"status": "failed", "seconds": 44.0, "first_loss": 10.9, "last_loss": math.nan,
                      "non_finite": ["train_loss@30"]},
             "determinism": gr.determinism([10.9, 6.5], [10.9, 6.5001])}
    return {"schema": "gpu_check/1", "date": "2026-12-01 10:00:00 +0000", "command": "scripts/gpu_check.py",
            "code": {"commit": "abc123"}, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.13.0+cu128", "cuda": "12.8",
            "budgets_s": dict(g.BUDGETS), "runs_dir": "/x/runs/now", "planned": list(g.STEPS), "steps": [
                {"name": "env", "status": "ok", "seconds": 9.5, "budget_s": 30, "detail": "bf16 700 TFLOP/s",
                 "figures": {"gpu": "NVIDIA H100 80GB HBM3", "bf16_matmul_tflops": 700.0}},
                {"name": "perf", "status": "ok", "seconds": 201.0, "budget_s": 240, "detail": "409,600 tokens/s",
                 "figures": gr.perf_figures(perf_json, 700.0)},
                {"name": "train", "status": "failed", "seconds": 150.4, "budget_s": 150, "figures": train, "jobs": 3,
                 "reason": "muon: non-finite train_loss@30"},
                {"name": "torchrun", "status": "timed_out", "seconds": 46.0, "budget_s": 45,
                 "reason": "train: timed_out (killed after 45 s, the step's budget)"}]}


def test_writer_json_and_markdown(tmp_path):
    res = fake_results()
    json_path, md_path = gr.write_results(res, tmp_path)
    assert (json_path.name, md_path.name) == ("nvidia-h100-80gb-hbm3.json", "nvidia-h100-80gb-hbm3.md")
    out = json.loads(json_path.read_text())
    assert set(out) == {"schema", "date", "command", "code", "gpu", "torch", "cuda", "budgets_s", "runs_dir",
                        "planned", "steps", "failures", "ok", "verdict"}
    assert out["ok"] is False and out["verdict"] == "FAILED: 2 step(s)"
    assert out["failures"] == ["train: muon: non-finite train_loss@30",
                               "torchrun: train: timed_out (killed after 45 s, the step's budget)"]
    assert [s["name"] for s in out["steps"]] == ["env", "perf", "train", "torchrun"]
    assert out["steps"][2]["figures"]["muon"]["last_loss"] is None  # NaN is written as null (strict JSON)
    perf = out["steps"][1]["figures"]
    assert perf["tokens_per_s_fwd_bwd"] == 409600.0 and perf["mfu_vs_env_matmul"] == pytest.approx(300 / 700)
    assert perf["tokens_per_s_train_step"] == 350000.0 and perf["optimizers"]["muon"]["train_step_over_adamw"] == 1.025
    md = md_path.read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3 (2026-12-01 10:00:00 +0000)\n")
    assert "torch 2.13.0+cu128, CUDA 12.8, code abc123" in md and "**FAILED: 2 step(s)**" in md
    assert "| env | ok | 9.5 | 30 | bf16 700 TFLOP/s |" in md
    assert "| train | failed | 150.4 | 150 | muon: non-finite train_loss@30 |" in md
    assert "| torchrun | timed_out | 46 | 45 | train: timed_out (killed after 45 s, the step's budget) |" in md
    assert "| muon | 4 |  | 2 | 1.025 | 700 | 0.7 |" in md  # step ms, -, / AdamW, training step, MB, ratio
    assert "| adamw | ok | 41 | 10.9 | 6.5 |  |  | none | 400,000 |  | 995 |" in md
    assert "| muon | failed | 44 | 10.9 | nan |  |  | train_loss@30 |" in md
    assert "AdamW twice, same seed, 2 steps: identical False, max |diff| 0.0001" in md
    assert "Up to 3 runs shared the GPU at a time" in md
    res["steps"] = res["steps"][:2]
    gr.write_results(res, tmp_path)
    assert json.loads(json_path.read_text())["verdict"] == "incomplete, no failure so far"
    res["steps"] += [{"name": n, "status": "ok", "seconds": 1.0, "budget_s": 15} for n in ("train", "torchrun", "fsdp")]
    gr.write_results(res, tmp_path)
    assert json.loads(json_path.read_text())["ok"] is True and res["verdict"] == "all steps passed"
    assert gr.slug(None) == "unknown-gpu" and sorted(p.name for p in tmp_path.iterdir()) == [
        "nvidia-h100-80gb-hbm3.json", "nvidia-h100-80gb-hbm3.md"]  # atomic writes leave no temporary files
