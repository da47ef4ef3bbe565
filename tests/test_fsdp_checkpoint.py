"""FSDP checkpoints (harness/lifecycle/checkpoint.py, torch.distributed.checkpoint), 2 processes on CPU gloo: the
sharded checkpoint round-trips every rank's model shards, optimizer state (Muon's whole momentum and the auxiliary
AdamW's sharded moments) and RNG exactly; a damaged one is refused in one line before any compute; another world
size or parallel mode is refused; and (slow) a train.parallel=fsdp run killed by SIGKILL and relaunched ends
bit-identical to the uninterrupted FSDP run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config.schema import register_configs, to_typed
from harness.config.validate import validate
from harness.lifecycle import checkpoint
from harness.lifecycle.checkpoint import CheckpointError
from harness.lifecycle.prepare import build_trainable, load_state
from runtime.distributed import Dist, shutdown

# Muon in fp32 (CombinedOptimizer: Muon's momentum kept whole on every rank, AdamW's moments sharded DTensors)
OVERRIDES = ["experiment=smoke", "logger=none", "optimizer=muon", "optimizer.dtype=fp32", "train.parallel=fsdp"]
FILES = {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"}
# conftest's REPO, not imported: mp.spawn's workers import this module, and conftest brings the benchmark stack
REPO = Path(__file__).resolve().parent.parent


def _config():
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name="test"):
        cfg = to_typed(compose("config", overrides=[*OVERRIDES, "name=test"]))
    return cfg, validate(cfg)


def _train(trainable, steps, rank, vocab):
    """Plain optimizer steps on this rank's share of random batches (the same on every launch)."""
    for step in steps:
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = (torch.randint(vocab, (2, 64), generator=g) for _ in range(2))
        _, loss = trainable.model(x, y)
        loss.backward()
        trainable.optimizer.step()
        trainable.optimizer.zero_grad(set_to_none=True)


def _flat(tree, key=""):
    """{path: leaf} of nested dicts and lists, each DTensor as this rank's shard."""
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in _flat(sub, f"{key}/{name}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{key}/{i}").items()}
    return {key: tree.to_local() if hasattr(tree, "to_local") else tree}


def _differences(a, b):
    fa, fb = _flat(a), _flat(b)
    if fa.keys() != fb.keys():
        return sorted(fa.keys() ^ fb.keys())
    return [k for k in fa if not (torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k])]


def _state(t):
    return {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict()}


def _worker(rank, world, store, cfg, spec, run_dir, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    d, cpu = Dist(rank=rank, world=world, fsdp=True), torch.device("cpu")
    first = build_trainable(cfg, spec, cpu, d)
    _train(first, [1, 2], rank, cfg.model.vocab_size)
    torch.manual_seed(1000 + rank)  # each rank's own stream: the checkpoint must keep every rank's
    fields = {"workload_hash": "test", "config": {}, "loop": {}, "metrics": []}
    saved = checkpoint.save_sharded(run_dir, 2, first.model, first.optimizer, d, fields if rank == 0 else {}, keep=1)
    draws = torch.rand(4)
    again = build_trainable(cfg, spec, cpu, d)  # a fresh model and optimizer, as a relaunch builds them
    path, payload = checkpoint.load_latest(run_dir)
    load_state(path, payload, again.model, again.optimizer)
    checkpoint.set_rng_state(payload["rng"])
    restored = _differences(_state(first), _state(again))
    _train(first, [3], rank, cfg.model.vocab_size)
    _train(again, [3], rank, cfg.model.vocab_size)
    torch.save({"saved": str(saved), "path": str(path), "draws": draws, "again": torch.rand(4),
                "restored": restored, "stepped": _differences(_state(first), _state(again)),
                "tensors": len(_flat(_state(first)))}, f"{out}.{rank}")
    shutdown()  # barrier, destroy, os._exit(0): no gloo teardown during interpreter exit (it can abort)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 2-process FSDP checkpoint after 2 steps, and what each rank found when it loaded it back (8-21 s here:
    the default suite's check; the end-to-end kill and relaunch below is slow-marked)."""
    tmp = tmp_path_factory.mktemp("fsdp_ckpt")
    cfg, spec = _config()
    (tmp / "run").mkdir()
    mp.spawn(_worker, args=(2, str(tmp / "store"), cfg, spec, tmp / "run", str(tmp / "out")), nprocs=2, join=True)
    return tmp / "run", [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(2)]


def test_sharded_checkpoint_round_trips_every_rank_exactly(sharded):
    run_dir, results = sharded
    (path,) = checkpoint.checkpoints(run_dir)
    assert path.name == "step_00000002.dcp" and {p.name for p in path.iterdir()} == FILES
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # renamed into place
    assert [r["saved"] for r in results] == [str(path), "None"] and {r["path"] for r in results} == {str(path)}
    for r in results:
        assert r["tensors"] > 50 and r["restored"] == []  # every shard, moment, momentum and count, exactly
        assert r["stepped"] == []  # and the next step from the restored state is the original's, bit for bit
        assert torch.equal(r["again"], r["draws"])  # this rank's RNG stream continues where it was saved
    assert not torch.equal(results[0]["draws"], results[1]["draws"])  # two streams, each kept for its rank
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["layout"] == {"parallel": "fsdp", "world": 2} and len(state["rng"]) == 2 and state["step"] == 2


def _damaged(run_dir, tmp_path, how):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (path,) = checkpoint.checkpoints(copy)
    if how == "truncated shard":
        shard = path / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "no metadata":
        (path / ".metadata").unlink()
    elif how == "truncated state":
        (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:100])
    return copy


