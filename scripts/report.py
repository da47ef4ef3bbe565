"""Build a benchmark's report from its run records alone: report.md, report.html (self-contained),
runs.csv and plots/*.png inside the benchmark directory. Definitions: /work/shared/design/protocol.md.

    python scripts/report.py results/bench_tiny

Statistics come from scripts/bench_stats.py, figures from scripts/report_plots.py, the diagnostics section
(from the diagnostics.jsonl of the diag-phase re-runs, else the seed runs) from scripts/report_diagnostics.py, the Markdown/HTML from
scripts/report_render.py. Nothing but those outputs is written. Exit code 2 (and no output) when the
directory is not a benchmark, has no complete runs, or mixes workload hashes (results of different workloads
are never compared).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python scripts/report.py`: scripts/ and harness/ live in the repository root

from harness.records import atomic_write_text
from scripts.bench_records import RecordError, RunRecord, load_runs, read_bench
from scripts.bench_stats import (
    ALPHA,
    BOOT_SEED,
    CI_LEVEL,
    FIT_SKIP,
    N_BOOT,
    analyze,
    caveats,
    flops_per_step,
    reach,
    step_overhead,
    value_str,
)
from scripts.report_diagnostics import diagnostics_blocks
from scripts.report_plots import make_plots
from scripts.report_render import to_html, to_markdown

CSV_BASE = ("phase", "arm", "trial", "optimizer", "seed", "data_seed", "final_val_loss", "min_val_loss",
            "steps", "tokens", "steps_to_target", "steps_to_target_interp", "tokens_to_target",
            "flops_to_target", "train_time_to_target_s", "diverged", "diverged_at_step", "train_time_s",
            "optimizer_step_time_s", "optimizer_step_ms", "step_overhead", "optimizer_state_bytes",
            "flops_per_step", "tokens_per_s", "run_dir")
FEW_SEEDS = 5  # below this many seeds per arm, test results are called tentative / low-power


def si(x: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; None -> '-'; inf -> 'not reached'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "not reached"
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def loss(x: float | None) -> str:
    """A validation loss; a diverged run's (inf) says so."""
    return "diverged" if x == math.inf else fmt(x)


def steps(x: float | None, spec: str = ".0f") -> str:
    """Steps (or seconds) to target; inf = never reached."""
    return "not reached" if x == math.inf else fmt(x, spec)


def with_ci(stat: dict, f=fmt) -> str:
    """'median [lo, hi]'; the median alone when no CI exists (a seed missed the target, or no seeds)."""
    med = stat["median"]
    if med is None:
        return "-"
    if stat["ci"] is None:
        return f(med)
    return f"{f(med)} [{f(stat['ci'][0])}, {f(stat['ci'][1])}]"


def pval(test: dict | None, key: str) -> str:
    """'-' where no test applies, 'n/a' where it is undefined, else p (with * when p < ALPHA)."""
    if test is None:
        return "-"
    p = test[key]
    return "n/a" if p is None else f"{p:.3g}" + (" *" if p < ALPHA else "")


def setting_str(setting: dict | None) -> str:
    return ", ".join(f"{k.split('.')[-1]}={value_str(v)}" for k, v in (setting or {}).items()) or "-"


def speedup_cell(a: dict, ref: str, data_eq: bool = True) -> str:
    """protocol.md "Speedup vs AdamW": in steps with its CI where both arms reach the target in every seed,
    else (data_eq) the data-equivalent speedup, flagged as such and when it extrapolates."""
    if a["arm"] == ref:
        return "1 (reference)"
    if a["speedup"] and a["speedup"]["ci"] is None:
        return f"{a['speedup']['point']:.2f} (1 seed: no CI)"
    if a["speedup"]:
        lo, hi = a["speedup"]["ci"]
        return f"{a['speedup']['point']:.2f} [{lo:.2f}, {hi:.2f}]"
    de = (a["data_eq"] or {}) if data_eq else {}
    if de.get("speedup") is not None:
        return f"{de['speedup']:.2f} data-eq" + (" (extrapolated)" if de["extrapolated"] else "")
    return "data-eq: unreachable" if de.get("status") == "unreachable" else "-"


