"""Print a markdown table of finished runs, built from their records only (summary.json + config.yaml).

    python scripts/runs_table.py results/multirun/2026-11-24_09-00-00

Finds every summary.json below the given directories. Runs of different workloads (workload_hash) are
never put in one table: the script refuses and lists the hashes (exit code 2). The full comparison with
statistics and plots is the job of the benchmark reports; this is the quick look.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

COLUMNS = ("optimizer", "lr", "seed", "steps", "final_val_loss", "min_val_loss", "steps_to_target",
           "tokens_per_s", "opt_step_ms", "diverged")


def summaries_below(roots: list[Path]) -> list[dict]:
    """Every summary.json below the roots, with the run's lr and its optimizer step in milliseconds."""
    runs = []
    for root in roots:
        for summary_path in sorted(root.rglob("summary.json")):
            summary = json.loads(summary_path.read_text())
            config = OmegaConf.load(summary_path.parent / "config.yaml")
            runs.append({**summary, "dir": str(summary_path.parent), "lr": config.optimizer.get("lr"),
                         "opt_step_ms": None if summary.get("optimizer_step_time_s") is None  # older records
                         else 1e3 * summary["optimizer_step_time_s"] / max(summary["steps"], 1)})
    return runs


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def table(runs: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(runs, key=lambda r: (str(r["optimizer"]), r["lr"] or 0, r["seed"])):
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    runs = summaries_below(args.dirs)
    if not runs:
        print(f"runs_table: no summary.json below {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    hashes = sorted({r["workload_hash"] for r in runs})
    if len(hashes) > 1:
        print(f"runs_table: refusing to mix {len(hashes)} workloads: "
              + "; ".join(f"{h[:12]} ({sum(r['workload_hash'] == h for r in runs)} runs)" for h in hashes),
              file=sys.stderr)
        return 2
    print(f"workload {hashes[0][:16]}, {len(runs)} runs\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
