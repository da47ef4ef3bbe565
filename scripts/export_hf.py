"""Export a finished run's model (and its tokenizer, when the run's data directory has one) to a Hugging
Face directory loadable with `AutoModelForCausalLM.from_pretrained(OUT_DIR)`.

    python scripts/export_hf.py results/runs/my_run exports/my_run

Reads RUN_DIR/model_final.pt (written by train.py) and, for the tokenizer, `data.dir` from
RUN_DIR/config.yaml. A model with PC layers (model.pc_level > 0) is exported with its merged weights
(models/pc.py merge_pc: the same outputs). Exit code 2 when an input is missing or unreadable.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # scripts/ is not a package; the repository root holds models/

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerFast

from harness.lifecycle.checkpoint import CheckpointError
from models import ModelConfig, build_model
from models.hf import to_hf
from models.pc import merge_pc

# What torch.load and load_state_dict raise on a file that is not a model_final.pt of this code.
LOAD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError)


def tokenizer_file(run_dir: Path) -> Path | None:
    """RUN_DIR/config.yaml -> data.dir/tokenizer.json, if both exist (train.py records data.dir absolute; a relative
    one, from records written before 2026-12-01, is taken from the repository root as those runs read it)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    data_dir = OmegaConf.select(OmegaConf.load(config), "data.dir", default=None)
    if data_dir is None:
        return None
    path = Path(data_dir) if Path(data_dir).is_absolute() else ROOT / data_dir
    return path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None


def load_run_model(run_dir: Path) -> torch.nn.Module:
    """RUN_DIR/model_final.pt's model (shared with scripts/merge_pc.py); CheckpointError if missing or unreadable."""
    ckpt = run_dir / "model_final.pt"
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt} not found (train.py writes it at the end of a run with train.save_final=true)")
    try:
        return load_model(ckpt)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{ckpt}: not a model_final.pt of this code ({type(e).__name__}: {e})") from None


def load_model(ckpt: Path) -> torch.nn.Module:
    """The model saved in a model_final.pt, on the CPU; raises one of LOAD_ERRORS if it is not one."""
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(**payload["model_config"]))
    # A torch.compile'd model saves its weights under "_orig_mod."; the weights are the same.
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in payload["state_dict"].items()})
    return model


def run_and_out(argv: list[str] | None, doc: str, name: str) -> tuple[argparse.Namespace, torch.nn.Module | None]:
    """The command line RUN_DIR OUT_DIR of this script and scripts/merge_pc.py, and RUN_DIR's model (None, with
    the problem printed as one line naming the script, when it cannot be read)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        return args, load_run_model(args.run_dir)
    except CheckpointError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return args, None


def main(argv: list[str] | None = None) -> int:
    args, model = run_and_out(argv, __doc__, "export_hf")
    if model is None:
        return 2

    if model.cfg.pc_level:
        print(f"merging the PC layers (model.pc_level={model.cfg.pc_level}) into plain weights")
        model = merge_pc(model)
    hf = to_hf(model)
    hf.save_pretrained(args.out_dir)
    print(f"saved {type(hf).__name__} ({model.num_params():,} parameters) to {args.out_dir}")
    tok = tokenizer_file(args.run_dir)
    if tok is None:
        print("no tokenizer exported: RUN_DIR/config.yaml names no data.dir holding tokenizer.json")
    else:
        PreTrainedTokenizerFast(tokenizer_file=str(tok)).save_pretrained(args.out_dir)
        print(f"saved tokenizer {tok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