def environment_lines(runs: list[RunRecord]) -> tuple[list[str], list[str]]:
    """Header lines on hardware, code and dates from env.json, and caveats when runs differ in them."""
    hw, commits, started = {}, set(), []
    for r in runs:
        e, cpu = r.env, r.env.get("cpu") or {}
        gpu = e.get("gpu") or {}
        key = (f"GPU {gpu['name']} x{gpu.get('count', 1)}" if gpu.get("name") else
               f"CPU {cpu.get('model', '?')} ({cpu.get('logical_cores', '?')} logical cores)")
        hw[key] = hw.get(key, 0) + 1
        code = e.get("code") or {}
        commits.add((code.get("commit") or "unknown")[:12] + (" (dirty)" if code.get("dirty") else ""))
        if e.get("started_at"):
            started.append(e["started_at"])
    lines = ["Hardware: " + "; ".join(f"{k} ({n} runs)" for k, n in hw.items()),
             "Code: " + ", ".join(sorted(commits)),
             f"Runs started: {min(started)} to {max(started)}" if started else "Runs started: unknown"]
    notes = []
    if len(hw) > 1:
        notes.append(f"The runs ran on {len(hw)} different hardware descriptions: training-time figures are "
                     "not comparable across them.")
    if len(commits) > 1:
        notes.append(f"The runs come from {len(commits)} code versions: {', '.join(sorted(commits))}.")
    if any("dirty" in c for c in commits):
        notes.append("Some runs ran from a dirty working tree (env.json holds the diff's sha256).")
    return lines, notes


def protocol_lines(bench: dict, target: dict) -> list[str]:
    overrides = " ".join(bench.get("overrides", [])) or "none"
    return [
        (f"Workload: experiment `{bench.get('experiment')}` with overrides `{overrides}` (the same for every "
         "arm)."),
        (f"Tuning: {bench.get('trials')} trials per arm over its declared grid, tuning seed "
         f"{bench.get('tuning_seed')}; the best trial by final validation loss (ties: steps to target) is "
         "chosen (protocol.md rule 2)."),
        (f"Seeds: the chosen setting is re-run with seeds {bench.get('seeds')} (init seed = data-order "
         "seed); only these seed runs enter the per-arm statistics."),
        (f"Target: {fmt(target['loss'])} ({target['rule']}: {target['detail']}). Steps to target = first "
         "evaluation with val loss <= target (no interpolation; the interpolated step is a separate column); "
         "tokens, FLOPs (model + optimizer FLOPs per step) and training time (evaluation excluded) are taken "
         "at that step."),
        (f"CIs: percentile bootstrap ({N_BOOT:,} resamples, RNG seed {BOOT_SEED}, {CI_LEVEL:.0%}) of the "
         "median over seeds. Speedup vs the reference = its steps to target / the arm's, ratio of means, "
         "both arms' seeds resampled independently. Where a speedup in steps is undefined, the "
         "data-equivalent speedup: tokens the reference needs for the arm's median final loss, from a fit "
         "L = a + b (tokens/budget)^-c to the reference's median curve (evaluations after the first "
         f"{FIT_SKIP:.0%} of the budget), over the arm's tokens."),
        ("Significance: one-sided Welch t-tests (H1: the arm is lower), on final loss at equal steps and on "
         f"steps to target where both arms reach it in every seed; significant only for p < {ALPHA} (marked "
         "*). Optimizer step overhead = optimizer.step() time / the rest of the training time; state memory "
         "ratio = optimizer state bytes / the reference's."),
    ]


def header_blocks(bench: dict, analysis: dict, runs: list[RunRecord]) -> tuple[list[tuple], list[str]]:
    ref, target = analysis["reference"], analysis["target"]
    env_lines, env_notes = environment_lines(runs)
    variants = ", ".join(bench.get("muon_variants", [])) or "none"
    blocks = [("h1", f"Benchmark report: {bench['name']}"), ("p", bench.get("description", "")),
              *(("warn", w) for w in analysis["warnings"]),
              ("ul", [f"Workload hash: `{runs[0].workload_hash}`", *env_lines,
                      (f"Benchmark created: {bench.get('created', 'unknown')}; report built "
                       f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}"),
                      f"Command: `{bench.get('command', '')}`",
                      f"Target loss: **{fmt(target['loss'])}** (rule: {target['rule']}; {target['detail']})",
                      (f"Reference: {ref}; the Muon variants ({variants}) are also tested vs "
                       f"{analysis['muon_reference']}")]),
              ("h2", "Protocol"), ("ul", protocol_lines(bench, target)),
              ("table", ["arm", "optimizer", "fixed overrides", "grid", "default", "description"],
               [[n, d.get("optimizer", n), setting_str(d.get("set")),
                 "; ".join(f"{k}: {', '.join(map(value_str, vs))}" for k, vs in d["grid"].items()),
                 setting_str(d.get("default")), d.get("description", "")] for n, d in bench["arms"].items()])]
    return blocks, env_notes


