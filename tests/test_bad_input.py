"""Bad input through the real command line (`python train.py ...` in a subprocess, as a user runs it).

Every refusal must: exit non-zero; print one stderr line `error: ...` naming the problem (the key, the file);
print no Python traceback; start no training (no banner on stdout, no metrics.jsonl / summary.json); and
leave every file that was there before untouched (hashed before and after).
Hydra's own composition errors (unknown key, unknown group option, a value of the wrong type for a typed
field, an unparsable override, a run directory that cannot be created) are caught first by train.py's
preflight (harness/config/preflight.py), in the same one-line form.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_bad_input.py -q
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_train

from data.shards import open_shard, sha256_file, write_shard

RECORDS = ("metrics.jsonl", "summary.json")
BANNER = "run dir"  # the first line of train.py's start banner (harness/lifecycle/prepare.py: banner)
FAST = ("train.max_steps=4", "train.progress=false")


def snapshot(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under root ({} if root does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_no_training(proc, run_dir) -> None:
    """No start banner; no records in run_dir (None: the caller compares the run dir's hashes instead)."""
    assert BANNER not in proc.stdout, proc.stdout[-2000:]
    if run_dir is not None:
        assert not any((Path(run_dir) / f).exists() for f in RECORDS)


def assert_refused(proc, run_dir, prefix: str, *words: str) -> None:
    """(a) non-zero exit, (c) no traceback, (d) no training, then (b): exactly one `error: ` line on stderr,
    starting with `prefix` (which names the key or file) and containing `words`."""
    output = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode != 0, output
    assert "Traceback" not in proc.stderr, output
    assert_no_training(proc, run_dir)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert errors[0].startswith(prefix), output
    for word in words:
        assert word in errors[0], output


# ---- 1. configuration -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, prefix", [
    ("train.max_stepz=3", ("error: train.max_stepz: Key 'max_stepz' not in 'TrainConfig' (did you mean "
                          "train.max_steps?)")),
    ("optimizer=adamz", "error: optimizer=adamz: no conf/optimizer/adamz.yaml (options: adam_mini, adamw"),
    ("train.max_steps=[1", "error: cannot parse the override 'train.max_steps=[1'"),
])
def test_composition_error_is_one_line_naming_the_key(kjv_dir, tmp_path, override, prefix):
    """What Hydra would reject in several lines is caught by train.py's preflight (harness/config/preflight.py)
    before Hydra creates the run directory."""
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *FAST, override, check=False)
    assert_refused(proc, run_dir, prefix)
    assert proc.returncode == 2
    assert not run_dir.exists()


# The full table of refused overrides (58) runs in-process through the same path in tests/test_refusals.py; these
# launches check the command line's side: one stderr line, exit 2, no traceback, no directory left.
@pytest.mark.parametrize("override, prefix", [
    # the optimizer node is typed by its own spec (harness/config/validate.py build_optimizer_spec), so a wrong type
    # there is caught by train.py, not by Hydra
    ("optimizer.lr=fast", "error: optimizer.lr: Value 'fast'"),
    ("optimizer.lr=inf", "error: optimizer.lr: must be a finite number (got inf)"),
    ("+train.max_stepz=10", ("error: train.max_stepz: not a key of TrainConfig; nothing would read it (did you mean "
                            "train.max_steps?)")),
    # the tokenizer's vocabulary (data.vocab_size = 4096) does not fit the model's embedding
    ("model.vocab_size=1000", "error: data.vocab_size: the tokenizer's 4096 tokens exceed model.vocab_size=1000"),
])
def test_bad_config_value_is_refused(kjv_dir, tmp_path, override, prefix):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *FAST, override, check=False)
    assert_refused(proc, run_dir, prefix)
    assert proc.returncode == 2
    assert not run_dir.exists()  # Hydra made it for this run; train.py leaves no empty directory behind


# ---- 2. data --------------------------------------------------------------------------------------------

def _set_int32(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data))


def _out_of_vocab_ids(d: Path, shard: str, meta: str) -> None:
    """Put token id 5000 (the model has 4096 embeddings) into `shard`; then meta.json is made consistent with
    the new shard ("update"), deleted so the loader scans the shards ("remove"), or left stale ("stale")."""
    tokens = np.array(open_shard(str(d / shard)))
    tokens[:64] = 5000
    write_shard(str(d / shard), tokens)
    if meta == "remove":
        (d / "meta.json").unlink()
    elif meta == "update":
        m = json.loads((d / "meta.json").read_text())
        m["max_token_id"] = 5000
        for r in m["train_shards"] + m["val_shards"]:
            if r["file"] == shard:
                r["sha256"] = sha256_file(str(d / shard))
        (d / "meta.json").write_text(json.dumps(m, indent=1))


