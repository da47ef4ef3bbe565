"""scripts/bench.py: the declaration is checked before any run, a real (seconds-long) benchmark runs through
Hydra's multirun with the joblib launcher, chooses each arm's best trial, re-runs it with fresh seeds, skips
complete runs on a re-run, reruns broken ones, refuses another workload, and every run logs to W&B offline."""

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from scripts.bench import BenchError, load_bench, plan_runs, trial_config
from scripts.bench_records import choose_best, load_runs


def declaration(**changes):
    d = {"name": "t", "experiment": "smoke", "overrides": ["train.max_steps=8", "train.eval_every=4"],
         "reference": "adamw", "muon_variants": [], "trials": 2, "tuning_seed": 0, "seeds": [1],
         "launcher": "joblib", "jobs": 2, "threads": 1, "logger": "wandb",
         "arms": {"adamw": {"optimizer": "adamw", "grid": {"optimizer.lr": [3.0e-3, 1.0e-2]}},
                  "muon": {"optimizer": "muon", "grid": {"optimizer.lr": [0.02, 0.06]}}}}
    d.update(changes)
    return d


def write(tmp_path, d, name="bench.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    ({"trials": 3}, "bench.arms.adamw.grid: 2 trials, but the equal budget is bench.trials=3"),
    ({"arms": {"adamw": {"optimizer": "adamw", "grid": {"optimizer.lr": [1e-3, 1e-2]}}}},
     "does not contain the optimizer's default 0.003"),
    ({"arms": {"adamw": {"optimizer": "adamw_typo", "grid": {"optimizer.lr": [3e-3, 1e-2]}}}},
     "bench.arms.adamw.optimizer: no conf/optimizer/adamw_typo.yaml"),
    ({"seeds": [0, 1]}, "bench.seeds: need distinct seeds other than the tuning seed 0"),
    ({"launcher": "mpi"}, "bench.launcher: 'mpi' is not one of basic, joblib, slurm"),
    ({"reference": "sgd"}, "the reference arm 'sgd' is not declared"),
    ({"trails": 2}, "bench.trails: Key 'trails' not in 'BenchConfig'"),
    ({"diagnostics": {"every": 0}}, "bench.diagnostics.every: must be > 0 for a diag phase"),
    ({"diagnostics": {"every": 5, "evry": 3}}, "bench.diagnostics.evry: Key 'evry' not in 'DiagnosticsConfig'"),
    ({"diagnostics": {"every": 5, "blocks": "rows"}}, "bench.diagnostics: diagnostics.blocks: 'rows' is not group"),
])
def test_bad_declarations_fail_before_any_run(tmp_path, changes, message):
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_bench(write(tmp_path, declaration(**changes)))


def test_every_shipped_benchmark_is_valid_and_budget_is_equal():
    for path in sorted((REPO / "conf" / "bench").glob("*.yaml")):
        b = load_bench(str(path))
        runs = plan_runs(b, "tune")
        per_arm = {arm: sum(r["arm"] == arm for r in runs) for arm in b.arms}
        assert set(per_arm.values()) == {b.trials}, path.name
        assert b.reference in b.arms


def test_trial_config_sets_arm_options_setting_and_both_seeds(tmp_path):
    b = load_bench(write(tmp_path, declaration(arms={"adamw_pc": {
        "optimizer": "adamw", "set": {"model.pc_level": 4}, "grid": {"optimizer.lr": [3e-3, 1e-2]}}},
        reference="adamw_pc")))
    run = plan_runs(b, "seed", {"adamw_pc": {"setting": {"optimizer.lr": 0.01}}})[0]
    text = trial_config(b, run)
    assert text.startswith("# @package _global_")
    cfg = yaml.safe_load(text)
    assert cfg["defaults"] == [{"override /optimizer": "adamw"}]
    assert cfg["model"] == {"pc_level": 4} and cfg["optimizer"] == {"lr": 0.01}
    assert cfg["seed"] == cfg["data"]["seed"] == 1
    assert cfg["bench"] == {"name": "t", "arm": "adamw_pc", "phase": "seed", "trial": "s1"}