@pytest.mark.parametrize("how, message", [
    ("truncated shard", "unreadable checkpoint, truncated or corrupt (__1_0.distcp: "),
    ("no metadata", "unreadable checkpoint, truncated or corrupt (.metadata: FileNotFoundError"),
    ("truncated state", "unreadable checkpoint, truncated or corrupt ("),
])
def test_damaged_sharded_checkpoint_is_one_line(sharded, tmp_path, how, message):
    copy = _damaged(sharded[0], tmp_path, how)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_latest(copy)
    assert str(e.value).startswith(f"{copy}/checkpoints/step_00000002.dcp: {message}")
    assert "\n" not in str(e.value) and str(e.value).endswith("move it away (or the run directory) to start afresh")


def test_another_world_size_or_parallel_mode_is_refused(sharded):
    path = checkpoint.checkpoints(sharded[0])[-1]
    payload = checkpoint.load(path)
    checkpoint.check_layout(path, payload, Dist(rank=0, world=2, fsdp=True))  # the same layout resumes
    for other, this in [(Dist(rank=0, world=4, fsdp=True), "train.parallel=fsdp with 4 process(es)"),
                        (Dist(rank=0, world=2), "not train.parallel=fsdp with 2 process(es)"),
                        (Dist(), "not train.parallel=fsdp with 1 process(es)")]:
        with pytest.raises(CheckpointError, match="relaunch with train.parallel=fsdp on 2 processes") as e:
            checkpoint.check_layout(path, payload, other)
        assert str(e.value) == (f"{path}: checkpoint of a 2-process train.parallel=fsdp run, this launch is {this}; "
                                "relaunch with train.parallel=fsdp on 2 processes to resume")
    single = {k: v for k, v in payload.items() if k != "layout"}  # a single-file (DDP) checkpoint's payload
    checkpoint.check_layout(path, single, Dist(rank=0, world=4))  # DDP resumes at any world size (as before)
    with pytest.raises(CheckpointError, match="a train.parallel=fsdp launch resumes only from its own step_<N>.dcp"):
        checkpoint.check_layout(path, single, Dist(rank=0, world=2, fsdp=True))


# ---- end to end: train.py under torchrun -------------------------------------------------------------------

def _env(**extra):
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **extra}


def _train_cmd(run_dir, procs=2):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    return [*launcher, "train.py", *OVERRIDES, "train.ckpt_every=3", f"hydra.run.dir={run_dir}"]


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "train_time_s"} for x in lines]


@pytest.mark.slow  # 3 torchrun launches and a 1-process refusal: 39-68 s here (2 shared cores)
def test_fsdp_sigkill_and_relaunch_is_bit_identical(kjv_dir, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    procs = [subprocess.Popen(_train_cmd(ref), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True),
             subprocess.Popen(_train_cmd(cut), cwd=REPO, env=_env(OPTBENCH_KILL_AT_STEP="7"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    (_, err0), (_, err1) = procs[0].communicate(timeout=600), procs[1].communicate(timeout=600)
    assert procs[0].returncode == 0, err0[-3000:]
    assert procs[1].returncode != 0 and "Signal 9 (SIGKILL)" in err1, err1[-3000:]
    assert [p.name for p in checkpoint.checkpoints(cut)] == ["step_00000003.dcp", "step_00000006.dcp"]
    assert not (cut / "summary.json").exists()
    # a single-process (DDP) relaunch of the FSDP run is refused in one line, nothing touched
    single = subprocess.run([sys.executable, "train.py", *OVERRIDES[:-1], "train.ckpt_every=3",
                             f"hydra.run.dir={cut}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    (line,) = [x for x in single.stderr.splitlines() if x.startswith("error: ")]
    assert single.returncode == 2 and "Traceback" not in single.stderr
    assert line == (f"error: {cut}/checkpoints/step_00000006.dcp: checkpoint of a 2-process train.parallel=fsdp run, "
                    "this launch is not train.parallel=fsdp with 1 process(es); relaunch with train.parallel=fsdp on "
                    "2 processes to resume")

    proc = subprocess.run(_train_cmd(cut), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
                          check=False)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {cut}/checkpoints/step_00000006.dcp at step 6" in proc.stdout
    assert _losses(cut) == _losses(ref)  # bit-identical: every loss, norm and lr
    s, s_ref = (json.loads((d / "summary.json").read_text()) for d in (cut, ref))
    assert s["final_val_loss"] == s_ref["final_val_loss"] and s["resumed_from_steps"] == [6]
    assert s["world_size"] == s_ref["world_size"] == 2
    w, w_ref = (torch.load(d / "model_final.pt", weights_only=True)["state_dict"] for d in (cut, ref))
    assert w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w)  # the whole (gathered) weights
    assert not (cut / "checkpoints").exists()  # complete records: checkpoints removed (ckpt_keep_final=false)


@pytest.mark.slow  # a torchrun launch that finds the damage, then trains afresh: 17-27 s here
def test_damaged_fsdp_checkpoint_in_a_benchmark_is_moved_aside_and_rerun(kjv_dir, sharded, tmp_path):
    """train.on_broken=move_aside under torchrun: a truncated shard is found by every rank before any compute, rank
    0 moves the run aside, and the run starts afresh."""
    copy = _damaged(sharded[0], tmp_path, "truncated shard")
    proc = subprocess.run([*_train_cmd(copy), "train.on_broken=move_aside"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unreadable checkpoint, truncated or corrupt (__1_0.distcp" in proc.stdout and "moved to" in proc.stdout
    (aside,) = tmp_path.glob("run.broken-*")
    assert [p.name for p in checkpoint.checkpoints(aside)] == ["step_00000002.dcp"]
    assert json.loads((copy / "summary.json").read_text())["resumed_from_steps"] == []
