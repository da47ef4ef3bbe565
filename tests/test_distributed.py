"""Multi-process data-parallel training on CPU (gloo, 2 processes): the same answer as one process, the
matrix optimizers' orthogonalization shared across ranks (counted), Newton-Muon's statistics all-reduced,
only rank 0 writing, and launches that would silently run one process refused."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, read_jsonl

from optimizers import ortho
from optimizers.muon import Muon, MuonSpec
from optimizers.newton_muon import NewtonMuon, NewtonMuonSpec
from optimizers.normuon import NorMuon, NorMuonSpec
from optimizers.polargrad import PolarGrad, PolarGradSpec
from runtime.distributed import shutdown

# fp32 tolerance of the equivalence (relative, on every logged loss). Measured here: 0 for AdamW, Muon,
# Newton-Muon and Adam-mini (bit-identical), 4.8e-7 absolute for PolarGrad (QDWH batched over 8 vs 16 matrices),
# 7e-8 relative on losses ~7. 1e-5 (84 eps) leaves room for 12 steps to amplify other kernels' rounding; a real
# difference (a rank's gradient missing, summed instead of averaged, another batch) is >= 1e-3 after one step.
RTOL = 1e-5
SMOKE = ["experiment=smoke", "logger=none"]


def env(**extra):
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **extra}


def launch(cmd, **extra):
    return subprocess.Popen(cmd, cwd=REPO, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:  # pytest shows these in full under the failure (its assertion message is cut short)
        print(out)
        print(err, file=sys.stderr)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    return out, err


def torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


EXTRA = {"newton_muon": ["optimizer.refresh_every=3"], "adamw+pc": ["model.pc_level=2"]}
DIAG = ["diagnostics.every=4", "diagnostics.power_iters=4", "diagnostics.trace_samples=2", "diagnostics.block_samples=1"]


# PolarGrad, Adam-mini and AdamW+PC are slow-marked (`make test-all`) to keep the default suite under 15
# minutes on the slower CI machines: Muon covers the shared orthogonalization, Newton-Muon the all-reduced
# statistics, AdamW the accelerate launch.
@pytest.mark.parametrize("optimizer, launcher", [
    ("adamw", "accelerate"), ("muon", "torchrun"), pytest.param("polargrad", "torchrun", marks=pytest.mark.slow),
    # Newton-Muon's statistics across ranks: step level in test_distributed_step_matches_and_each_rank_does_its_share
    pytest.param("newton_muon", "torchrun", marks=pytest.mark.slow),
    pytest.param("adam_mini", "torchrun", marks=pytest.mark.slow),
    pytest.param("adamw+pc", "torchrun", marks=pytest.mark.slow)])
def test_two_processes_give_the_one_process_losses(kjv_dir, tmp_path, optimizer, launcher):
    args = [*SMOKE, f"optimizer={optimizer.split('+')[0]}", *EXTRA.get(optimizer, [])]
    one, two = tmp_path / "one", tmp_path / "two"
    start = (torchrun(2) if launcher == "torchrun" else
             [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    # Muon's 2-process run also records diagnostics (rank 0, its own replica): its losses must still equal the
    # 1-process run's exactly, so DDP's hooks and collectives are untouched by the probes' extra autograd
    diag = [*DIAG] if optimizer == "muon" else []
    procs = [launch([sys.executable, "train.py", *args, f"hydra.run.dir={one}"]),
             launch([*start, "train.py", *args, *diag, f"hydra.run.dir={two}"])]
    finish(procs[0])
    out, _ = finish(procs[1])
    assert out.count("run dir") == 1 and out.count("done:") == 1  # rank 0 alone prints and writes
    assert "(4 micro x 1 accum x 2 proc)" in out
    a, b = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]  # same records, once each
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=RTOL), (ra["step"], key)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=RTOL)
    assert s2["workload_hash"] == s1["workload_hash"]  # the global batch is the workload's, not the launch's
    assert s2["final_val_loss"] < math.log(4096) - 0.5
    if diag:
        strip = [{k: v for k, v in r.items() if k != "train_time_s"} for r in a]
        assert strip == [{k: v for k, v in r.items() if k != "train_time_s"} for r in b]  # bit-identical
        lines = read_jsonl(two / "diagnostics.jsonl")
        assert [r["step"] for r in lines] == [4, 8, 12] and all(r["noise"]["pieces"] == 4 for r in lines)


def test_two_process_run_killed_and_relaunched_gives_the_one_process_losses(kjv_dir, tmp_path):
    """Rank 0 writes the checkpoints, every rank resumes from them: SIGKILL after step 7, relaunch, and the
    records equal an uninterrupted single-process run's."""
    args = [*SMOKE, "optimizer=muon", "train.ckpt_every=3"]
    ref = launch([sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'one'}"])
    cut = [*torchrun(2), "train.py", *args, f"hydra.run.dir={tmp_path / 'two'}"]
    killed = subprocess.run(cut, cwd=REPO, env=env(OPTBENCH_KILL_AT_STEP="7"), capture_output=True, text=True,
                            timeout=600, check=False)
    assert killed.returncode != 0 and not (tmp_path / "two" / "summary.json").exists()
    out, _ = finish(launch(cut))
    finish(ref)
    assert "resumed from" in out and "at step 6" in out

    def strip(d):
        return [{k: v for k, v in r.items() if k != "train_time_s"} for r in read_jsonl(d / "metrics.jsonl")]

    assert strip(tmp_path / "two") == strip(tmp_path / "one")  # measured bit-identical here (see RTOL)


# ---- the distributed step on the same gradient ----------------------------------------------------------

SHAPES = [(32, 16)] * 5 + [(16, 48)] * 2 + [(8, 8)]  # buckets of 5, 2 and 1: uneven shares, an idle rank


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


def _build(name, ps):
    kw = {"dtype": "fp32"}
    return {"muon": lambda: Muon(ps, MuonSpec(lr=0.02, **kw)),
            "normuon": lambda: NorMuon(ps, NorMuonSpec(lr=0.02, **kw)),
            "polargrad": lambda: PolarGrad(ps, PolarGradSpec(lr=0.1, backend="qdwh", ns_steps=None,
                                                             lr_scale="raw")),
            "newton_muon": lambda: NewtonMuon(ps, NewtonMuonSpec(lr=0.02, refresh_every=1, block_wide=False,
                                                                 **kw))}[name]()


def _inputs(rank, world):
    """Layer inputs of this rank's micro-batches (single process: all of them), per matrix."""
    g = torch.Generator().manual_seed(7)
    xs = [[torch.randn(3, 6, s[1], generator=g) for s in SHAPES] for _ in range(2)]  # 2 micro-batches
    return xs[rank::world]


def _step(name, ps, rank=0, world=1):
    opt = _build(name, ps)
    ortho.ORTHOGONALIZED["matrices"] = 0
    for _ in range(2):
        if name == "newton_muon":  # refresh_every=1: every step folds this step's inputs into K
            for micro in _inputs(rank, world):
                for p, x in zip(ps, micro):
                    opt.observe_input(p, x)
        opt.step()
    K = [opt.state[p]["K"].clone() for p in ps] if name == "newton_muon" else []
    return [p.detach().clone() for p in ps], ortho.ORTHOGONALIZED["matrices"] // 2, K


def _worker(rank, world, store, name, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    params, work, K = _step(name, _params(), rank, world)
    torch.save({"params": params, "work": work, "K": K}, f"{out}.{rank}")
    shutdown()  # barrier, destroy, os._exit(0): no gloo teardown during interpreter exit (it can abort)


@pytest.mark.parametrize("name", ["muon", "normuon", "polargrad", "newton_muon"])
def test_distributed_step_matches_and_each_rank_does_its_share(tmp_path, name):
    ref_params, ref_work, ref_K = _step(name, _params())
    assert ref_work == len(SHAPES)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), name, str(tmp_path / "out")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    # shares of ceil(n / 2) per shape bucket: 5 -> 3 + 2, 2 -> 1 + 1, 1 -> 1 + 0
    assert [r["work"] for r in results] == [5, 3] and sum(r["work"] for r in results) == ref_work
    for r in results:
        # Each rank orthogonalizes a batch of 3 or 2 matrices where one process batches 5: other kernel
        # blockings, so the updates lr O (|O| <= 1, lr <= 0.1) may differ by rounding, ~1e-6 of lr; a matrix
        # that gets another's update, or none, is off by ~lr |O| ~ 1e-2. p ~ N(0, 1): atol 1e-6, rtol 1e-5.
        for p, q in zip(r["params"], ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        # Newton-Muon: K from all ranks' inputs = the single-process K. With 2 ranks the all-reduce adds the
        # same two partial Gram sums the single process adds (one addition): bit-identical in practice, and
        # rtol 1e-6 (8 eps) allows a reduction in another order; without a rank's inputs K is O(1) off
        for k, k_ref in zip(r["K"], ref_K):
            torch.testing.assert_close(k, k_ref, rtol=1e-6, atol=1e-7)
    for p, q in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p, q)  # every rank applies the same gathered update


# ---- launches that would not be what they claim -----------------------------------------------------------

def test_accelerate_cpu_launch_of_one_process_is_refused(kjv_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process: refused, never a '2-process' record."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
                           *SMOKE, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "error: accelerate launch asked for 2 processes but started 1" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_accelerate_mixed_precision_is_refused_not_silently_applied(kjv_dir, tmp_path):
    """accelerate's --mixed_precision would autocast the forward through its model wrapper while the records
    say fp32: refused in one line before any compute (train.precision is the harness's setting)."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", "train.py",
                           *SMOKE, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0  # train.py exits 2; the launcher reports it as its own failure
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: accelerate launch --mixed_precision bf16: the harness sets precision itself")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("variable, value, message", [
    ("ACCELERATE_MIXED_PRECISION", "fp16", "accelerate launch --mixed_precision fp16: the harness sets precision"),
    ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "accelerate launch --dynamo_backend INDUCTOR: the harness compiles"),
])
def test_launcher_settings_that_change_numerics_are_refused(monkeypatch, variable, value, message):
    from runtime.distributed import LaunchError, init

    monkeypatch.setenv(variable, value)
    with pytest.raises(LaunchError, match=message):
        init("cpu")
    monkeypatch.setenv(variable, "no" if variable.endswith("PRECISION") else "NO")  # accelerate's defaults pass
    assert init("cpu")[0].type == "cpu"


FSDP = ["hydra.run.dir={d}", "train.parallel=fsdp"]


@pytest.mark.parametrize("world, extra, message", [
    (3, [], "error: hydra.run.dir: a multi-process run needs an explicit hydra.run.dir=PATH"),
    (3, ["hydra.run.dir={d}", "train.global_batch_size=8", "train.micro_batch_size=4"],
     "error: train.global_batch_size: 8 is not divisible by train.micro_batch_size x world size = 4 x 3"),
    (1, FSDP, "error: train.parallel=fsdp needs several processes (WORLD_SIZE is 1)"),
    (2, [*FSDP, "optimizer=adam_mini"], "error: optimizer: AdamMini does not run on FSDP-sharded parameters"),
    (2, [*FSDP, "model.pc_level=2"], "error: model.pc_level: PC layers are not supported with train.parallel=fsdp"),
    # FSDP checkpoints and resume: tests/test_fsdp_checkpoint.py; branches from them are not implemented
    (2, [*FSDP, "train.branch_from={d}_parent", "train.branch_step=4"],
     "error: train.branch_from: cooldown branches of train.parallel=fsdp runs are not implemented"),
    (2, [*FSDP, "diagnostics.every=4"], "error: diagnostics.every: diagnostics read whole weights"),
])
def test_multi_process_config_errors(tmp_path, world, extra, message):
    """Checked before the process group forms (WORLD_SIZE as a launcher sets it), so no rank waits."""
    proc = subprocess.run([sys.executable, "train.py", *SMOKE, *(e.format(d=tmp_path / "run") for e in extra)],
                          cwd=REPO, env=env(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0"), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# FSDP2 reduce-scatters gradients in another summation order than one process: largest loss difference
# measured here, AdamW 2.9e-6 and Muon with fp32 Newton-Schulz 1.9e-6 (absolute, losses ~6-8). With bf16
# Newton-Schulz (this CPU's auto choice) bf16 rounding amplifies it: Muon 2.0e-4, Newton-Muon 1.2e-4, and
# the weights drift 1.4% apart in 12 steps (fp32: 1.1e-4), so the test pins fp32.
FSDP_RTOL = 1e-5


@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])  # slow: make test-all
def test_fsdp_two_processes_match_one_process(kjv_dir, tmp_path, optimizer):
    args = [*SMOKE, f"optimizer={optimizer}", "train.ckpt_every=0"] + (["optimizer.dtype=fp32"] if optimizer == "muon"
                                                                       else [])
    one, two = tmp_path / "one", tmp_path / "two"
    procs = [launch([sys.executable, "train.py", *args, f"hydra.run.dir={one}"]),
             launch([*torchrun(2), "train.py", *args, "train.parallel=fsdp", f"hydra.run.dir={two}"])]
    finish(procs[0])
    finish(procs[1])
    a, b = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        key = "train_loss" if "train_loss" in ra else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=FSDP_RTOL), (ra["step"], key)
    # model_final.pt holds the whole (gathered) weights, not rank 0's shards
    w1, w2 = (torch.load(d / "model_final.pt", weights_only=True)["state_dict"] for d in (one, two))
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    for k in w1:  # relative Frobenius distance (the losses above bound the effect of the drift)
        assert (w2[k] - w1[k]).norm() <= 1e-3 * w1[k].norm() + 1e-6, k  # measured: <= 1.1e-4
