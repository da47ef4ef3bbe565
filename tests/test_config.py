"""Every config composes and validates; every bad config named in the foundation issue fails with one
message naming the key, before any compute."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from harness.config.schema import ConfigError, register_configs, to_typed
from harness.config.validate import validate
from optimizers.external import ExternalSpec

REPO = Path(__file__).resolve().parent.parent
register_configs()


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["name=test", *overrides])


def check(*overrides):
    return validate(to_typed(compose_cfg(*overrides)))


def group_options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("optimizer", group_options("optimizer"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_optimizer_pair_validates(model, optimizer):
    # Big presets need a tokenizer that fits; every preset has at least the embedded corpus' 4096 tokens.
    spec = check(f"model={model}", f"optimizer={optimizer}", "train.seq_len=128")
    # a zoo YAML (optimizers/external.py) is a class's keyword arguments: its lr is one of them
    assert (spec.resolved_kwargs()["lr"] if isinstance(spec, ExternalSpec) else spec.lr) > 0


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_validates(experiment):
    cfg = to_typed(compose_cfg(f"experiment={experiment}"))
    validate(cfg)
    assert cfg.experiment == experiment


def test_cli_contract_keys():
    cfg = to_typed(compose_cfg("optimizer=adamw", "model=llama_tiny", "data=kjv", "train.max_steps=7", "seed=3"))
    assert (cfg.model.family, cfg.train.max_steps, cfg.seed, cfg.data.name) == ("llama", 7, 3, "kjv")
    assert cfg.optimizer["_target_"] == "optimizers.adamw.AdamWSpec"


@pytest.mark.parametrize("override, key", [
    ("model.foo=1", "model.foo"),
    ("train.max_stepz=10", "train.max_stepz"),
    ("optimizer.lrr=0.1", "optimizer.lrr"),
    ("train.max_steps=abc", "train.max_steps"),
    ("optimizer=nope", "optimizer/nope"),
    ("model=nope", "model/nope"),
])
def test_composition_errors_name_the_key(override, key):
    with pytest.raises(HydraException) as e:
        compose_cfg(override)
    assert key in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lr=0"], "optimizer.lr: must be > 0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr: must be > 0"),
    (["optimizer.lr=fast"], "optimizer.lr"),
    (["optimizer.betas=[0.9]"], "optimizer.betas"),
    (["optimizer.decay_groups=[hidden,bogus]"], "optimizer.decay_groups"),
    (["train.max_steps=0"], "train.max_steps: must be > 0"),
    (["train.max_steps=-5"], "train.max_steps: must be > 0"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size: 10 is not divisible"),
    (["train.seq_len=512"], "train.seq_len: 512 exceeds the model's context model.block_size=256"),
    (["data.vocab_size=50257"], "data.vocab_size: the tokenizer's 50257 tokens exceed model.vocab_size=4096"),
    (["train.precision=fp8"], "train.precision"),
    (["train.device=tpu"], "train.device"),
    (["schedule.name=step"], "schedule.name"),
    (["schedule.warmup_frac=1.5"], "schedule.warmup_frac"),
    (["train.target_loss=-1"], "train.target_loss"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["model.n_head=3"], "model.n_head"),
])
def test_value_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        check(*overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("+train.max_stepz=10", ("train.max_stepz: not a key of TrainConfig; nothing would read it (did you mean "
                             "train.max_steps?)")),
    ("+model.n_layr=2", "model.n_layr: not a key of ModelConfig; nothing would read it (did you mean model.n_layer?)"),
    ("+hybrid.lrr=0.1", "hybrid.lrr: not a key of SharedGroup; nothing would read it (did you mean hybrid.lr?)"),
    ("+zzz=1", "zzz: not a key of Config; nothing would read it"),
])
def test_the_schema_is_closed_to_added_keys(override, message):
    with pytest.raises(ConfigError) as e:
        to_typed(compose_cfg(override))
    assert str(e.value) == message


def test_optimizer_spec_is_typed():
    spec = check("optimizer.lr=1e-3", "optimizer.betas=[0.8,0.99]")
    assert spec.lr == 1e-3 and list(spec.betas) == [0.8, 0.99]
    assert OmegaConf.is_config(compose_cfg().optimizer)
