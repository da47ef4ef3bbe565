"""Bad input, tried as a new user would: a table of overrides that train.py must refuse before any compute,
each with one line naming the key. Each case runs train.py's own path in-process (its preflight, then
prepare_run, catching what train.py's main catches), which is what `python train.py <override>` does up to
the first FLOP; tests/test_bad_input.py runs a sample of these through the real command line (one-line
stderr, exit 2, no traceback, no files) at ~5 s per launch.

    .venv/bin/python -m pytest tests/test_refusals.py -q
"""

import shutil

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from test_bad_input import CLI_DATA_CASES, DATA_CASES, snapshot

from data.shards import DataError
from harness.config.preflight import preflight
from harness.config.schema import ConfigError, register_configs
from harness.lifecycle.checkpoint import CheckpointError
from harness.lifecycle.prepare import SetupError, prepare_run
from runtime.distributed import LaunchError

BASE = ("experiment=smoke", "logger=none", "train.max_steps=4", "train.progress=false")
register_configs()  # train.py registers the schema at import; its preflight composes against it
REFUSED = (ConfigError, DataError, SetupError, CheckpointError, LaunchError)  # what train.py's main catches


def refusal(run_dir, *overrides: str) -> str | None:
    """train.py's error line for these overrides (None: the run would start)."""
    argv = [*BASE, f"hydra.run.dir={run_dir}", *overrides]
    problem = preflight(REPO / "conf", argv)
    if problem:
        return problem
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name="train"):
        dcfg = compose("config", overrides=["name=test", *(a for a in argv if not a.startswith("hydra."))])
    try:
        run = prepare_run(dcfg, run_dir)
    except REFUSED as e:
        return str(e)
    run.lock.release(remove=True)
    return None