def main_table(analysis: dict) -> tuple[list[str], list[list[str]]]:
    """Per arm: chosen setting, losses and the *-to-target figures (median [bootstrap CI]), speedup."""
    ref = analysis["reference"]
    headers = ["arm", "chosen setting", "final loss [CI]", "min loss (median)", "steps to target [CI]",
               "steps (interpolated)", "tokens to target", "FLOPs to target", "time to target (s)",
               f"speedup vs {ref} [CI]"]
    rows = [[f"{name} (n={a['n_seed']})", setting_str(a["chosen"]["setting"]), with_ci(a["final"], loss),
             fmt(a["min"]), with_ci(a["steps"], steps), with_ci(a["steps_interp"], lambda x: steps(x, ".1f")),
             with_ci(a["tokens"], si), with_ci(a["flops"], si),
             with_ci(a["time_s"], lambda x: steps(x, ".3g")), speedup_cell(a, ref)]
            for name, a in analysis["arms"].items()]
    return headers, rows


def cost_table(analysis: dict) -> tuple[list[str], list[list[str]]]:
    """Per arm: one-sided Welch p-values vs the reference (and vs the Muon reference for Muon variants),
    divergences, optimizer step overhead and state memory ratio."""
    ref, mref = analysis["reference"], analysis["muon_reference"]
    headers = ["arm", f"p final < {ref}", f"p steps < {ref}", f"p final < {mref}", f"p steps < {mref}",
               "diverged (tune + seed)", "optimizer step overhead", f"state memory vs {ref}"]
    rows = []
    for name, a in analysis["arms"].items():
        t, m = ({x["vs"]: x for x in a["tests"]}.get(vs) for vs in (ref, mref))
        rows.append([name, pval(t, "p_final"), pval(t, "p_steps"), pval(m, "p_final"), pval(m, "p_steps"),
                     f"{a['diverged']['tune']} / {a['n_tune']} + {a['diverged']['seed']} / {a['n_seed']}",
                     fmt(a["overhead"], ".1%"), fmt(a.get("state_ratio"), ".2f")])
    return headers, rows


def significance_lines(analysis: dict) -> list[str]:
    """protocol.md rule 5 in words; significance is claimed only for p < ALPHA."""
    out = []
    for name, a in analysis["arms"].items():
        for t in a["tests"]:
            few = min(t["n"]) < FEW_SEEDS
            for metric, key in (("final loss", "p_final"), ("steps to target", "p_steps")):
                p, head = t[key], f"{name} vs {t['vs']}, {metric}"
                n = f"n = {t['n'][0]} vs {t['n'][1]}"
                if p is None:
                    need = ", and the target reached in every seed" if key == "p_steps" else ""
                    out.append(f"{head}: no test (needs >= 2 finite values per arm with some variance"
                               f"{need}).")
                elif p < ALPHA:
                    out.append(f"{head}: lower, significant at p = {p:.3g} < {ALPHA} (one-sided Welch, {n}"
                               + ("; so few seeds make it tentative" if few else "") + ").")
                else:
                    out.append(f"{head}: not significant (p = {p:.3g}, {n}"
                               + ("; with so few seeds the test has little power" if few else "") + ").")
    return out