def wandb_records(run_dir):
    """Decode the offline W&B log (LevelDB-style framing: 7-byte header, 32 KiB blocks, records with a
    crc32/length/type header) into wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, chunks, buf = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST
            chunks.append(buf)
            buf = b""
    records = []
    for chunk in chunks:
        r = pb.Record()
        r.ParseFromString(chunk)
        records.append(r)
    return records


def key(item):
    """A history/summary item's name: `key`, or the path in `nested_key` (what wandb 0.31 writes)."""
    return item.key or "/".join(item.nested_key)


def bench_cli(path, out, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["HOME"] = str(out.parent)  # no ~/.netrc: W&B's mode auto must choose offline
    return subprocess.run([sys.executable, "scripts/bench.py", path, "--out", str(out), "--no-report", *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False)


DIAG = {"every": 4, "power_iters": 3, "trace_samples": 2, "block_samples": 1}


def test_benchmark_runs_chooses_reruns_only_missing_and_refuses_other_workloads(kjv_dir, tmp_path):
    path, out = write(tmp_path, declaration(diagnostics=DIAG)), tmp_path / "bench_t"
    proc = bench_cli(path, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tune: 4 runs, 0 complete, 4 to run" in proc.stdout and "seed: 2 runs, 0 complete, 2 to run" in proc.stdout
    assert "diag: 2 runs, 0 complete, 2 to run" in proc.stdout

    runs = load_runs(out)
    assert sorted((r.phase, r.arm, r.trial) for r in runs) == [
        ("seed", "adamw", "s1"), ("seed", "muon", "s1"),
        ("tune", "adamw", "optimizer.lr=0.003"), ("tune", "adamw", "optimizer.lr=0.01"),
        ("tune", "muon", "optimizer.lr=0.02"), ("tune", "muon", "optimizer.lr=0.06")]
    bench = json.loads((out / "bench.json").read_text())
    for arm in ("adamw", "muon"):
        tune = [r for r in runs if r.phase == "tune" and r.arm == arm]
        best = min(tune, key=lambda r: r.final_loss)
        assert choose_best(tune).trial == best.trial == bench["chosen"][arm]["trial"]
        (seed_run,) = [r for r in runs if r.phase == "seed" and r.arm == arm]
        assert seed_run.setting == best.setting and (seed_run.seed, seed_run.data_seed) == (1, 1)
        assert all((r.seed, r.data_seed) == (0, 0) for r in tune)
        assert {r.summary["optimizer"] for r in tune + [seed_run]} == {arm}
    assert len({r.workload_hash for r in runs}) == 1

    # W&B (offline: no API key): grouped by benchmark, job type = arm, per-step metrics and summary fields
    rec = wandb_records(out / "runs" / "tune" / "muon" / "optimizer.lr=0.06")
    (run,) = [r.run for r in rec if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type, run.display_name) == ("t", "muon", "muon/optimizer.lr=0.06/s0")
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in rec
               if r.WhichOneof("record_type") == "history"]
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    metrics = [json.loads(line) for line in (out / "runs/tune/muon/optimizer.lr=0.06/metrics.jsonl").read_text().splitlines()]
    assert train_losses == [m["train_loss"] for m in metrics if "train_loss" in m]
    summary = {}
    for r in rec:
        if r.WhichOneof("record_type") == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in r.summary.update})
    local = json.loads((out / "runs/tune/muon/optimizer.lr=0.06/summary.json").read_text())
    assert summary["final_val_loss"] == local["final_val_loss"] and summary["steps"] == 8

    # the diag phase: the seed runs again with diagnostics, outside the statistics, with the same losses;
    # their diagnostics reach W&B as diag/... history keys equal to diagnostics.jsonl
    diag = load_runs(out, phases=("diag",))
    assert sorted((r.arm, r.trial) for r in diag) == [("adamw", "s1"), ("muon", "s1")]
    seed = {r.arm: r for r in runs if r.phase == "seed"}
    assert all(d.summary["final_val_loss"] == seed[d.arm].summary["final_val_loss"] for d in diag)
    assert all(seed[d.arm].summary["diagnostics_every"] == 0 and d.summary["diagnostics_every"] == 4 for d in diag)
    lines = [json.loads(x) for x in (out / "runs/diag/muon/s1/diagnostics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8]
    rec = wandb_records(out / "runs" / "diag" / "muon" / "s1")
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in rec
               if r.WhichOneof("record_type") == "history"]
    logged = [h["diag/hessian/lambda_max"] for h in history if "diag/hessian/lambda_max" in h]
    assert logged == [x["hessian"]["lambda_max"] for x in lines]
    assert any("diag/roles/attn_q/update_stable_rank" in h for h in history)
    from scripts.report import build_report

    report = build_report(out)["md"].read_text()
    assert "reproduce the seed runs' final validation loss exactly in 2 of 2 pairs" in report
    assert "## Diagnostics: why an optimizer wins" in report and (out / "plots/diagnostics_trajectories.png").is_file()

    # a re-run runs nothing and touches nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    proc = bench_cli(path, out)
    assert proc.returncode == 0 and "tune: 4 runs, 4 complete, 0 to run" in proc.stdout
    assert "seed: 2 runs, 2 complete, 0 to run" in proc.stdout and "diag: 2 runs, 2 complete, 0 to run" in proc.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("summary.json") if ".broken-" not in str(p)}

    # a broken run (killed before its summary) is moved aside, kept, and rerun; nothing else runs
    broken = out / "runs" / "tune" / "adamw" / "optimizer.lr=0.01"
    (broken / "summary.json").unlink()
    proc = bench_cli(path, out)
    assert proc.returncode == 0 and "tune: 4 runs, 3 complete, 1 to run" in proc.stdout
    assert (broken / "summary.json").is_file()
    (aside,) = broken.parent.glob("optimizer.lr=0.01.broken-*")
    assert (aside / "metrics.jsonl").is_file()
    assert len(load_runs(out)) == 6

    # another workload in the same directory is refused before any run, and nothing changes
    before = (out / "bench.json").read_text()
    other = write(tmp_path, declaration(overrides=["train.max_steps=10", "train.eval_every=5"]), "other.yaml")
    proc = bench_cli(other, out)
    assert proc.returncode == 2
    assert "holds benchmark results with overrides=" in proc.stderr and "never mixed" in proc.stderr
    assert (out / "bench.json").read_text() == before and len(load_runs(out)) == 6


