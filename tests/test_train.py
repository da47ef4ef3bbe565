"""End-to-end runs of train.py on the embedded corpus: records, determinism, refusal of bad input."""

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_jsonl, run_train

from harness.config.schema import TrainConfig
from harness.lifecycle.records import summarize
from harness.loop.schedule import eval_steps

RECORDS = ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "model_final.pt")


@pytest.fixture(scope="module")
def smoke_run(kjv_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "gpt2"
    proc = run_train(run_dir, "model=gpt2_tiny", "seed=1")
    return run_dir, proc


def test_run_writes_self_describing_records(smoke_run):
    run_dir, proc = smoke_run
    for f in RECORDS:
        assert (run_dir / f).is_file(), f
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "train_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    for m in steps:
        assert m["tokens"] == m["step"] * 8 * 64
        assert math.isfinite(m["train_loss"]) and m["grad_norm"] > 0 and m["lr"] > 0
    times = [m["train_time_s"] for m in steps]
    assert times == sorted(times) and times[0] > 0
    evals = [m for m in metrics if "val_loss" in m]
    smoke = TrainConfig(max_steps=12, eval_every=4, eval_dense_every=2, eval_dense_frac=0.25)
    assert [m["step"] for m in evals] == eval_steps(smoke) == [0, 4, 8, 9, 11, 12]
    # a freshly initialised model predicts ~uniformly: loss ~ ln(4096) = 8.32
    assert abs(evals[0]["val_loss"] - math.log(4096)) < 0.1
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["min_val_loss"] == min(e["val_loss"] for e in evals)
    assert summary["diverged"] is False and summary["steps"] == 12 and summary["world_size"] == 1
    assert summary["tokens_per_s"] == pytest.approx(12 * 512 / summary["train_time_s"])
    # one training clock (harness/loop/state.py): a step's record reads it, the summary holds it at the end
    assert steps[-1]["train_time_s"] <= summary["train_time_s"] and evals[-1]["train_time_s"] <= summary["train_time_s"]
    assert len(summary["workload_hash"]) == 64
    env_rate = json.loads((run_dir / "env.json").read_text())["matmul_gflops"]["float32"]
    assert summary["mfu_vs_measured_matmul"] == pytest.approx(
        summary["tokens_per_s"] * summary["flops_per_token"] / 1e9 / env_rate)
    # sanity only: 0.55 measured (1 thread, 2-core AMD EPYC, 2026-12-01), but the denominator is a 0.1-s matmul
    # probe at start-up that a job sharing the cores slows 12x (tests/test_perf.py); a unit slip is 1000x
    assert 0 < summary["mfu_vs_measured_matmul"] < 50
    assert 0 < summary["optimizer_step_time_s"] < summary["train_time_s"]
    assert summary["optimizer_step_share"] == pytest.approx(summary["optimizer_step_time_s"] / summary["train_time_s"])
    for key in ("steps_to_target", "tokens_to_target", "train_time_to_target_s"):
        assert key in summary

    env = json.loads((run_dir / "env.json").read_text())
    assert env["libraries"]["torch"].startswith("2.13") and env["world_size"] == 1
    assert set(env["code"]) == {"commit", "tree", "dirty", "diff_sha256"}
    assert env["workload_hash"] == summary["workload_hash"]
    assert "model" in proc.stdout and "param groups" in proc.stdout
    (done,) = [line for line in proc.stdout.splitlines() if line.startswith("done: ")]
    assert f"final val loss {summary['final_val_loss']:.4f}, " in done  # 4 decimals, the recorded value rounded

    state = torch.load(run_dir / "model_final.pt", weights_only=True)
    assert state["model_config"]["family"] == "gpt2" and "state_dict" in state


def test_same_seed_bit_identical_losses(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    run_train(tmp_path / "again", "model=gpt2_tiny", "seed=1")
    a = [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_jsonl(run_dir / "metrics.jsonl")]
    b = [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_jsonl(tmp_path / "again/metrics.jsonl")]
    assert a == b  # exact float equality, not approx
    ha = json.loads((run_dir / "summary.json").read_text())["workload_hash"]
    hb = json.loads((tmp_path / "again/summary.json").read_text())["workload_hash"]
    assert ha == hb


def test_seed_changes_losses_but_not_workload(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    run_train(tmp_path / "other", "model=gpt2_tiny", "seed=2")
    la = [m["train_loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in m]
    lb = [m["train_loss"] for m in read_jsonl(tmp_path / "other/metrics.jsonl") if "train_loss" in m]
    assert la != lb
    sa = json.loads((run_dir / "summary.json").read_text())
    sb = json.loads((tmp_path / "other/summary.json").read_text())
    assert sa["workload_hash"] == sb["workload_hash"]


def test_llama_trains(kjv_dir, tmp_path):
    run_train(tmp_path / "llama", "model=llama_tiny", "train.target_loss=100")
    summary = json.loads((tmp_path / "llama/summary.json").read_text())
    assert summary["final_val_loss"] < math.log(4096) - 0.5
    # every evaluation is below 100, so the target is met at the first one: step 0
    assert summary["steps_to_target"] == 0 and summary["tokens_to_target"] == 0


def test_existing_run_is_never_overwritten(smoke_run):
    run_dir, _ = smoke_run
    before = {f: hashlib.sha256((run_dir / f).read_bytes()).hexdigest() for f in RECORDS}
    proc = run_train(run_dir, "model=gpt2_tiny", "seed=1", check=False)
    assert proc.returncode == 2
    assert "already holds" in proc.stderr and "summary.json" in proc.stderr
    assert before == {f: hashlib.sha256((run_dir / f).read_bytes()).hexdigest() for f in RECORDS}


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", "error: train.max_steps: must be > 0 (got 0)"),
    ("optimizer.lr=0", "error: optimizer.lr: must be > 0"),
    ("data.dir=/nonexistent/kjv", "/nonexistent/kjv"),
])
def test_cli_bad_input_fails_fast_and_writes_nothing(kjv_dir, tmp_path, override, message):
    proc = run_train(tmp_path / "bad", override, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any((tmp_path / "bad" / f).exists() for f in RECORDS)


def test_cli_unknown_key_fails(kjv_dir, tmp_path):
    proc = run_train(tmp_path / "bad", "train.max_stepz=3", check=False)
    assert proc.returncode != 0 and "max_stepz" in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_summarize_target_rules():
    recs = [{"step": 0, "val_loss": 8.0, "train_time_s": 0.0}, {"step": 5, "train_loss": 5.0},
            {"step": 10, "val_loss": 4.5, "train_time_s": 2.0}, {"step": 20, "val_loss": 3.9, "train_time_s": 4.5},
            {"step": 30, "val_loss": 4.1, "train_time_s": 7.0}]
    s = summarize(recs, 4.0, tokens_per_step=100, flops_per_token=10.0)
    assert (s["steps_to_target"], s["tokens_to_target"], s["train_time_to_target_s"]) == (20, 2000, 4.5)
    assert s["flops_to_target"] == 20000.0
    assert (s["final_val_loss"], s["min_val_loss"]) == (4.1, 3.9)
    s = summarize(recs, 3.0, tokens_per_step=100, flops_per_token=10.0)
    assert s["steps_to_target"] is None and s["train_time_to_target_s"] is None
    s = summarize(recs + [{"step": 40, "val_loss": float("nan"), "train_time_s": 9.0}], None, 100, 10.0)
    assert math.isnan(s["final_val_loss"]) and s["min_val_loss"] == 3.9


def test_wandb_offline_logs_and_failure_keeps_local_records(kjv_dir, tmp_path, monkeypatch):
    proc = run_train(tmp_path / "off", "wandb.enabled=true", "wandb.mode=offline")
    runs = list((tmp_path / "off" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0, proc.stdout[-2000:]
    # quiet offline: one line saying where the run went (wandb itself prints ~30)
    lines = (proc.stdout + proc.stderr).splitlines()
    said = [line for line in lines if line.startswith(("wandb:", "W&B"))]
    assert said == [f"W&B offline run: `wandb sync {runs[0].parent}` uploads it"], said
    # online without credentials: W&B refuses; the run goes on with a warning and complete local records
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    proc = run_train(tmp_path / "on", "wandb.enabled=true", "wandb.mode=online")
    assert "warning: W&B disabled for this run" in proc.stderr
    assert json.loads((tmp_path / "on" / "summary.json").read_text())["steps"] == 12


# Both fail since protocol v2 set AdamW's default lr to torch's 1e-3 (1457257): bench_micro ends at 5.264 (the bar
# 4.996) and bench_tiny at 4.453 (the bar 4.3), measured 2026-12-01 at a93ec65 and at e63e8f5 alike. The workload
# issue (20) replaces these workloads; strict, so the day they pass again the marks must go.
WORKLOAD_ISSUE = pytest.mark.xfail(strict=True, reason="AdamW at its a-priori lr 1e-3 learns these workloads too "
                                   "slowly for their old bars; the standard benchmark of issue 20 replaces them")


@pytest.mark.slow  # ~12 s; the workload issue replaces these workloads (`make test-all` runs it)
@WORKLOAD_ISSUE
def test_bench_workload_learns_well_below_unigram_entropy(kjv_dir, tmp_path):
    """The `make bench` workload (bench_micro: GPT-2 micro, 200 steps x 1,024 tokens) with AdamW's defaults:
    the model must beat the best context-free predictor (unigram entropy, 6.0 nats) by more than 1 nat."""
    run_train(tmp_path / "bench", "train.progress=false", experiment="bench_micro")
    s = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert s["unigram_entropy_nats"] > 5.9
    assert s["final_val_loss"] < s["unigram_entropy_nats"] - 1.0


@pytest.mark.slow
@WORKLOAD_ISSUE
def test_full_bench_reaches_target(kjv_dir, tmp_path):
    run_train(tmp_path / "bench", "train.progress=false", experiment="bench_tiny")
    s = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert s["steps"] == 400 and s["final_val_loss"] < 4.3
    assert s["steps_to_target"] is not None and s["steps_to_target"] <= 400


def test_hydra_multirun_writes_one_record_per_job(kjv_dir, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "-m", "experiment=smoke", "optimizer.lr=1e-3,3e-3",
                           f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0_experiment=smoke,optimizer.lr=0.001",
                                                  "1_experiment=smoke,optimizer.lr=0.003"]
    lrs = [json.loads((p.parent / "metrics.jsonl").read_text().splitlines()[1])["lr"] for p in summaries]
    assert lrs[1] == pytest.approx(3 * lrs[0])


def test_bf16_autocast_runs_on_cpu(kjv_dir, tmp_path):
    """bf16 autocast is opt-in on CPU; it must run (loss in fp32) and record its precision."""
    run_train(tmp_path / "bf16", "train.precision=bf16", "train.max_steps=4", "train.eval_every=4")
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert json.loads((tmp_path / "bf16" / "env.json").read_text())["precision"] == "bf16"
    assert summary["final_val_loss"] < math.log(4096)


@pytest.mark.slow
def test_torch_compile_on_cpu_matches_eager(kjv_dir, tmp_path):
    run_train(tmp_path / "eager", "train.max_steps=4", "train.eval_every=4")
    run_train(tmp_path / "compiled", "train.max_steps=4", "train.eval_every=4", "train.compile=true")
    a = [m["train_loss"] for m in read_jsonl(tmp_path / "eager/metrics.jsonl") if "train_loss" in m]
    b = [m["train_loss"] for m in read_jsonl(tmp_path / "compiled/metrics.jsonl") if "train_loss" in m]
    assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.slow
def test_newton_muon_input_hooks_under_torch_compile(kjv_dir, tmp_path):
    """The harness's forward hooks switch on and off between steps; under torch.compile they must still
    deliver Newton-Muon's statistics (refresh every 4 steps; it raises if a refresh step gets no inputs)
    and give eager's losses."""
    args = ("optimizer=newton_muon", "optimizer.refresh_every=4", "optimizer.dtype=fp32")
    run_train(tmp_path / "eager", *args)
    run_train(tmp_path / "compiled", *args, "train.compile=true")
    a = [m["train_loss"] for m in read_jsonl(tmp_path / "eager/metrics.jsonl") if "train_loss" in m]
    b = [m["train_loss"] for m in read_jsonl(tmp_path / "compiled/metrics.jsonl") if "train_loss" in m]
    assert len(a) == len(b) == 12
    assert b == pytest.approx(a, rel=1e-4)
    assert json.loads((tmp_path / "compiled/env.json").read_text())["compile"] is True


def test_benchmark_outputs_do_not_make_the_code_dirty():
    """bench.json and reports under results/ are committed outputs, not code: a new one leaves the code
    version (dirty flag, diff hash) of the records unchanged."""
    from harness.lifecycle.records import code_version

    before = code_version()
    out = REPO / "results" / "bench_zz_dirty_probe"
    out.mkdir(parents=True)
    try:
        (out / "bench.json").write_text("{}")
        (out / "report.md").write_text("# probe\n")
        assert code_version() == before
    finally:
        for f in out.iterdir():
            f.unlink()
        out.rmdir()


def test_documents_and_tests_are_not_the_code_version(tmp_path):
    """A commit that touches only documents, tests or results keeps the code's `tree` hash (a long benchmark stays
    one code version while its documentation is written); a code file changes it. Checked in a scratch clone."""
    import shutil
    import subprocess

    from harness.lifecycle import records

    repo = tmp_path / "repo"
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)
    (repo / "docs").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "train.py").write_text("x = 1\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "0")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code")
    old_repo = records.REPO
    records.REPO = repo
    try:
        first = records.code_version()
        for name in ("docs/a.md", "tests/test_x.py", "README.md"):
            (repo / name).write_text("new\n")
        assert records.code_version()["dirty"] is False  # uncommitted documents are not dirty code
        git("add", ".")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "docs")
        second = records.code_version()
        assert second["commit"] != first["commit"] and second["tree"] == first["tree"]
        (repo / "train.py").write_text("x = 2\n")
        assert records.code_version()["dirty"] is True
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "code 2")
        assert records.code_version()["tree"] != first["tree"]
    finally:
        records.REPO = old_repo
        shutil.rmtree(repo)
