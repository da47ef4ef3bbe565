"""The benchmark report's section "Diagnostics: why an optimizer wins", built from the diagnostics.jsonl of
each seed run (train.py writes one line per diagnostic step when run with `diagnostics.every=N`): per-layer
update geometry, gradient noise and curvature, compared across arms over training. Where an arm has runs of
the "diag" phase (its seed runs re-run with diagnostics on, untimed), those are used instead of its seed runs.

    python scripts/report.py results/bench_tiny
    (the section of report.md and report.html; plots/diagnostics_trajectories.png and diagnostics_roles.png)

An arm's line is the median over its seed runs at each diagnostic step that every one of them recorded; bands
and ranges are min..max over those seeds. Diverged runs are left out, and the section names them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.plots import DPI, _colors
from bench.records import RecordError, RunRecord

FILE = "diagnostics.jsonl"
PNGS = ("diagnostics_trajectories.png", "diagnostics_roles.png")
MOONLIGHT_RMS = 0.2  # Liu et al. 2025 (Moonlight): Muon's update scaled to RMS 0.2 x lr matches AdamW's
ALL = ("roles", "all")  # the mean over every hidden matrix
# (path into a diagnostics line, panel title, log y, dashed reference line): the trajectory figure's panels
PANELS = (
    (ALL + ("update_stable_rank",), "update stable rank (all matrices)", False, None),
    (ALL + ("update_rms_per_lr",), f"update RMS / lr (dashed: Moonlight's {MOONLIGHT_RMS})", False,
     MOONLIGHT_RMS),
    (ALL + ("update_to_weight",), "update / weight", True, None),
    (ALL + ("cos_update_grad",), "cos(update, gradient)", False, None),
    (ALL + ("weight_stable_rank",), "weight stable rank", False, None),
    (("noise", "noise_to_signal"), "gradient noise / signal", True, None),
    (("hessian", "lambda_max"), "sharpness λ_max", True, None),
    (("hessian", "step_curvature_ratio"), "step overshoot uᵀHu/2(-gᵀu) (1 = line minimum passed)", True,
     1.0),
    (("hessian", "sharpness_x_lr_over_2"), "λ_max·lr/2, first group's lr (1 = GD's limit)", True, 1.0),
    (("hessian", "trace"), "Hessian trace", False, None),
    (("hessian", "block_offdiag_share"), "off-block-diagonal share of curvature", False, None),
)
# (path, header): the table at the last diagnostic step
SUMMARY = (
    (ALL + ("update_rms_per_lr",), "update RMS / lr"), (ALL + ("update_stable_rank",), "update stable rank"),
    (ALL + ("update_eff_rank",), "update eff. rank"), (ALL + ("update_nuc_over_fro",), "nuclear / Frobenius"),
    (ALL + ("update_to_weight",), "update / weight"), (ALL + ("cos_update_grad",), "cos(update, grad)"),
    (ALL + ("weight_stable_rank",), "weight stable rank"), (("noise", "noise_to_signal"), "noise / signal"),
    (("hessian", "lambda_max"), "λ_max"), (("hessian", "step_sharpness"), "curvature along the step"),
    (("hessian", "step_curvature_ratio"), "step overshoot"), (("hessian", "sharpness_x_lr_over_2"), "λ_max·lr/2"),
    (("hessian", "trace"), "trace"), (("hessian", "block_offdiag_share"), "off-block-diagonal share"),
)
# (stat key, header): the per-role table
ROLE_STATS = (
    ("update_rms_per_lr", "update RMS / lr"), ("update_stable_rank", "update stable rank"),
    ("update_eff_rank", "update eff. rank"), ("update_to_weight", "update / weight"),
    ("cos_update_grad", "cos(update, grad)"), ("weight_spectral_norm", "weight spectral norm"),
    ("weight_stable_rank", "weight stable rank"), ("grad_noise_to_signal", "grad noise / signal"),
)

Seeds = list[dict[int, dict[str, Any]]]  # an arm's seed runs, each as {step: diagnostics line}


def load_diagnostics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's diagnostics lines in file order; [] when it has no diagnostics.jsonl. Blank lines are
    skipped; a line that is not a JSON object with an integer "step" raises RecordError naming the file and
    the line."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}, line {i}: not JSON ({e.msg})") from e
        if not isinstance(rec, dict) or type(rec.get("step")) is not int:
            raise RecordError(f"{path}, line {i}: a diagnostics line is a JSON object with an integer 'step'")
        out.append(rec)
    return out


def _value(rec: Any, path: tuple[str, ...]) -> float | None:
    """The finite number at path in a diagnostics line; None where it is absent, null or not finite."""
    for key in path:
        rec = rec.get(key) if isinstance(rec, dict) else None
    ok = isinstance(rec, (int, float)) and not isinstance(rec, bool) and math.isfinite(rec)
    return float(rec) if ok else None


def series(seeds: Seeds, path: tuple[str, ...]) -> list[tuple[int, float, float, float]]:
    """(step, median, min, max) over the seeds, at every step that each seed recorded and has a value for."""
    out = []
    for step in sorted(set.intersection(*(set(s) for s in seeds))):
        vals = [_value(s[step], path) for s in seeds]
        if None not in vals:
            out.append((step, statistics.median(vals), min(vals), max(vals)))
    return out


def _g(x: float) -> str:
    return f"{x:.3g}"


def last_cell(seeds: Seeds, path: tuple[str, ...], spread: bool = True) -> str:
    """The median (min..max when several seeds) at the arm's last common diagnostic step; where that step
    lacks the quantity (e.g. the Hessian is measured less often), at the last step that has it, named."""
    s = series(seeds, path)
    if not s:
        return "-"
    step, med, lo, hi = s[-1]
    text = _g(med) + (f" ({_g(lo)}..{_g(hi)})" if spread and len(seeds) > 1 else "")
    return text + ("" if step == max(set.intersection(*(set(x) for x in seeds))) else f", step {step}")


def seed_diagnostics(bench: dict, runs: list[RunRecord]) -> tuple[dict[str, list[list[dict]]], list[str],
                                                                    list[str]]:
    """{arm: [each non-diverged seed run's diagnostics lines]} for the runs that have any (arms in bench.json
    order), from the arm's diag-phase runs where it has any, else its seed-phase runs; the names
    ("phase/arm/trial") of the diverged runs left out, and of the others without lines."""
    order = {arm: i for i, arm in enumerate(bench["arms"])}
    with_diag = {r.arm for r in runs if r.phase == "diag"}
    used = (r for r in runs if r.phase == ("diag" if r.arm in with_diag else "seed"))
    arms: dict[str, list[list[dict]]] = {}
    diverged, without = [], []
    for r in sorted(used, key=lambda r: order.get(r.arm, len(order))):
        name = f"{r.phase}/{r.arm}/{r.trial}"
        if r.diverged:
            diverged.append(name)
        elif lines := load_diagnostics(r.dir):
            arms.setdefault(r.arm, []).append(lines)
        else:
            without.append(name)
    return arms, diverged, without


def by_step(lines: list[dict]) -> dict[int, dict]:
    """{step: line}; a step written twice (a resumed run re-doing steps) keeps its later line."""
    return {rec["step"]: rec for rec in lines}


def roles_of(arms: dict[str, Seeds]) -> list[str]:
    """Every role any line names, in first-seen order, with "all" last."""
    seen = dict.fromkeys(role for seeds in arms.values() for s in seeds for rec in s.values()
                         for role in (rec.get("roles") or {}))
    return [r for r in seen if r != "all"] + (["all"] if "all" in seen else [])


def summary_table(arms: dict[str, Seeds]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "seeds", "last step", *(h for _, h in SUMMARY)]
    rows = [[arm, str(len(seeds)), str(max(set.intersection(*(set(s) for s in seeds)), default="-")),
             *(last_cell(seeds, path) for path, _ in SUMMARY)] for arm, seeds in arms.items()]
    return headers, rows


def role_table(arms: dict[str, Seeds]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for arm, seeds in arms.items():
        for role in roles_of({arm: seeds}):
            cells = [last_cell(seeds, ("roles", role, k), spread=False) for k, _ in ROLE_STATS]
            rows.append([arm, role, *cells])
    return ["arm", "role", *(h for _, h in ROLE_STATS)], rows


def cost_table(arms: dict[str, list[list[dict]]]) -> tuple[list[str], list[list[str]]]:
    """Per arm: the mean seconds per call of each cost_s component over every line of every seed run, and the
    diagnostics seconds per run (the sum of all its lines' costs; mean, min..max when several runs)."""
    parts = list(dict.fromkeys(k for runs in arms.values() for lines in runs for rec in lines
                               for k in (rec.get("cost_s") or {})))
    rows = []
    for arm, runs in arms.items():
        row = [arm, _g(statistics.mean(len(lines) for lines in runs))]
        for part in parts:
            vals = [v for lines in runs for rec in lines if (v := _value(rec, ("cost_s", part))) is not None]
            row.append(_g(statistics.mean(vals)) if vals else "-")
        totals = [sum(v for rec in lines for p in parts if (v := _value(rec, ("cost_s", p))) is not None)
                  for lines in runs]
        row.append(_g(statistics.mean(totals))
                   + (f" ({_g(min(totals))}..{_g(max(totals))})" if len(totals) > 1 else ""))
        rows.append(row)
    return ["arm", "diagnostic steps per run", *(f"{p} (s per call)" for p in parts), "total s per run"], rows


def plot_trajectories(title: str, arms: dict[str, Seeds], colors: dict, path: Path) -> Path | None:
    """One panel per quantity with data (PANELS): x = step, median line and min..max band per arm. None (and
    nothing written) when no quantity has data."""
    panels = [(p, {arm: s for arm, seeds in arms.items() if (s := series(seeds, p[0]))}) for p in PANELS]
    panels = [(p, data) for p, data in panels if data]
    if not panels:
        return None
    nrows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(11, 2.6 * nrows + 0.5), dpi=DPI, layout="constrained")
    fig.suptitle(f"{title}: diagnostics over training (median over seeds, band = min..max)")
    for i, ((_, name, log, ref), data) in enumerate(panels):
        ax = fig.add_subplot(nrows, 2 if len(panels) > 1 else 1, i + 1)
        ax.grid(alpha=0.3)
        for arm, s in data.items():
            steps, med, lo, hi = zip(*s)
            ax.plot(steps, med, "o-", markersize=3, color=colors[arm],
                    label=f"{arm} ({len(arms[arm])} seeds)")
            ax.fill_between(steps, lo, hi, color=colors[arm], alpha=0.2)
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", linewidth=1)
        log = log and all(v > 0 for s in data.values() for p in s for v in p[1:])
        if log:
            ax.set_yscale("log")
        ax.set_title(name + (" (log scale)" if log else ""), fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        if i == 0:
            fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=min(len(data), 5),
                       fontsize=8)
    fig.savefig(path)
    return path


def plot_roles(title: str, arms: dict[str, Seeds], colors: dict, path: Path) -> Path | None:
    """The update stable rank per role at the last diagnostic step: one bar per arm in each role's group
    (median over seeds, whiskers min..max). None when no role has it."""
    roles = roles_of(arms)
    key = "update_stable_rank"
    last = {arm: {role: s[-1] for role in roles if (s := series(seeds, ("roles", role, key)))}
            for arm, seeds in arms.items()}
    if not any(last.values()):
        return None
    fig = Figure(figsize=(8, 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"{title}: update stable rank per role at the last diagnostic step")
    ax.grid(alpha=0.3, axis="y")
    width = 0.8 / len(arms)
    for j, (arm, vals) in enumerate(last.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i, role in enumerate(roles) if role in vals]
        med, lo, hi = ([v[k] for v in vals.values()] for k in (1, 2, 3))
        ax.bar(xs, med, width, color=colors[arm], alpha=0.85, label=arm)
        ax.errorbar(xs, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                    fmt="none", color="black", capsize=3)
    ax.set_xticks(range(len(roles)), [("all (mean)" if r == "all" else r) for r in roles], rotation=30)
    ax.set_xlabel("role of the hidden matrix (whiskers: min..max over seeds)")
    ax.set_ylabel("update stable rank ||U||_F² / ||U||_2²")
    ax.legend()
    fig.savefig(path)
    return path


def intro(arms: dict[str, Seeds]) -> str:
    lines = [rec for seeds in arms.values() for s in seeds for rec in s.values()]
    noise = next((rec["noise"] for rec in lines if isinstance(rec.get("noise"), dict)), None)
    hess = next((rec["hessian"] for rec in lines if isinstance(rec.get("hessian"), dict)), None)
    return (
        "What happens inside training, per arm. Update geometry of the hidden matrices (means over the "
        "matrices of a role; `all` = every hidden matrix): the update's RMS per unit learning rate "
        f"(Moonlight's AdamW-matching update RMS is {MOONLIGHT_RMS}), its stable rank ||U||_F²/||U||_2² and "
        "effective rank (how many directions an update spreads over), its nuclear/Frobenius ratio, its size "
        "relative to the weight, its cosine with the gradient, and the weights' stable rank. Gradient noise: "
        "noise-to-signal ratio of the gradient"
        + (f" (from {noise.get('pieces')} pieces of {noise.get('piece_tokens')} tokens)" if noise else "")
        + ". Curvature on a fixed probe batch: the Hessian's top eigenvalue λ_max (sharpness), its trace and "
        "the share of curvature off the block diagonal"
        + (f" (blocks: {hess.get('blocks')})" if hess and hess.get("blocks") else "")
        + "; gradient descent is stable only while sharpness < 2/lr, i.e. λ_max·lr/2 < 1, but an lr means "
        "different things to different optimizers (λ_max·lr/2 uses the first parameter group's), so the "
        "comparable quantity is the step overshoot (uᵀHu/2)/(-gᵀu) of the actual update u against the probe "
        "gradient g: GD's lr·λ/2 along an eigenvector, and > 1 when a step passes the minimum along its own "
        "line. Lines: median "
        "over an arm's seed runs at each diagnostic step all of them recorded; band and ranges: min..max "
        "over seeds.")


def diagnostics_blocks(bench: dict, runs: list[RunRecord], plots_dir: Path, bench_dir: Path) -> list[tuple]:
    """The section as report blocks (bench/render.py); writes its PNGs into plots_dir (and removes
    stale ones of an earlier report that this one does not draw)."""
    raw, diverged, without = seed_diagnostics(bench, runs)
    arms = {arm: [by_step(lines) for lines in seeds] for arm, seeds in raw.items()}
    left_out = f" Diverged runs are left out: {', '.join(diverged)}." if diverged else ""
    blocks: list[tuple] = [("h2", "Diagnostics: why an optimizer wins")]
    plots_dir, drawn = Path(plots_dir), []
    if not arms:
        text = (f"Diagnostics were not recorded: no seed run (diverged runs aside) has a {FILE}. To see "
                f"them, run the benchmark with diagnostics on (`diagnostics.every=N`).{left_out}")
        blocks.append(("p", text))
    else:
        plots_dir.mkdir(parents=True, exist_ok=True)
        colors = _colors(list(dict.fromkeys([*bench["arms"], *arms])))
        missing = f" Runs without {FILE}: {', '.join(without)}." if without else ""
        blocks.append(("p", intro(arms) + left_out + missing))
        traj = plot_trajectories(bench["name"], arms, colors, plots_dir / PNGS[0])
        roles = plot_roles(bench["name"], arms, colors, plots_dir / PNGS[1])
        drawn = [p for p in (traj, roles) if p]
        if traj:
            blocks.append(("img", os.path.relpath(traj, bench_dir), "diagnostics over training", traj))
        blocks += [("h3", "At the last diagnostic step (median over seeds, min..max)"),
                   ("table", *summary_table(arms))]
        if roles:
            blocks.append(("img", os.path.relpath(roles, bench_dir), "update stable rank per role", roles))
        blocks += [("h3", "Per role at the last diagnostic step (median over seeds)"),
                   ("table", *role_table(arms)),
                   ("h3", "What the diagnostics cost"), ("table", *cost_table(raw))]
    for stale in {plots_dir / p for p in PNGS} - set(drawn):
        stale.unlink(missing_ok=True)
    return blocks
