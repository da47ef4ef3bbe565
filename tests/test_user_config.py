"""A user's own config directory outside the repository (OPTBENCH_CONFIG_PATH, harness/config/search.py): an
optimizer spec and its YAML, a model and an experiment YAML, a benchmark declaration, found by every entry
point: the preflight, train.py (one real launch, from the user's directory), the benchmark's declaration and
its multirun command, perf's optimizer list, gpu_check's composition; a wrong entry is one line everywhere.

    .venv/bin/python -m pytest tests/test_user_config.py -q
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir

from bench.declaration import BenchError, load_bench
from bench.launch import hydra_command
from bench.plan import seed_runs, trial_config
from harness.config import search
from harness.config.preflight import preflight
from harness.config.schema import ConfigError, register_configs
from scripts import gpu_check, perf, report

register_configs()  # train.py registers the schema at import; its preflight composes against it
SPEC = '''"""A user's optimizer: plain SGD on every group, from a spec of two knobs."""
from dataclasses import dataclass

import torch

from optimizers.hparams import Spec, knob


@dataclass
class MySGDSpec(Spec):
    lr: float = knob(0.05, gt=0)
    weight_decay: float = knob(0.0, ge=0)

    def build(self, split):
        groups = [{"params": split.params(g)} for g in split.groups if split.params(g)]
        return torch.optim.SGD(groups, lr=self.lr, weight_decay=self.weight_decay)
