"""Where `data.dir` points: a relative path is relative to the launch directory (Hydra's original working
directory inside a job), the shipped configs' `${repo:...}` caches are this repository's from any working
directory, and the workload hash does not depend on the path. And the command each kind of data config names
when its directory is missing (KJV, FineWeb-10B, a Hugging Face dataset).

    .venv/bin/python -m pytest tests/test_data_paths.py -q
"""

import json

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from data.config import DataConfig
from data.loader import TokenData
from data.prepare import rebuild_command
from data.shards import DataError
from harness.config.schema import register_configs
from harness.lifecycle.prepare import prepare_run

CONF = REPO / "conf" / "data"


def data_config(name: str, **overrides) -> DataConfig:
    """conf/data/NAME.yaml with `overrides` on top, as Hydra composes the `data` group."""
    node = OmegaConf.merge(DataConfig, OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    return OmegaConf.to_object(node)


@pytest.mark.parametrize("name, cache", [("kjv", "kjv"), ("fineweb10b", "fineweb10B"),
                                         ("fineweb_edu", "fineweb-edu")])
def test_shipped_dirs_are_the_repositorys_from_any_cwd(tmp_path, monkeypatch, name, cache):
    monkeypatch.chdir(tmp_path)
    cfg = data_config(name)
    assert cfg.dir == cfg.resolve_dir() == str(REPO / "data" / "cache" / cache)


def test_a_relative_dir_is_taken_from_the_launch_dir(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert DataConfig(dir="mydata").resolve_dir() == str(tmp_path / "work" / "mydata")
    assert DataConfig(dir="../x/./y").resolve_dir() == str(tmp_path / "x" / "y")
    assert DataConfig(dir="/abs/kjv").resolve_dir() == "/abs/kjv"
    # In a Hydra job the launch dir is Hydra's original cwd, also when hydra.job.chdir=true moved the process
    hydra = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
    hydra.hydra.runtime.cwd = str(tmp_path / "launch")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored (uninitialised) after the test
    HydraConfig.instance().set_config(hydra)
    assert DataConfig(dir="mydata").resolve_dir() == str(tmp_path / "launch" / "mydata")


def test_prepare_run_reads_a_relative_dir_from_the_cwd_with_the_same_workload_hash(kjv_dir, tmp_path, monkeypatch):
    register_configs()

    def prepared(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name="test"):
            dcfg = compose("config", overrides=["experiment=smoke", "logger=none", "name=test", "train.threads=1",
                                                *overrides])
        run = prepare_run(dcfg, tmp_path / f"run{len(overrides)}")
        run.lock.release(remove=True)
        return run

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mydata").symlink_to(kjv_dir)  # the default data under a relative name
    monkeypatch.chdir(tmp_path / "work")
    default, relative = prepared(), prepared("data.dir=mydata")
    assert (default.data.dir, relative.data.dir) == (str(kjv_dir), str(tmp_path / "work" / "mydata"))
    assert default.workload_hash == relative.workload_hash
    # config.yaml (the resolved config) names the directory read, absolute: readers (export_hf, the report) need
    # no working directory to find it
    assert relative.resolved["data"]["dir"] == str(tmp_path / "work" / "mydata")
    assert str(REPO) not in json.dumps(default.workload) and "mydata" not in json.dumps(relative.workload)


FINEWEB10B = ("in a modded-nanogpt checkout run `python data/cached_fineweb10B.py 9` (downloads the val shard and "
              "900M training tokens from the Hugging Face Hub), then move or link its data/fineweb10B/*.bin into {d}/")
FINEWEB_EDU = ("python -m data.prepare hf --dataset HuggingFaceFW/fineweb-edu --config sample-10BT --tokenizer gpt2 "
               "--out {d} --max-tokens 1000000000")


@pytest.mark.parametrize("name, pattern, hint", [
    ("kjv", "train_*.bin", "python -m data.prepare kjv --out {d} --vocab-size 4096"),
    ("fineweb10b", "fineweb_train_*.bin", FINEWEB10B),
    ("fineweb_edu", "train_*.bin", FINEWEB_EDU),
], ids=["kjv", "fineweb10b", "fineweb_edu"])
def test_a_missing_dir_names_the_command_of_its_data_config(tmp_path, name, pattern, hint):
    d = tmp_path / "missing"
    cfg = data_config(name, dir=str(d))
    with pytest.raises(DataError) as err:
        TokenData(cfg.resolve_dir(), cfg, 64)
    assert str(err.value) == f"{d / pattern}: no shard matches; build the data with: {hint.format(d=d)}"


def test_a_damaged_kjv_build_names_the_command_that_built_it(kjv_dir, tmp_path):
    d = tmp_path / "kjv"
    d.mkdir()
    for name in ("meta.json", "val_000000.bin"):  # the default build with its training shard lost
        (d / name).symlink_to(kjv_dir / name)
    cfg = data_config("kjv", dir=str(d))
    with pytest.raises(DataError) as err:
        TokenData(cfg.resolve_dir(), cfg, 64)
    # from meta.json's arguments (vocab 4096 and 100M-token shards are the defaults), not from the config
    assert str(err.value) == f"{d}/train_*.bin: no shard matches; build the data with: python -m data.prepare kjv " \
                             f"--out {d}"


def test_rebuild_command_quotes_and_keeps_only_what_differs_from_the_defaults():
    kjv = {"corpus": "kjv", "vocab_size": None, "shard_tokens": 300_000, "tokenizer_sha256": "ab12"}
    assert rebuild_command(kjv, "/my data") == ("python -m data.prepare kjv --out '/my data' --shard-tokens 300000 "
                                                "--tokenizer '/my data/tokenizer.json'")
    hf = {"corpus": "hf", "dataset": "org/set", "config": None, "split": "train", "text_column": "content",
          "tokenizer": "gpt2", "max_tokens": None, "val_tokens": 2**24, "shard_tokens": 10**8, "eot": "<|endoftext|>"}
    assert rebuild_command(hf, "/d") == ("python -m data.prepare hf --out /d --dataset org/set --tokenizer gpt2 "
                                         "--text-column content")