def results_blocks(analysis: dict) -> list[tuple]:
    ref, arms, fit = analysis["reference"], analysis["arms"], analysis["ref_fit"]
    speedups = [[n, speedup_cell(a, ref, data_eq=False), fmt(a["data_eq"]["speedup"], ".3f"),
                 "inf" if a["data_eq"]["status"] == "unreachable" else si(a["data_eq"]["ref_tokens"]),
                 a["data_eq"]["status"], si(a["tokens_run"])]
                for n, a in arms.items() if a["data_eq"]]
    per_seed = [[n, s["seed"], s["data_seed"], loss(s["final"]), fmt(s["min"]), steps(s["steps"]),
                 steps(s["steps_interp"], ".1f"), si(s["tokens"]), si(s["flops"]), steps(s["time_s"], ".3g"),
                 s["diverged"]] for n, a in arms.items() for s in a["per_seed"]]
    return [("h2", "Results per arm (seed runs of the chosen setting)"), ("table", *main_table(analysis)),
            ("h3", "Significance and costs"), ("table", *cost_table(analysis)),
            ("ul", significance_lines(analysis) or ["No tests (no seed runs)."]),
            ("h3", "Speedup details"),
            ("table", ["arm", "speedup in steps [CI]", "data-equivalent speedup", f"{ref} tokens needed",
                       "status", "arm tokens"], speedups),
            ("p", f"Power-law fit of {ref}'s median curve: L = {fit.a:.4f} + {fit.b:.4f} (tokens / "
                  f"{si(fit.budget)})^-{fit.c:.4f}" if fit else
             f"No power-law fit of {ref}'s curve (too few evaluations or no seed runs)."),
            ("h3", "Per seed"),
            ("table", ["arm", "seed", "data seed", "final loss", "min loss", "steps to target",
                       "interpolated", "tokens", "FLOPs", "time (s)", "diverged"], per_seed)]


def tuning_blocks(analysis: dict, runs: list[RunRecord]) -> list[tuple]:
    def neighbour(value, value_loss):
        return "-" if value is None else f"{value_str(value)} ({loss(value_loss)})"

    cert = [[n, c["axis"], ", ".join(map(value_str, c["grid"])), neighbour(c["chosen"], c["chosen_loss"]),
             neighbour(c["lower"], c["lower_loss"]), neighbour(c["upper"], c["upper_loss"]),
             {True: "yes", False: "NO", None: "-"}[c["local_optimum"]], "**EDGE**" if c["edge"] else "no"]
            for n, a in analysis["arms"].items() for c in a["certificate"]]
    trials = [[r.arm, r.trial, setting_str(r.setting), r.seed, loss(r.final_loss),
               fmt(r.summary.get("min_val_loss")), steps(reach(r, analysis["target"]["loss"])["steps"]),
               r.diverged, "yes" if r.trial == analysis["arms"][r.arm]["chosen"]["trial"] else ""]
              for r in runs if r.phase == "tune"]
    return [("h2", "Local-optimality certificate (protocol.md rule 4)"),
            ("table", ["arm", "axis", "grid", "chosen (final loss)", "lower neighbour (final loss)",
                       "upper neighbour (final loss)", "local optimum", "edge of grid"], cert),
            ("h2", "Tuning trials"),
            ("table", ["arm", "trial", "setting", "seed", "final loss", "min loss", "steps to target",
                       "diverged", "chosen"], trials)]


def reproduction_line(runs: list[RunRecord], diag_runs: list[RunRecord]) -> str | None:
    """The diag phase re-runs the seed runs with diagnostics on; diagnostics never change training, so every
    final loss must come out bit-identical. Says how many did (and names any that did not)."""
    if not diag_runs:
        return None
    seed = {(r.arm, r.seed): r for r in runs if r.phase == "seed"}
    pairs = [(d, seed.get((d.arm, d.seed))) for d in diag_runs]
    same = [d for d, s in pairs if s is not None and d.summary.get("final_val_loss") == s.summary.get("final_val_loss")]
    differ = [f"{d.arm}/{d.trial}" for d, s in pairs if s is not None and d not in same]
    line = (f"The {len(diag_runs)} diag-phase runs (the seed runs again, with diagnostics on, untimed) reproduce "
            f"the seed runs' final validation loss exactly in {len(same)} of {sum(s is not None for _, s in pairs)} "
            "pairs (diagnostics must not change training).")
    return line + (f" **Differ: {', '.join(differ)}.**" if differ else "")


def report_blocks(bench: dict, analysis: dict, runs: list[RunRecord], plots: dict[str, Path],
                  bench_dir: Path, diag_runs: list[RunRecord] | None = None) -> list[tuple]:
    """The whole report as blocks (scripts/report_render.py), the same for report.md and report.html."""
    blocks, env_notes = header_blocks(bench, analysis, runs)
    blocks += results_blocks(analysis) + tuning_blocks(analysis, runs)
    diag = diagnostics_blocks(bench, runs + list(diag_runs or []), bench_dir / "plots", bench_dir)
    line = reproduction_line(runs, list(diag_runs or []))
    blocks += diag[:1] + ([("p", line)] if line else []) + diag[1:]
    blocks += [("h2", "Caveats"), ("ul", caveats(bench, analysis) + env_notes or ["None."]),
               ("h2", "Figures")]
    blocks += [("img", str(path.relative_to(bench_dir)), name.replace("_", " "), path)
               for name, path in plots.items()]
    return blocks