'''
MODEL = {"family": "gpt2", "n_layer": 1, "n_head": 2, "d_model": 32, "vocab_size": 4096, "block_size": 64}
EXPERIMENT = ("# @package _global_\nexperiment: user_smoke\ndefaults:\n  - override /model: user_micro\n"
              "train: {max_steps: 2, seq_len: 32, global_batch_size: 4, micro_batch_size: 4, eval_every: 2,"
              " eval_batch_size: 4, progress: false}\ndata: {val_tokens: 1024}\n")
AXIS = {"low": 1.0e-3, "high": 1.0, "step": 3.1623, "source": "test"}
BENCH = {"name": "user_bench", "protocol": 2, "experiment": "user_smoke", "budgets": [1, 2, 3],
         "hybrid": {"lr": 1.0e-3, "source": "test"}, "search": {"method": "coordinate", "trials": 2},
         "reference": "adamw", "logger": "none",
         "arms": {"adamw": {"optimizer": "adamw", "space": {"optimizer.lr": {**AXIS, "default": 1.0e-2},
                                                           "optimizer.weight_decay": {**AXIS, "default": 0.1}}},
                  "mysgd": {"optimizer": "mysgd", "space": {"optimizer.lr": {**AXIS, "default": 0.05},
                                                           "optimizer.weight_decay": {**AXIS, "default": 0.01}}}}}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's directory, laid out like conf/, with its code at the top (importable as optbench_user_sgd)."""
    d = tmp_path_factory.mktemp("home") / "my_conf"
    for group in ("optimizer", "model", "experiment", "bench"):
        (d / group).mkdir(parents=True)
    (d / "optbench_user_sgd.py").write_text(SPEC)
    (d / "optimizer" / "mysgd.yaml").write_text("_target_: optbench_user_sgd.MySGDSpec\nlr: 0.05\n")
    (d / "model" / "user_micro.yaml").write_text(yaml.safe_dump(MODEL))
    (d / "experiment" / "user_smoke.yaml").write_text(EXPERIMENT)
    (d / "bench" / "user_bench.yaml").write_text(yaml.safe_dump(BENCH))
    return d


@pytest.fixture
def on_path(user, monkeypatch):
    monkeypatch.setenv(search.ENV, str(user))
    return user


def test_the_user_directory_comes_after_conf_and_joins_hydras_one_search_path(on_path):
    assert search.config_dirs() == [search.CONF, on_path]
    assert search.find("optimizer", "mysgd") == on_path / "optimizer" / "mysgd.yaml"
    assert search.find("optimizer", "adamw") == search.CONF / "optimizer" / "adamw.yaml"
    assert search.find("optimizer", "nosuch") is None
    assert {"adamw", "muon", "mysgd"} <= set(search.options("optimizer"))
    url = f"file://{on_path}"
    new = f"hydra.searchpath=[{url}]"  # with the overrides, which Hydra's parser wants together; else first
    assert search.with_user_dirs(["-m", "optimizer=mysgd,adamw"]) == ["-m", new, "optimizer=mysgd,adamw"]
    assert search.with_user_dirs(["--cfg", "job"]) == [new, "--cfg", "job"]
    given = ["x=1", "hydra.searchpath=[file:///elsewhere]"]  # Hydra reads only the first: the same list
    assert search.with_user_dirs(given) == ["x=1", f"hydra.searchpath=[file:///elsewhere,{url}]"]
    assert search.with_user_dirs(search.with_user_dirs(given)) == search.with_user_dirs(given)
    assert str(on_path) in sys.path and sys.path.index(str(on_path)) > sys.path.index(str(REPO))


def test_a_wrong_entry_or_a_second_file_of_one_name_is_one_line(on_path, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    for entry, message in [(tmp_path / "nowhere", "does not exist"),
                           (tmp_path / "a_file", "is not a directory")]:
        monkeypatch.setenv(search.ENV, f"{on_path}{os.pathsep}{entry}")
        expected = (f"{search.ENV}: {entry} {message} (a list of config directories laid out like conf/, "
                    f"separated by {os.pathsep!r})")
        assert preflight(search.CONF, ["optimizer=mysgd"]) == expected
        assert preflight(search.CONF, ["-m", "optimizer=mysgd"]) == expected  # flags skip composing only
        with pytest.raises(BenchError, match=f"^{search.ENV}: {entry} {message}"):
            load_bench("user_bench")
    shadow = tmp_path / "shadow"
    (shadow / "optimizer").mkdir(parents=True)
    (shadow / "optimizer" / "adamw.yaml").write_text("lr: 1.0\n")
    monkeypatch.setenv(search.ENV, str(shadow))
    with pytest.raises(ConfigError) as e:
        search.user_dirs()
    assert str(e.value) == (f"{search.ENV}: {shadow / 'optimizer' / 'adamw.yaml'} has the name of "
                            f"{search.CONF / 'optimizer' / 'adamw.yaml'}: a config name means one file across "
                            "conf/ and the user's directories; rename yours")
    monkeypatch.setenv(search.ENV, str(tmp_path / "nowhere"))
    assert report.main([str(tmp_path)]) == 2  # scripts/report.py: the same line, exit 2


def test_preflight_takes_the_users_options_and_names_the_user_directory(on_path, tmp_path, monkeypatch):
    argv = ["experiment=user_smoke", "optimizer=mysgd", f"hydra.run.dir={tmp_path / 'run'}"]
    assert preflight(search.CONF, argv) is None
    missing = preflight(search.CONF, [*argv, "optimizer=nosuch"])
    assert missing.startswith(f"optimizer=nosuch: no conf/optimizer/nosuch.yaml nor optimizer/nosuch.yaml under "
                              f"{search.ENV} (options: ") and "mysgd" in missing
    monkeypatch.delenv(search.ENV)
    assert preflight(search.CONF, argv).startswith("experiment=user_smoke: no conf/experiment/user_smoke.yaml")
    # Hydra's own search path on the command line works too (the directory's code is then the user's to import)
    assert preflight(search.CONF, [f"hydra.searchpath=[file://{on_path}]", *argv]) is None


def test_train_py_trains_from_the_users_directory(on_path, kjv_dir):
    """One real launch, from the user's home (the variable relative to it), as a user would type it."""
    env = {**os.environ, search.ENV: on_path.name, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=user_smoke", "optimizer=mysgd", "logger=none",
           f"data.dir={kjv_dir}", "hydra.run.dir=run"]
    proc = subprocess.run(cmd, cwd=on_path.parent, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((on_path.parent / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["optimizer"] == "mysgd" and summary["experiment"] == "user_smoke"
    assert summary["optimizer_target"] == "optbench_user_sgd.MySGDSpec" and summary["optimizer_class"] == "SGD"
    config = yaml.safe_load((on_path.parent / "run" / "config.yaml").read_text())
    assert {k: config["model"][k] for k in MODEL} == MODEL and config["optimizer"]["lr"] == 0.05


def test_a_user_benchmark_is_declared_planned_and_its_multirun_composes(on_path, tmp_path, capsys):
    b = load_bench("user_bench")
    assert b.name == "user_bench" and b.arms["mysgd"].optimizer == "mysgd" and b.schedule["name"] == "cosine"
    from scripts import bench as bench_script

    assert bench_script.main(["user_bench", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "mysgd" in capsys.readouterr().out and not (tmp_path / "out").exists()
    out = tmp_path / "out"
    run = seed_runs(b, "mysgd", {"optimizer.lr": 0.05, "optimizer.weight_decay": 0.01})[0]
    hybrid = {k: v for k, v in asdict(b.hybrid).items() if k not in ("source", "from_reference")}
    (out / "conf" / "trial").mkdir(parents=True)
    (out / "conf" / "trial" / "x.yaml").write_text(trial_config(b, run, hybrid, out))
    cmd = hydra_command(b, out, ["x"])
    searchpath = [a for a in cmd if a.startswith("hydra.searchpath=")]
    assert searchpath == [f"hydra.searchpath=[file://{out.resolve() / 'conf'},file://{on_path}]"]
    with initialize_config_dir(config_dir=str(search.CONF), version_base="1.3", job_name="t"):
        cfg = compose("config", overrides=[f"experiment={b.experiment}", *searchpath, "+trial=x",
                                           "logger=none"])
    assert cfg.optimizer._target_ == "optbench_user_sgd.MySGDSpec" and cfg.optimizer.weight_decay == 0.01
    assert cfg.model.d_model == MODEL["d_model"] and cfg.bench.arm == "mysgd"


def test_perf_and_gpu_check_see_the_users_optimizer(on_path, tmp_path):
    names = perf.optimizer_names()
    assert names[0] == "adamw" and "mysgd" in names
    overrides = ["experiment=user_smoke", "optimizer=mysgd", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    train = [sys.executable, "train.py"]  # a planned command, as its dry run checks it
    assert gpu_check.command_error([*train, *overrides]) is None  # composed, typed and validated as train.py would
    assert gpu_check.command_error([*train, *overrides, "optimizer.lr=-1"]) == "optimizer.lr: must be > 0 (got -1.0)"
