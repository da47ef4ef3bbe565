"""Run a scaling ladder (docs/protocol.md v2, "Scaling ladder"): the declaration is bench/rungs.py's, the runs are
scripts/bench.py's rung by rung, the fit and report bench/ladder.py's.

    python scripts/ladder.py cpu --dry-run      # conf/ladder/cpu.yaml: each rung's N, budgets, cost, first runs
    python scripts/ladder.py cpu --launcher joblib --jobs 2 --threads 1      -> results/ladder_cpu/<rung>/
    python scripts/ladder.py gpu --launcher slurm                           # conf/ladder/gpu.yaml, FineWeb
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `python scripts/ladder.py`

from bench.declaration import BenchError
from bench.launch import add_launch_options
from bench.records import RecordError
from bench.rungs import Ladder, load_ladder, open_ladder_dir, plan_lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/ladder.py", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="A ladder is resumable: run the same command again and every rung continues where its records stop "
               "(scripts/bench.py's rule, rung by rung). Exit status 2: the declaration or the records were "
               "refused (one line on stderr), nothing was run or overwritten.")
    p.add_argument("ladder", help="a conf/ladder/<name>.yaml name (see conf/ladder/), or a path to a ladder YAML")
    p.add_argument("--out", type=Path, help="ladder directory (default results/ladder_<name>/): ladder.json, a "
                   "benchmark directory per `set` rung, summary.json, report.md/.html, plots/ (a `bench` rung "
                   "stays in its own results/bench_<name>/)")
    add_launch_options(p)
    p.add_argument("--dry-run", action="store_true", help="check the declaration, print each rung's size, tokens, "
                   "budgets and relative cost and its first runs; run nothing")
    p.add_argument("--no-report", action="store_true", help="run, but build neither the rungs' reports nor the "
                   "ladder's (python -c 'from bench.ladder import build_ladder_report; ...' builds it later)")
    p.add_argument("--skip-shared", action="store_true", help="launch nothing in the shared (`bench`) rungs, e.g. "
                   "while their own scripts/bench.py runs them; the report reads what their directories hold")
    return p


def run(lad: Ladder, args: argparse.Namespace) -> None:
    from bench.report import build_report
    from bench.run import run_benchmark

    open_ladder_dir(lad)
    for r in lad.rungs:
        if r.shared and args.skip_shared:
            print(f"\nrung {r.name}: bench {r.bench.name} in {r.dir} (shared; --skip-shared: nothing launched)")
            continue
        print(f"\nrung {r.name}: bench {r.bench.name}, budgets {list(r.bench.budgets)} -> {r.dir}", flush=True)
        run_benchmark(r.bench, r.dir)
        if not args.no_report:
            print(f"  report: {build_report(r.dir)['md']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        lad = load_ladder(args.ladder, out=args.out, launcher=args.launcher, jobs=args.jobs, threads=args.threads,
                          logger=args.logger)
        d = lad.decl
        print(f"ladder {d.name}: base {d.base}, arms {', '.join(d.arms)}; {d.tokens_per_param:g} tokens per "
              f"non-embedding parameter, warmup {d.warmup_frac:g} of each full budget -> {lad.dir}\n"
              + "\n".join(plan_lines(lad)), flush=True)
        if args.dry_run:
            from bench.run import run_benchmark

            for r in lad.rungs:
                print(f"\nrung {r.name}: experiment={r.bench.experiment} {' '.join(r.bench.overrides)}")
                run_benchmark(r.bench, r.dir, dry_run=True)
            return 0
        run(lad, args)
        if not args.no_report:
            from bench.ladder import build_ladder_report

            paths = build_ladder_report(lad.dir)
            print(f"ladder report: {paths['md']}\n              {paths['summary']}", flush=True)
    except (BenchError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