def _cell(x: float | None) -> Any:
    """CSV cell of a figure that may be unreached or diverged (inf / None): empty."""
    return "" if x is None or math.isinf(x) else x


def runs_csv(bench: dict, runs: list[RunRecord], target: float | None) -> str:
    """One row per run (tune and seed), every swept axis a column (empty where an arm has no such axis)."""
    axes = list(dict.fromkeys(a for d in bench["arms"].values() for a in d["grid"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*CSV_BASE[:4], *axes, *CSV_BASE[4:]], lineterminator="\n")
    writer.writeheader()
    for r in runs:
        s, hit = r.summary, reach(r, target)
        opt_s = s.get("optimizer_step_time_s")
        writer.writerow({
            **{a: r.setting.get(a, "") for a in axes}, "phase": r.phase, "arm": r.arm, "trial": r.trial,
            "optimizer": s.get("optimizer"), "seed": r.seed, "data_seed": r.data_seed,
            "final_val_loss": _cell(r.final_loss), "min_val_loss": s.get("min_val_loss"),
            "steps": s.get("steps"), "tokens": s.get("tokens"), "steps_to_target": _cell(hit["steps"]),
            "steps_to_target_interp": _cell(hit["steps_interp"]), "tokens_to_target": _cell(hit["tokens"]),
            "flops_to_target": _cell(hit["flops"]), "train_time_to_target_s": _cell(hit["time_s"]),
            "diverged": r.diverged, "diverged_at_step": s.get("diverged_at_step"),
            "train_time_s": s.get("train_time_s"), "optimizer_step_time_s": opt_s,
            "optimizer_step_ms": 1e3 * opt_s / s["steps"] if opt_s is not None and s.get("steps") else "",
            "step_overhead": step_overhead(r), "optimizer_state_bytes": s.get("optimizer_state_bytes"),
            "flops_per_step": flops_per_step(r)[0], "tokens_per_s": s.get("tokens_per_s"),
            "run_dir": str(r.dir)})
    return buf.getvalue()


def build_report(bench_dir: Path | str) -> dict[str, Path]:
    """Write report.md, report.html, runs.csv and plots/*.png into bench_dir; return their paths as
    {"md", "html", "csv", "plot_<name>"}. Raises RecordError for a directory that is not a benchmark, has no
    complete runs, or mixes workloads."""
    bench_dir = Path(bench_dir)
    bench = read_bench(bench_dir)
    runs = load_runs(bench_dir)  # refuses mixed workload hashes
    if not runs:
        raise RecordError(f"{bench_dir}: no complete runs (no summary.json below runs/); nothing to report")
    diag_runs = load_runs(bench_dir, phases=("diag",))  # untimed re-runs with diagnostics: never in the statistics
    if diag_runs and {r.workload_hash for r in diag_runs} != {runs[0].workload_hash}:
        raise RecordError(f"{bench_dir}: the diag-phase runs are of another workload than the tune/seed runs; "
                          "results of different workloads are never compared")
    analysis = analyze(bench, runs)
    plots = make_plots(bench, analysis, runs, bench_dir / "plots")
    blocks = report_blocks(bench, analysis, runs, plots, bench_dir, diag_runs)
    out = {"md": bench_dir / "report.md", "html": bench_dir / "report.html", "csv": bench_dir / "runs.csv",
           **{f"plot_{k}": v for k, v in plots.items()},
           **{f"plot_{Path(b[3]).stem}": b[3] for b in blocks if b[0] == "img"}}  # + the diagnostics figures
    atomic_write_text(out["md"], to_markdown(blocks))
    atomic_write_text(out["html"], to_html(blocks, f"Benchmark report: {bench['name']}"))
    atomic_write_text(out["csv"], runs_csv(bench, runs, analysis["target"]["loss"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", type=Path, help="a benchmark directory (scripts/bench.py writes it)")
    args = parser.parse_args(argv)
    try:
        out = build_report(args.bench_dir)
    except RecordError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    for path in out.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
