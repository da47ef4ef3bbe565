"""The benchmark report: report.md, report.html (self-contained), summary.json, runs.csv and plots/, rebuilt
from bench.json and the run records alone. It leads with the answer: the first screen is one table (every
arm's end-of-schedule loss with its interval, the paired difference against the reference with its interval
and Holm-adjusted p, the data-equivalent speedup, step overhead, state memory) and the loss-vs-budget figure
with the n-gram lines; then the flags, the protocol, the loss-vs-budget table, the cost to the target, the
paired comparisons, the tuning (certificates, best-of-k), the variants, the diagnostics.

    python scripts/report.py results/bench_tiny
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from bench.analysis import analyze, step_overhead, summary
from bench.diagnostics import diagnostics_blocks
from bench.plots import make_plots
from bench.records import RecordError, RunRecord, load_runs, read_bench
from bench.render import to_html, to_markdown
from bench.search import knob
from runtime.files import atomic_write_json, atomic_write_text


def fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "diverged" if x > 0 else "-inf"
    return format(x, spec)


def ci_cell(e: dict | None, spec: str = ".3f") -> str:
    return "-" if not e else f"{fmt(e['median'] if 'median' in e else e['mean_diff'], spec)} [{fmt(e['lo'], spec)}, " \
                             f"{fmt(e['hi'], spec)}]"


def p_cell(t: dict | None) -> str:
    return "-" if not t else f"{t['p']:.3g} / {t['p_holm']:.3g}" if t.get("p_holm") is not None else f"{t['p']:.3g}"


def setting_str(setting: dict | None) -> str:
    return ", ".join(f"{knob(k)}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k, v in (setting or {}).items()) or "-"


def speedup_cell(a: dict, is_ref: bool, headline: bool = False) -> str:
    """The data-equivalent speedup; in the headline an extrapolated one is not quoted (docs/protocol.md)."""
    if is_ref:
        return "1 (reference)"
    d = a.get("data_equivalent_speedup")
    if not d or d["value"] is None:
        return "-"
    if not d["extrapolated"]:
        return f"{d['value']:.2f}"
    inside = [(B, x) for B, x in (a.get("data_equivalent_by_budget") or {}).items()
              if x["value"] is not None and not x["extrapolated"]]
    at = f"{inside[-1][1]['value']:.2f} at B={inside[-1][0]}" if inside else None
    if headline:
        return at or "beyond the reference's budgets"
    return f"{d['value']:.2f} (extrapolated)" + (f"; {at}" if at else "")


def seeds_cell(a: dict) -> str:
    """The arm's fresh seeds at the full budget, and how many diverged (their median counts them as +inf, their
    mean and interval leave them out: docs/protocol.md 5.6)."""
    k = (a["end_loss"] or {}).get("n_diverged", 0)
    return f"{a['n_seeds']} ({k} diverged)" if k else str(a["n_seeds"])


def headline(analysis: dict) -> list[tuple]:
    ref = analysis["reference"]
    rows = []
    for name, a in analysis["arms"].items():
        if a["variant_of"]:
            continue
        t = analysis["tests"].get(f"{name} vs {ref}")
        # no test for another arm: fewer than 2 seeds finite in both (the rest diverged)
        diff = "(reference)" if name == ref else ci_cell(t, "+.3f") if t else "-"
        rows.append([name, ci_cell(a["end_loss"]), seeds_cell(a), diff,
                     p_cell(t), fmt(t["mdd"]) if t else "-", speedup_cell(a, name == ref, headline=True),
                     fmt(a["step_overhead"], ".1%"), fmt(a.get("state_ratio"), ".2f")])
    e = analysis["arms"][ref]["end_loss"]
    head = ["arm", "end-of-schedule loss, median [95% CI of the mean]", "seeds", f"paired diff vs {ref} [95% CI]",
            "p one-sided / Holm", "detectable diff (80% power)", "data-equivalent speedup", "step overhead",
            f"state / {ref}'s"]
    diverged = any((a["end_loss"] or {}).get("n_diverged") for a in analysis["arms"].values())
    return [("table", head, rows),
            ("p", (f"Full budget {analysis['bench']['budgets'][-1]} steps; negative differences favour the arm. "
                  f"Interval method: {(e or {}).get('method') or '-'} (Student t below 8 seeds, BCa from 8). p: "
                  "one-sided paired t-test (arm lower), Holm-Bonferroni over every test of this report."
                  + (" A diverged seed counts as the worst value in the median (\"diverged\": at least half of the "
                     "seeds did) and is left out of the mean, its interval and the paired tests." if diverged
                     else "")))]


def protocol_lines(analysis: dict) -> list[str]:
    b, w = analysis["bench"], analysis["workload"]
    h = b.get("hybrid_used") or {}
    chosen_by = (b.get("hybrid_chosen") or {}).get("by")
    epochs = f", {w['epochs']:.2f} epochs" if w.get("epochs") else ""
    return [
        (f"Workload: experiment `{b['experiment']}` + `{' '.join(b['overrides']) or 'no overrides'}`: "
        f"{w['n_params']:,} parameters ({w['non_embedding_params']:,} non-embedding), {w['tokens_per_step']:,.0f} "
        f"tokens/step, budgets {b['budgets']} steps{epochs}; the same for every arm."),
        f"Shared group (embeddings, head, gains, biases; every main arm): AdamW lr {h.get('lr')}, betas "
        f"{h.get('betas')}, weight decay {h.get('weight_decay')} on {h.get('decay_groups')}; "
        + (f"chosen by the {chosen_by} arm's tuning, then frozen." if chosen_by else
           f"declared ({b['hybrid']['source']}).")
        + (" Ablation: every arm also tuned the shared lr." if b.get("tune_hybrid_lr") else ""),
        (f"Search: {b['search']['method']} with {b['search']['trials']} trials per arm (diverged included) over each "
        f"arm's declared space, tuning seed {b['tuning_seed']}; choice: lowest end-of-schedule loss at the full "
        "budget. Certificate runs (one grid step either way, where the search did not run it) lie outside the budget."),
        f"Seeds: {b['seeds']} fresh, paired (seed s = the same initial weights and data order in every arm; the init "
        "and data-order seeds are independent draws). Smaller budgets: "
        + ("cooldown branches of each seed's full-budget run (WSD)." if b.get("schedule", {}).get("name") == "wsd"
           else "one run per budget."),
        f"Target {fmt(analysis['target']['loss'])}: {analysis['target']['rule']}.",
        precision_line(b.get("precision_probe")),
        f"Code: {', '.join(analysis['code_versions'])}" + (" (several versions: see the runs)"
                                                           if len(analysis["code_versions"]) > 1 else "."),
    ]


def precision_line(probe: dict | None) -> str:
    if not probe:
        return "Precision: the experiment's, fixed (no probe recorded)."
    r = probe["tokens_per_s"]
    return (f"Precision: {probe['choice']} for every run, measured once before any run (train.precision=auto: "
            f"forward+backward of the workload's model at {r['fp32']:,.0f} tokens/s in fp32, {r['bf16']:,.0f} in "
            f"bf16 autocast, {probe.get('threads', '?')} thread(s); bf16 needs {probe['margin']}x).")


def tuning_blocks(analysis: dict) -> list[tuple]:
    rows, cert = [], []
    for name, a in analysis["arms"].items():
        if a["inherit"]:
            continue
        k = a["best_of_k"]
        rows.append([name, ", ".join(knob(x) for x in a["tuned_knobs"]), str(a["n_trials"]),
                     str(a["n_diverged"]), setting_str(a["chosen"]["setting"] if a["chosen"] else None),
                     fmt(a["chosen"]["final_val_loss"] if a["chosen"] else None), fmt(k[0] if k else None),
                     fmt(k[-1] if k else None)])
        for row in a["certificate"]:
            cells = [f"{c['value']:g}: {fmt(c['loss'])}" if c else "edge" for c in (row["down"], row["up"])]
            flag = "EDGE" if row["edge"] else "BEATEN" if row["beaten"] else "ok"
            cert.append([name, knob(row["axis"]), f"{row['value']:g}", *cells, flag])
    return [("h2", "Tuning"),
            ("table", ["arm", "tuned knobs", "trials", "diverged", "chosen", "its loss (tuning seed)",
                       "expected best of 1", f"best of {analysis['bench']['search']['trials']}"], rows),
            ("h3", "Local-optimality certificate (one grid step either way, tuning seed)"),
            ("table", ["arm", "axis", "chosen", "step down: loss", "step up: loss", "flag"], cert)]


def budget_table(analysis: dict) -> tuple[list[str], list[list[str]]]:
    budgets = analysis["bench"]["budgets"]
    rows = []
    for name, a in analysis["arms"].items():
        s = a["steps_to_target"]
        reach = "-" if not s else (f"{s['value']:.0f}" + (" (at or before)" if s["where"] == "at_smallest" else "")
                                   if s["reached"] else "not reached")
        first = a["first_eval_steps_to_target"]
        rows.append([name, *[fmt(dict(zip(a["budgets"], a["curve"])).get(B)) for B in budgets], reach,
                     (f"{'not reached' if first == math.inf else fmt(first, '.0f')} ({a['first_eval_reached']}/"
                     f"{a['n_seeds']} seeds)"), speedup_cell(a, name == analysis["reference"])])
    return (["arm", *[f"B={B}" for B in budgets], "steps to target (curve)", "first eval <= target, median",
             "data-equivalent speedup"], rows)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.2f} h"


def cost_blocks(analysis: dict) -> list[tuple]:
    """What reaching the target costs each arm, at its steps to target on the median curve (docs/protocol.md
    6.4.1): the training time is steps x the median seconds per step, so it includes each optimizer's step
    overhead, which the data-equivalent speedup (steps alone) does not."""
    ref, rows = analysis["reference"], []
    for name, a in analysis["arms"].items():
        c = a["to_target"]
        if not c or c["where"] == "not_reached":
            rows.append([name, *(["not reached"] if c else ["-"]), *["-"] * 4])
            continue
        bound = " (at or before)" if c["where"] == "at_smallest" else ""
        rows.append([name, f"{c['steps']:.0f}{bound}", fmt(c["tokens"], ",.0f"), fmt(c["flops"], ".3g"),
                     duration(c["train_time_s"]), fmt(c["time_vs_reference"], ".2f")])
    return [("h2", "Cost to the target (on the median curve)"),
            ("table", ["arm", "steps", "tokens", "FLOPs", "training time", f"time / {ref}'s"], rows),
            ("p", (f"Steps: where the arm's median loss-vs-budget curve reaches the target "
                  f"{fmt(analysis['target']['loss'])} (log-linear between budgets, as above); tokens = steps x tokens "
                  "per step; FLOPs = steps x the runs' charged FLOPs per step (model and optimizer matmuls); time = "
                  "steps to target x the median seconds per step of the arm's full-budget seed runs (training clock, "
                  "evaluation excluded), so it includes each optimizer's step overhead."))]


def tests_table(analysis: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for key, t in analysis["tests"].items():
        tr = t["track3"]
        rows.append([key, str(t["n"]), ci_cell(t, "+.4f"), p_cell(t), fmt(t["mdd"], ".4f"),
                     fmt(t["steps_equivalent"], "+.0f"), f"z {tr['z']:.2f}, p {tr['p']:.3g}"])
    return ["comparison", "pairs", "mean diff [95% CI]", "p / Holm", "detectable diff", "gap in reference steps",
            "track-3 pairwise"], rows


def report_blocks(analysis: dict, runs: list[RunRecord], plots: dict[str, Path], bench_dir: Path,
                  diag_runs: list[RunRecord]) -> list[tuple]:
    b = analysis["bench"]
    img = lambda name, caption: ("img", os.path.relpath(plots[name], bench_dir), caption, plots[name])
    base = analysis["baselines"] or {}
    blocks: list[tuple] = [("h1", f"Benchmark {b['name']}: {b.get('description', '')}")]
    blocks += headline(analysis)
    blocks.append(img("loss_vs_budget", "end-of-schedule loss vs budget, with the target and the n-gram lines"))
    blocks += [("warn", f) for f in analysis["flags"]]
    if analysis["few_seeds"]:
        blocks.append(("warn", ("fewer than 5 seeds per arm: the tests are low-powered (see the detectable "
                               "differences); 'no difference' means none larger than those")))
    blocks += [("p", ("n-gram baselines on the same validation tokens (counted on the training shard, interpolated "
                     f"Kneser-Ney): unigram {fmt(base.get('unigram'))}, bigram {fmt(base.get('bigram'))}, trigram "
                     f"{fmt(base.get('trigram'))} nats/token."))]
    blocks += [("table", ["workload check", "value", "bar", "met"], [
        [c["check"], fmt(c["value"], ".1%" if "share" in c["check"] else ".2f" if c["value"] is None or c["value"] > 5
                         else ".4f"), c["bar"], {True: "yes", False: "NO", None: "-"}[c["ok"]]]
        for c in analysis["workload_checks"]])]
    blocks += [("h2", "Protocol"), ("ul", protocol_lines(analysis)),
               ("h2", "Loss vs budget (median over seeds)"), ("table", *budget_table(analysis)),
               *cost_blocks(analysis),
               ("h2", "Paired comparisons (every test of this report, Holm-adjusted together)"),
               ("table", *tests_table(analysis)),
               ("p", ("Gap in reference steps: the mean difference over the reference's loss-per-step slope near "
                     "its full-budget loss (the track-3 exchange rate, read from this report's reference curve)."))]
    blocks += tuning_blocks(analysis)
    blocks.append(img("best_of_k", "expected best of k tuning trials"))
    variants = [[n, a["variant_of"], ci_cell(a["end_loss"]), ci_cell(analysis["tests"].get(f"{n} vs {a['variant_of']}"),
                                                                   "+.3f")]
                for n, a in analysis["arms"].items() if a["variant_of"]]
    if variants:
        blocks += [("h2", "Variant arms (reported apart)"),
                   ("table", ["variant", "of", "end loss [CI]", "paired diff vs its main arm [CI]"], variants)]
    blocks += [("h2", "Validation curves"), img("loss_curves", "validation loss of the full-budget seed runs")]
    blocks += diagnostics_blocks(b, runs + diag_runs, bench_dir / "plots", bench_dir)
    return blocks


CSV_FIELDS = ("phase", "arm", "trial", "seed", "init_seed", "data_seed", "budget", "setting", "final_val_loss",
              "diverged", "train_time_s", "optimizer_step_time_s", "step_overhead", "optimizer_state_bytes",
              "branch_from", "run_dir")


def runs_csv(runs: list[RunRecord]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in runs:
        s = r.summary
        writer.writerow({"phase": r.phase, "arm": r.arm, "trial": r.trial, "seed": r.seed, "init_seed": r.init_seed,
                         "data_seed": r.data_seed, "budget": r.budget, "setting": setting_str(r.setting),
                         "final_val_loss": "" if r.diverged else r.final_loss, "diverged": r.diverged,
                         "train_time_s": s.get("train_time_s"), "optimizer_step_time_s": s.get("optimizer_step_time_s"),
                         "step_overhead": step_overhead(r), "optimizer_state_bytes": s.get("optimizer_state_bytes"),
                         "branch_from": (s.get("branch") or {}).get("from", ""), "run_dir": str(r.dir)})
    return buf.getvalue()


def build_report(bench_dir: Path | str) -> dict[str, Path]:
    """Write report.md, report.html, summary.json, runs.csv and plots/*.png into bench_dir; return their paths.
    Raises RecordError for a directory that is not a v2 benchmark, has no seed runs, or mixes workloads."""
    bench_dir = Path(bench_dir)
    bench = read_bench(bench_dir)
    if bench.get("protocol") != 2:
        raise RecordError(f"{bench_dir}: a protocol v{bench.get('protocol', 1)} benchmark; this report reads v2")
    runs = load_runs(bench_dir)
    diag_runs = load_runs(bench_dir, phases=("diag",))
    analysis = analyze(bench_dir, runs)
    plots = make_plots(analysis, runs, bench_dir / "plots")
    blocks = report_blocks(analysis, runs, plots, bench_dir, diag_runs)
    out = {"md": bench_dir / "report.md", "html": bench_dir / "report.html", "csv": bench_dir / "runs.csv",
           "summary": bench_dir / "summary.json", **{f"plot_{k}": v for k, v in plots.items()},
           **{f"plot_{b[3].stem}": b[3] for b in blocks if b[0] == "img"}}  # the diagnostics PNGs too
    atomic_write_text(out["md"], to_markdown(blocks))
    atomic_write_text(out["html"], to_html(blocks, f"Benchmark report: {bench['name']}"))
    atomic_write_text(out["csv"], runs_csv(runs + diag_runs))
    atomic_write_json(out["summary"], summary(analysis))
    return out