CASES = [
    # unknown keys: the schema is closed, `+` included, with the close key named
    ("train.max_stepz=10", "train.max_stepz: Key 'max_stepz' not in 'TrainConfig' (did you mean train.max_steps?)"),
    ("+train.max_stepz=10", ("train.max_stepz: not a key of TrainConfig; nothing would read it (did you mean "
                            "train.max_steps?)")),
    ("+model.d_modle=64", "model.d_modle: not a key of ModelConfig; nothing would read it (did you mean model.d_model?)"),
    ("+schedule.warmup=3", ("schedule.warmup: not a key of ScheduleConfig; nothing would read it (did you mean "
                          "schedule.warmup_frac?)")),
    ("+optimizer.lrr=0.1", "optimizer.lrr:"),
    ("optimizer.lrr=0.1", "optimizer.lrr:"),
    ("+seeed=1", "seeed: not a key of Config; nothing would read it (did you mean seed?)"),
    # unknown group options
    ("optimizer=adamz", "optimizer=adamz: no conf/optimizer/adamz.yaml (options: adam_mini, adamw"),
    ("model=gpt9", "model=gpt9: no conf/model/gpt9.yaml"),
    ("schedule=cosin", "schedule=cosin: no conf/schedule/cosin.yaml"),
    ("data=fineweb", "data=fineweb: no conf/data/fineweb.yaml"),
    ("experiment=bench_nano", "experiment=bench_nano: no conf/experiment/bench_nano.yaml"),
    # wrong types, unparsable overrides
    ("train.max_steps=abc", "train.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.max_steps=[1", "cannot parse the override 'train.max_steps=[1'"),
    ("optimizer.lr=fast", "optimizer.lr: Value 'fast'"),
    ("model.n_layer=2.5", "model.n_layer: Value '2.5'"),
    # non-finite numbers
    ("optimizer.lr=inf", "optimizer.lr: must be a finite number (got inf)"),
    ("optimizer.lr=nan", "optimizer.lr: must be a finite number (got nan)"),
    ("optimizer.weight_decay=-inf", "optimizer.weight_decay: must be a finite number (got -inf)"),
    ("optimizer.betas=[0.9,inf]", "optimizer.betas.1: must be a finite number (got inf)"),
    ("train.grad_clip=inf", "train.grad_clip: must be a finite number (got inf)"),
    ("schedule.min_lr_frac=nan", "schedule.min_lr_frac: must be a finite number (got nan)"),
    ("train.target_loss=inf", "train.target_loss: must be a finite number (got inf)"),
    # values out of range
    ("train.max_steps=0", "train.max_steps: must be > 0 (got 0)"),
    ("train.max_steps=-1", "train.max_steps: must be > 0 (got -1)"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be > 0 (got 0)"),
    ("train.eval_every=0", "train.eval_every: must be > 0 (got 0)"),
    ("train.grad_clip=-1", "train.grad_clip: must be >= 0"),
    ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
    ("optimizer.lr=0", "optimizer.lr: must be > 0"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas: need two values in [0, 1)"),
    ("optimizer.eps=-1e-8", "optimizer.eps:"),
    ("optimizer.decay_groups=[hiden]", "optimizer.decay_groups: unknown groups ['hiden']"),
    ("optimizer=muon optimizer.backend=newton", "optimizer.backend: 'newton' is not one of"),
    ("optimizer=muon optimizer.momentum=1.0", "optimizer.momentum:"),
    ("optimizer=muon optimizer.qkv=stacked", "optimizer.qkv: 'stacked' is not one of"),
    ("schedule.warmup_frac=1.5", "schedule.warmup_frac: must be in [0, 1) (got 1.5)"),
    ("schedule.decay_frac=0", "schedule.decay_frac: must be in (0, 1] (got 0.0)"),
    ("schedule.min_lr_frac=2", "schedule.min_lr_frac: must be in [0, 1] (got 2.0)"),
    ("schedule.name=cosinus", "schedule.name: 'cosinus' is not one of"),
    ("train.eval_dense_frac=1.5", "train.eval_dense_frac: must be in [0, 1] (got 1.5)"),
    ("train.precision=fp8", "train.precision: 'fp8' is not auto, fp32 or bf16"),
    ("train.device=tpu", "train.device: 'tpu' is not auto, cpu, cuda or cuda:N"),
    ("train.parallel=zero3", "train.parallel: 'zero3' is not ddp or fsdp"),
    ("train.on_complete=overwrite", "train.on_complete: 'overwrite' is not refuse or skip"),
    ("train.on_crash=ignore", "train.on_crash: 'ignore' is not raise or record"),
    ("train.diverge_factor=1.0", "train.diverge_factor: must be > 1 (got 1.0)"),
    ("wandb.mode=cloud", "wandb.mode: 'cloud' is not auto, online or offline"),
    # cross-field constraints
    ("train.global_batch_size=7", "train.global_batch_size: 7 is not divisible by train.micro_batch_size"),
    ("train.seq_len=512", "train.seq_len: 512 exceeds the model's context model.block_size=256"),
    ("model.vocab_size=1000", "data.vocab_size: the tokenizer's 4096 tokens exceed model.vocab_size=1000"),
    ("train.ckpt_steps=[4]", "train.ckpt_steps: 4 is not in (0, train.max_steps=4)"),
    ("train.branch_step=2", "train.branch_step: 2 without train.branch_from"),
    ("model.n_head=3", "model.n_head: d_model=128 is not divisible by n_head=3"),
    ("hybrid.enabled=true hybrid.decay_groups=[hidden]", "hybrid.decay_groups: the shared group does not own"),
    # data that is not there
    ("data.dir=/nonexistent/kjv", "/nonexistent/kjv"),
]


def test_the_table_is_large_and_distinct():
    overrides = [o for o, _ in CASES]
    assert len(overrides) >= 40 and len(set(overrides)) == len(overrides)


@pytest.mark.parametrize("overrides, expected", CASES, ids=[o for o, _ in CASES])
def test_refused_before_compute_in_one_line_naming_the_key(kjv_dir, tmp_path, overrides, expected):
    run_dir = tmp_path / "run"
    message = refusal(run_dir, *overrides.split())
    assert message is not None, f"{overrides} was accepted"
    assert "\n" not in message, message
    assert message.startswith(expected) or (expected.startswith("/") and expected in message), message
    assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing written: no records, no lock left


def test_an_accepted_override_passes_the_same_path(kjv_dir, tmp_path):
    """The harness's refusal path is not refusing everything: a valid override reaches a prepared run."""
    assert refusal(tmp_path / "run", "optimizer.lr=0.002") is None


@pytest.mark.parametrize("case", [k for k in DATA_CASES if k not in CLI_DATA_CASES])
def test_damaged_data_is_refused_and_left_as_it_was(kjv_dir, tmp_path, case):
    """The data corruptions of tests/test_bad_input.py that are not launched there: refused in one line naming
    the file (the loader checks every shard before any compute), the data directory untouched."""
    corrupt, prefix, words = DATA_CASES[case]
    d = tmp_path / "kjv"
    shutil.copytree(kjv_dir, d)
    corrupt(d)
    before = snapshot(d)
    message = refusal(tmp_path / "run", f"data.dir={d}")
    assert message is not None and "\n" not in message, message
    assert message.startswith(prefix.format(d=d)) and all(w in message for w in words), message
    assert snapshot(d) == before
