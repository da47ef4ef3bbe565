"""train.precision=auto (harness/lifecycle/precision.py): on a CPU chosen by timing the run's own model in fp32
and bf16 autocast, without touching the run's RNG; recorded in env.json; kept by a resumed run; measured once per
benchmark (bench/run.py) and passed to every run as a fixed train.precision."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from bench.declaration import load_bench
from bench.launch import hydra_command
from bench.run import bench_precision
from harness.lifecycle import precision
from models import ModelConfig

TINY = ModelConfig(family="gpt2", n_layer=1, n_head=2, d_model=32, vocab_size=256, block_size=32)


def test_probe_measures_both_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    r = precision.probe(TINY, 4, 32, torch.device("cpu"), seconds=0.05)
    assert torch.equal(torch.rand(4), expected)
    fp32, bf16 = r["tokens_per_s"]["fp32"], r["tokens_per_s"]["bf16"]
    assert fp32 > 0 and bf16 > 0 and r["reps"] >= 3 and (r["micro_batch"], r["seq_len"]) == (4, 32)
    assert r["choice"] == ("bf16" if bf16 >= precision.BF16_MARGIN * fp32 else "fp32")


@pytest.mark.parametrize("fp32, bf16, choice", [(100.0, 114.0, "fp32"), (100.0, 115.0, "bf16"), (100.0, 60.0, "fp32")])
def test_bf16_only_with_the_margin(monkeypatch, fp32, bf16, choice):
    """The rule on constructed timings: bf16 must be 1.15x faster (median step times of the interleaved steps)."""
    clock = iter(x for pair in ([0.0, 4096 / fp32], [0.0, 4096 / bf16]) * 100 for x in pair)
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(clock))
    assert precision.probe(TINY, 128, 32, torch.device("cpu"), seconds=0.0)["choice"] == choice


def test_choose_keeps_what_a_run_recorded_and_never_probes_many_ranks(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "probe", lambda *a, **k: pytest.fail("probed"))
    assert precision.choose("bf16", cpu, TINY, 4, 32, None, 1) == ("bf16", None)
    (tmp_path / "env.json").write_text(json.dumps({"precision": "bf16"}))
    assert precision.choose("auto", cpu, TINY, 4, 32, tmp_path, 1) == ("bf16", {"choice": "bf16",
                                                                              "kept_from": str(tmp_path)})
    assert precision.choose("auto", cpu, TINY, 4, 32, None, 2)[0] == "fp32"


def test_auto_is_recorded_and_kept_on_resume(tmp_path):
    """A run with train.precision=auto records the probe in env.json; relaunched from its checkpoint (after a
    SIGKILL at step 3) it keeps the precision its first launch recorded (edited here to the other choice, to see
    that it is read, not re-measured)."""
    from test_policies import composed

    from harness.lifecycle.prepare import PreparedRun, prepare_run

    run = tmp_path / "r"
    args = ("optimizer=adamw", "train.precision=auto", "train.max_steps=6", "train.ckpt_every=2",
            "train.eval_every=2", "train.threads=1")
    cmd = [sys.executable, "train.py", "experiment=smoke", "logger=none", "name=test", f"hydra.run.dir={run}", *args]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OPTBENCH_KILL_AT_STEP": "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    env = json.loads((run / "env.json").read_text())
    probe = env["precision_probe"]
    assert env["precision"] == probe["choice"] in ("fp32", "bf16")
    assert probe["tokens_per_s"]["fp32"] > 0 and probe["tokens_per_s"]["bf16"] > 0
    other = {"fp32": "bf16", "bf16": "fp32"}[probe["choice"]]
    (run / "env.json").write_text(json.dumps({**env, "precision": other}))
    resumed = prepare_run(composed(*args), run)
    assert isinstance(resumed, PreparedRun) and resumed.resume is not None
    assert resumed.precision == other and resumed.precision_probe == {"choice": other, "kept_from": str(run)}
    resumed.lock.release()


def _bench(tmp_path, **changes):
    from test_bench import declaration, write

    return load_bench(write(tmp_path, declaration(**changes)))


def test_a_benchmark_measures_once_and_passes_the_choice(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "probe", lambda *a, **k: calls.append(a) or {
        "choice": "bf16", "tokens_per_s": {"fp32": 1.0, "bf16": 2.0}, "margin": 1.15, "reps": 3})
    b = _bench(tmp_path, precision="auto")
    decl: dict = {}
    assert bench_precision(b, decl) == "bf16" and len(calls) == 1
    assert decl["precision_probe"]["choice"] == "bf16" and decl["precision_probe"]["threads"] == 1
    model_cfg, micro, seq = calls[0][:3]
    assert (model_cfg.d_model, micro, seq) == (128, 4, 64)  # gpt2_tiny in the smoke experiment's shape
    assert bench_precision(b, decl) == "bf16" and len(calls) == 1  # a relaunch reads bench.json's record
    b.precision_used = "bf16"
    assert "train.precision=bf16" in hydra_command(b, tmp_path, ["x"])


def test_a_declared_or_experiment_precision_is_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "probe", lambda *a, **k: pytest.fail("probed"))
    assert bench_precision(_bench(tmp_path, precision="fp32"), {}) == "fp32"
    assert bench_precision(_bench(tmp_path), {}) == "fp32"  # the smoke experiment's own train.precision
    assert bench_precision(_bench(tmp_path, launcher="slurm", jobs=1), {}) == "fp32"


def test_precision_is_a_workload_field_only_when_declared(tmp_path):
    from bench.declaration import workload_fields

    assert "precision" not in workload_fields(_bench(tmp_path))  # directories of older declarations still open
    assert workload_fields(_bench(tmp_path, precision="auto"))["precision"] == "auto"
