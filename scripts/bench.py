"""Run a controlled-budget benchmark (docs/protocol.md v2) end to end: `make bench` runs `python scripts/bench.py tiny`.

    python scripts/bench.py tiny                          # conf/bench/tiny.yaml -> results/bench_tiny/
    python scripts/bench.py standard --launcher joblib --jobs 2 --threads 1   # the standard CPU benchmark, ~3.5 h
    python scripts/bench.py gpt2_124m_fineweb --launcher slurm      # conf/hydra/launcher/slurm.yaml
    python scripts/bench.py tiny --dry-run                # the declaration checked, the first runs listed

The engine is the `bench` package (bench/__init__.py maps its modules); this is its command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `python scripts/bench.py`

from bench.declaration import BenchError, load_bench
from bench.launch import add_launch_options
from bench.records import RecordError
from bench.run import run_benchmark


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench.py", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="A benchmark is resumable: run the same command again and finished runs are skipped (their records "
               "kept), interrupted ones resume from their last checkpoint. Exit status 2: the declaration or the "
               "records were refused (one line on stderr), nothing was run or overwritten.")
    p.add_argument("bench", help="a conf/bench/<name>.yaml name (see conf/bench/), or a path to a bench YAML")
    p.add_argument("--out", type=Path, help="benchmark directory (default results/bench_<name>/): the plan, "
                   "every run's records, report.md/.html and summary.json")
    add_launch_options(p)
    p.add_argument("--dry-run", action="store_true", help="check the declaration, list the first runs, run nothing")
    p.add_argument("--no-report", action="store_true", help="run, but do not build the report (scripts/report.py "
                   "builds it later from the records)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        b = load_bench(args.bench, launcher=args.launcher, jobs=args.jobs, threads=args.threads, logger=args.logger)
        out = args.out or REPO / "results" / f"bench_{b.name}"
        t0 = time.time()
        print(f"benchmark {b.name}: {len(b.arms)} arms, {b.search.method} search x {b.search.trials} trials, "
              f"{len(b.seeds)} seeds, budgets {list(b.budgets)} -> {out}\nworkload: experiment={b.experiment} "
              f"{' '.join(b.overrides)}; launcher {b.launcher} ({b.jobs} jobs x {b.threads or 'default'} threads)",
              flush=True)
        run_benchmark(b, out, args.dry_run)
        if args.dry_run:
            return 0
        print(f"runs finished in {time.time() - t0:.0f} s", flush=True)
        if not args.no_report:
            from bench.report import build_report

            paths = build_report(out)
            print(f"report: {paths['md']}\n        {paths['html']}\n        {paths['summary']}", flush=True)
    except (BenchError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