# Three through the command line; the other corruptions (a missing val shard, a wrong magic or version, ids beyond
# the vocabulary with meta.json absent or stale) run in-process through the same path in tests/test_refusals.py.
DATA_CASES = {
    "train shard missing": (lambda d: (d / "train_000000.bin").unlink(), "{d}/train_*.bin: no shard matches",
                            ["python -m data.prepare"]),
    "val shard missing": (lambda d: (d / "val_000000.bin").unlink(), "{d}/val_*.bin: no shard matches",
                          ["python -m data.prepare"]),
    "truncated shard": (lambda d: (d / "train_000000.bin").write_bytes((d / "train_000000.bin").read_bytes()[:-1]),
                        "{d}/train_000000.bin: header says", ["(truncated)"]),
    "wrong magic": (lambda d: _set_int32(d / "train_000000.bin", 0, 12345), "{d}/train_000000.bin: unknown magic 12345",
                    []),
    "wrong version": (lambda d: _set_int32(d / "val_000000.bin", 4, 2),
                      "{d}/val_000000.bin: magic 20240520 with version 2, expected 1", []),
    # the data-level vocabulary check: every shard is scanned (data/loader.py shard_max_ids), whatever
    # meta.json says (consistent with the edited shard, absent, or stale)
    "token id beyond vocab": (lambda d: _out_of_vocab_ids(d, "train_000000.bin", "update"),
                              "{d}/train_000000.bin: holds token id 5000, outside model.vocab_size=4096", []),
    "token id beyond vocab, no meta": (lambda d: _out_of_vocab_ids(d, "train_000000.bin", "remove"),
                                       "{d}/train_000000.bin: holds token id 5000, outside model.vocab_size=4096", []),
    "token id beyond vocab, stale meta": (lambda d: _out_of_vocab_ids(d, "val_000000.bin", "stale"),
                                          "{d}/val_000000.bin: holds token id 5000, outside model.vocab_size=4096", []),
}
CLI_DATA_CASES = ("train shard missing", "truncated shard", "token id beyond vocab")


@pytest.mark.parametrize("corrupt, prefix, words", [pytest.param(*DATA_CASES[k], id=k) for k in CLI_DATA_CASES])
def test_bad_data_is_refused(kjv_dir, tmp_path, corrupt, prefix, words):
    d = tmp_path / "kjv"
    shutil.copytree(kjv_dir, d)
    corrupt(d)
    before = snapshot(d)
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *FAST, f"data.dir={d}", check=False)
    assert snapshot(d) == before
    assert_refused(proc, run_dir, "error: " + prefix.format(d=d), *words)
    assert proc.returncode == 2
    assert not run_dir.exists()


# ---- 3. output directory that cannot be written ---------------------------------------------------------

@pytest.mark.parametrize("where", [
    "below a file",  # caught by the preflight: Hydra would create it with a traceback
    "in /proc",
    # an existing directory no one can create files in (sysfs refuses even root): train.py's check fires
    pytest.param("/sys", marks=pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs")),
])
def test_unwritable_run_dir_is_refused(kjv_dir, tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    run_dir = {"below a file": afile / "run", "in /proc": Path("/proc/optbench_run"), "/sys": Path("/sys")}[where]
    before = snapshot(tmp_path)
    proc = run_train(run_dir, *FAST, check=False)
    assert snapshot(tmp_path) == before
    assert not Path("/proc/optbench_run").exists()
    if where == "/sys":
        assert_refused(proc, run_dir, f"error: run directory {run_dir}", "not writable")
    else:
        assert_refused(proc, run_dir, f"error: hydra.run.dir: cannot create {run_dir}")
    assert proc.returncode == 2


# ---- 4. a run directory holding a complete run of another workload --------------------------------------

@pytest.fixture(scope="module")
def finished_run(kjv_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_train(run_dir, *FAST)  # max_steps=4
    assert (run_dir / "summary.json").is_file()
    return run_dir


@pytest.mark.parametrize("overrides, prefix", [
    pytest.param([], "already holds summary.json", id="plain"),
    # a benchmark re-run (bench/launch.py passes train.on_complete=skip) must not mix workloads
    pytest.param(["train.on_complete=skip"], "holds a complete run of another workload", id="on_complete_skip"),
])
def test_run_dir_of_another_workload_is_refused(finished_run, overrides, prefix):
    parent = finished_run.parent
    before, siblings = snapshot(parent), sorted(os.listdir(parent))
    proc = run_train(finished_run, "train.max_steps=6", "train.progress=false", *overrides, check=False)
    assert snapshot(parent) == before  # every record byte-identical
    assert sorted(os.listdir(parent)) == siblings  # nothing moved aside
    assert_refused(proc, None, f"error: run directory {finished_run} {prefix}")
    assert proc.returncode == 2


# ---- 5. W&B unreachable -----------------------------------------------------------------------------------

@pytest.mark.slow  # ~20 s (W&B's own timeouts); test_train's W&B failure test stays in the default suite
def test_wandb_unreachable_keeps_local_records(kjv_dir, tmp_path):
    """Online W&B with a well-formed but bogus key and a server that is not there (port 9, nothing listens,
    no network needed): the run must finish with complete local records and say on stderr that W&B is off."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HYDRA_FULL_ERROR": "0", "WANDB_API_KEY": "deadbeef" * 5, "WANDB_BASE_URL": "http://127.0.0.1:9",
                **{f"WANDB_{k}_DIR": str(tmp_path / "wandb_home" / k.lower()) for k in ("CONFIG", "CACHE", "DATA")}})
    overrides = ["wandb.enabled=true", "wandb.mode=online", "wandb.init_timeout=5"]  # the login check adds ~10 s
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run_dir}",
                               "logger=none", *FAST, *overrides],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("train.py with an unreachable W&B server did not finish in 120 s (W&B's init timeout)")
    elapsed = time.monotonic() - t0
    output = f"{elapsed:.0f} s, rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, output
    assert "Traceback" not in proc.stderr, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and not summary["diverged"] and summary["workload_hash"]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1] == 4
    (warning,) = [line for line in proc.stderr.splitlines() if "W&B disabled" in line]
    assert warning.startswith("warning: W&B disabled for this run (") and warning.endswith("local records only"), output
