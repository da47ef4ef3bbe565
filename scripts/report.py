"""Rebuild a benchmark's report from its records: report.md, report.html, summary.json, runs.csv, plots/.

    python scripts/report.py results/bench_tiny
    OPTBENCH_CONFIG_PATH=~/optbench_conf python scripts/report.py results/bench_mine   # the user's code importable

The report is bench/report.py (bench/__init__.py maps the engine); this is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.records import RecordError
from bench.report import build_report
from harness.config import search
from harness.config.schema import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", type=Path, help="a benchmark directory (scripts/bench.py writes it)")
    args = parser.parse_args(argv)
    try:
        search.activate()  # a benchmark of a user's model rebuilds it from config.yaml (its size): its class imports
        out = build_report(args.bench_dir)
    except (RecordError, ConfigError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    for path in out.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