def test_diverging_trial_is_recorded_and_never_stops_the_sweep(kjv_dir, tmp_path):
    d = declaration(trials=2, seeds=[1], launcher="basic", logger="none",
                    arms={"adamw": {"optimizer": "adamw", "grid": {"optimizer.lr": [3.0e-3, 1.0e3]}}})
    out = tmp_path / "bench_div"
    proc = bench_cli(write(tmp_path, d), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {(r.phase, r.trial): r for r in load_runs(out)}
    bad = runs[("tune", "optimizer.lr=1000.0")]
    assert bad.diverged and bad.final_loss == math.inf and bad.summary["diverged_reason"]
    assert json.loads((out / "bench.json").read_text())["chosen"]["adamw"]["trial"] == "optimizer.lr=0.003"
    assert not runs[("seed", "s1")].diverged


def test_slurm_launcher_composes_for_a_benchmark_phase(tmp_path):
    """No cluster here: the SLURM (submitit) launcher config of a real benchmark phase command must compose,
    with the benchmark's overrides, into Hydra's SlurmLauncher with the documented resources."""
    from scripts.bench import hydra_command

    b = load_bench(write(tmp_path, declaration(launcher="slurm")))
    out = tmp_path / "bench_s"
    (out / "conf" / "trial").mkdir(parents=True)
    names = []
    for i, r in enumerate(plan_runs(b, "tune")):
        names.append(f"tune__{r['arm']}__{i}")
        (out / "conf" / "trial" / f"{names[-1]}.yaml").write_text(trial_config(b, r))
    cmd = hydra_command(b, out, names)
    assert cmd[2] == "-m" and f"+trial={','.join(names)}" in cmd
    # --cfg prints the composed config of one job (it cannot be combined with -m and a sweep)
    cmd = [c if not c.startswith("+trial=") else f"+trial={names[0]}" for c in cmd if c != "-m"]
    cmd += ["hydra.launcher.partition=gpu", "--cfg", "hydra"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == ("gpu", 1, 1)
    assert launcher["submitit_folder"].endswith(".submitit/%j")
