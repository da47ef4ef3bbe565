"""Fold a finished run's PC layers (model.pc_level > 0) into plain weights W_eff = γ · s · f(W / s), so the
model runs without the per-step polynomial (models/pc.py; Wang et al., arXiv:2606.06470, section 6.2).

    python scripts/merge_pc.py results/runs/my_pc_run exports/my_pc_run_merged
    python scripts/export_hf.py exports/my_pc_run_merged exports/my_pc_run_hf  # optional; it also merges

Reads RUN_DIR/model_final.pt (written by train.py) and writes OUT_DIR/model_final.pt in the same format,
with model.pc_level = 0, plus OUT_DIR/config.yaml (RUN_DIR's, with the merged model node) when RUN_DIR has
one, so that scripts/export_hf.py still finds the run's tokenizer. A model without PC layers is written
unchanged. Exit code 2 when an input is missing or unreadable.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # scripts/ is not a package; the repository root holds models/

import torch
from export_hf import run_and_out  # sibling script: scripts/ is sys.path[0] when run
from omegaconf import OmegaConf

from models.pc import merge_pc


def main(argv: list[str] | None = None) -> int:
    args, model = run_and_out(argv, __doc__, "merge_pc")
    if model is None:
        return 2

    level = model.cfg.pc_level
    plain = merge_pc(model) if level else model
    args.out_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(plain.cfg)
    torch.save({"model_config": config, "state_dict": plain.state_dict()}, args.out_dir / "model_final.pt")
    if (args.run_dir / "config.yaml").is_file():
        run_config = OmegaConf.load(args.run_dir / "config.yaml")
        run_config.model = config
        OmegaConf.save(run_config, args.out_dir / "config.yaml")
    done = f"merged PC level {level}" if level else "no PC layers; written unchanged"
    print(f"{done}: {plain.num_params():,} parameters -> {args.out_dir / 'model_final.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
