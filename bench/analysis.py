"""A benchmark's numbers, from bench.json and the run records alone (docs/protocol.md v2), and `summary.json`.

Per arm: the search trials and the expected best-of-k curve, the local-optimality certificate, end-of-schedule
losses at every budget on every fresh seed, the loss-vs-budget curve (median over seeds), steps to target on
it and what reaching the target costs (steps, tokens, FLOPs, training time), the data-equivalent speedup from the
reference's curve, paired differences by seed against the reference (and the Muon variants against Muon, variant
arms against their main arm) with Holm's adjustment over every test of the report, the minimum detectable
difference, the track-3 exchange rate, step overhead and state.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench import stats
from bench.baselines import baselines, ngram_flag
from bench.records import RecordError, RunRecord, check_one_workload, first_reach, read_bench

FEW_SEEDS = 5  # below this many seeds the report calls its tests low-powered


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def median(values) -> float | None:
    """The median with a diverged run (+inf) or an unreached target (+inf) counted as the worst value, so that
    more than half of them (half, of an even count) makes the median +inf; only missing values (None, NaN) are
    left out."""
    v = [x for x in values if isinstance(x, (int, float)) and not math.isnan(x)]
    return statistics.median(v) if v else None


def end_losses(runs: list[RunRecord], arm: str) -> dict[int, dict[int, float]]:
    """budget -> seed -> end-of-schedule loss (inf when diverged) of the arm's fresh-seed runs."""
    out: dict[int, dict[int, float]] = {}
    for r in runs:
        if r.arm == arm and r.phase in ("seed", "branch"):
            out.setdefault(r.budget, {})[r.seed] = r.final_loss
    return dict(sorted(out.items()))


def curve(losses: dict[int, dict[int, float]]) -> tuple[list[int], list[float | None]]:
    budgets = sorted(losses)
    return budgets, [median(losses[b].values()) for b in budgets]


def certificate(space: dict[str, dict], chosen: dict[str, Any], trials: dict[str, float]) -> list[dict]:
    """One row per tuned axis: the chosen value, its grid neighbours' losses (tune or cert runs), and the flags
    "edge" (a neighbour outside the declared range) and "beaten" (a neighbour with a lower loss)."""
    from bench.declaration import Axis
    from bench.search import setting_id

    best = trials.get(setting_id(chosen))
    rows = []
    for key, ax in space.items():
        down, up = Axis(**ax).neighbours(chosen[key])
        cells = {}
        for side, v in (("down", down), ("up", up)):
            cells[side] = None if v is None else {"value": v, "loss": trials.get(setting_id({**chosen, key: v}))}
        edge = down is None or up is None
        beaten = any(c and _finite(c["loss"]) and best is not None and c["loss"] < best for c in cells.values())
        rows.append({"axis": key, "value": chosen[key], **cells, "edge": edge, "beaten": beaten,
                     "complete": all(c is None or c["loss"] is not None for c in cells.values())})
    return rows


def end_interval(values: list[float]) -> dict[str, Any] | None:
    """The end-of-schedule loss of an arm over its fresh seeds (docs/protocol.md 5.6, 7.1): the median over every
    seed with a diverged one counted as the worst value (+inf; +inf when at least half diverged), so that it is
    the curve's point at that budget and a diverged seed cannot improve it; the mean, sd and interval over the
    finite seeds only (`n` of them; None below 2), with `n_diverged` saying how many were left out."""
    if not values:
        return None
    e = stats.interval(values) or {"n": sum(map(_finite, values)), "mean": None, "sd": None, "lo": None,
                                   "hi": None, "method": None, "of": "mean"}
    return {**e, "median": median(values), "n_diverged": sum(not _finite(x) for x in values)}


def seconds_per_step(run: RunRecord) -> float | None:
    """train_time_s / steps of a run that trained to its budget: a diverged run's few steps are dominated by the
    first step (the optimizer's FLOPs are counted there, train.py), so its rate is not the optimizer's."""
    t, n = run.summary.get("train_time_s"), run.summary.get("steps")
    return t / n if not run.diverged and _finite(t) and isinstance(n, int) and n > 0 else None


def step_overhead(run: RunRecord) -> float | None:
    """optimizer.step() time over the rest of the training time (both accumulated by train.py, synchronised)."""
    o, t = run.summary.get("optimizer_step_time_s"), run.summary.get("train_time_s")
    return o / (t - o) if _finite(o) and _finite(t) and t > o else None


def _arm(bench: dict, arm: str, runs: list[RunRecord], target: float | None) -> dict[str, Any]:
    from bench.search import setting_id

    decl = bench["arms"][arm]
    tune = [r for r in runs if r.arm == arm and r.phase == "tune"]
    cert = [r for r in runs if r.arm == arm and r.phase == "cert"]
    trials = {setting_id(r.setting): r.final_loss for r in tune + cert}
    chosen = bench.get("chosen", {}).get(arm)
    losses = end_losses(runs, arm)
    budgets, medians = curve(losses)
    full = [r for r in runs if r.arm == arm and r.phase == "seed" and r.budget == max(budgets, default=0)]
    init = median([r.evals[0]["val_loss"] for r in tune + full if r.evals and r.evals[0]["step"] == 0])
    first = [first_reach(r.evals, target) for r in full]
    return {
        "optimizer": decl["optimizer"], "description": decl.get("description", ""),
        "variant_of": decl.get("variant_of"), "inherit": decl.get("inherit", False),
        "tuned_knobs": list(decl["space"]), "space": decl["space"],
        "trials": [{"trial": r.trial, "setting": r.setting, "loss": r.final_loss, "diverged": r.diverged}
                   for r in tune],
        "n_trials": len(tune), "n_diverged": sum(r.diverged for r in tune),
        "best_of_k": stats.expected_best_of_k([r.final_loss for r in tune], init) if tune and init else [],
        "chosen": chosen,
        "certificate": certificate(decl["space"], chosen["setting"], trials) if chosen and decl["space"] else [],
        "n_cert_runs": len(cert),
        "losses": {b: dict(sorted(v.items())) for b, v in losses.items()},
        "budgets": budgets, "curve": medians,
        "n_seeds": len(losses.get(max(budgets), {})) if budgets else 0,
        "end_loss": end_interval(list(losses[max(budgets)].values())) if budgets else None,
        "first_eval_steps_to_target": median([h["step"] if h else math.inf for h in first]) if target else None,
        "first_eval_reached": sum(h is not None for h in first),
        "steps_to_target": stats.loglinear_crossing(budgets, medians, target) if target and budgets else None,
        "step_overhead": median([step_overhead(r) for r in full]),
        "seconds_per_step": median([seconds_per_step(r) for r in full]),
        # train.py's charged FLOPs per step: the model's (6N + attention, PC polynomials) and the optimizer's matmuls
        "flops_per_step": median([r.summary.get("flops_per_step") for r in full if not r.diverged]),
        "state_bytes": median([r.summary.get("optimizer_state_bytes") for r in full]),
        "tokens_per_step": full[0].summary["tokens"] / full[0].summary["steps"] if full and full[0].summary.get(
            "steps") else None,
        "hybrid": full[0].hybrid if full else None,
    }


def _target(bench: dict, arms: dict[str, dict]) -> dict[str, Any]:
    t = bench["target"]
    if t.get("loss") is not None:
        return {"loss": t["loss"], "rule": f"declared before any run ({t['source']})"}
    ref = arms.get(bench["reference"])
    loss = ref["end_loss"]["median"] if ref and ref["end_loss"] else None
    loss = loss if _finite(loss) else None  # most reference seeds diverged: there is no target to reach
    return {"loss": loss, "rule": f"the reference ({bench['reference']}) median end-of-schedule loss at the full "
                                  "budget over its fresh seeds (never the tuning seed)"}


def compare(arm: dict, ref: dict, label: str) -> dict[str, Any] | None:
    """The paired test of `arm` against `ref` at the full budget: d_s = arm_s - ref_s, one-sided (arm lower)."""
    if not arm["budgets"] or not ref["budgets"]:
        return None
    full = max(ref["budgets"])
    p = stats.paired(arm["losses"].get(full, {}), ref["losses"].get(full, {}))
    if p is None:
        return None
    rate = stats.exchange_rate(ref["budgets"], ref["curve"], ref["end_loss"]["median"]) \
        if ref["end_loss"] and _finite(ref["end_loss"]["median"]) else None
    p["against"] = label
    p["steps_equivalent"] = p["mean_diff"] / rate if rate else None  # the gap in reference steps (track 3)
    p["exchange_rate"] = rate
    arm_l, ref_l = list(arm["losses"][full].values()), list(ref["losses"][full].values())
    p["track3"] = stats.track3_pairwise(arm_l, ref_l, full, full, rate or stats.TRACK3_RATE)
    return p


def cost_to_target(arm: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any] | None:
    """What reaching the target costs the arm, read at its steps to target on the median curve (docs/protocol.md
    6.4.1): tokens = steps x tokens per step, FLOPs = steps x the runs' charged FLOPs per step, training time =
    steps x the median seconds per step, so that it includes each optimizer's own step overhead; and that time
    over the reference's. Every figure None when the curve does not reach the target (or a record lacks what it
    needs); None with no target at all. "at_smallest" figures are bounds (reached at or before the smallest
    budget)."""
    s = arm["steps_to_target"]
    if s is None:
        return None

    def times(steps: float | None, per_step: float | None) -> float | None:
        return steps * per_step if steps is not None and per_step is not None else None

    steps = s["value"]
    time = times(steps, arm["seconds_per_step"])
    ref_time = times((ref["steps_to_target"] or {}).get("value"), ref["seconds_per_step"])
    return {"steps": steps, "tokens": times(steps, arm["tokens_per_step"]),
            "flops": times(steps, arm["flops_per_step"]), "train_time_s": time,
            "time_vs_reference": time / ref_time if time is not None and ref_time else None, "where": s["where"]}


def workload_info(runs: list[RunRecord], bench: dict) -> tuple[dict[str, Any], Any]:
    """Model size (non-embedding too), tokens per step, budgets and epochs, from the records and the config."""
    import torch
    from omegaconf import OmegaConf

    from models import ROLE_GROUP, build_model
    from models.config import ModelConfig
    from optimizers.groups import split_parameters

    r = next(x for x in runs if x.phase == "seed")
    cfg = OmegaConf.load(r.dir / "config.yaml")
    mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    with torch.device("meta"):
        model = build_model(mcfg)
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())
    embedding = split.counts()["embedding"][1]  # token and position embeddings (a tied head counted once, here)
    tokens = r.summary["tokens"] / r.summary["steps"]
    return {"n_params": model.num_params(), "non_embedding_params": model.num_params() - embedding,
            "tokens_per_step": tokens, "budgets": list(bench["budgets"]), "epochs": None,
            "seq_len": int(cfg.train.seq_len), "data": cfg.data.name}, cfg


# What a workload must meet to measure optimization rather than n-gram counting in the embedding table
MIN_NON_EMBEDDING_SHARE = 0.75
MIN_TOKENS_PER_PARAM = 10.0


def workload_checks(workload: dict[str, Any], ref_loss: float | None, base: dict | None) -> list[dict[str, Any]]:
    """The workload against the bars of a benchmark that measures optimization: non-embedding parameters
    (Kaplan's count: no token or position embedding) >= 75% of the model, >= 10 tokens per non-embedding
    parameter at the full budget, the reference's end-of-schedule loss below the trigram baseline on the same
    validation tokens; the epoch count is stated, not barred."""
    share = workload["non_embedding_params"] / workload["n_params"]
    per_param = workload["budgets"][-1] * workload["tokens_per_step"] / workload["non_embedding_params"]
    trigram = (base or {}).get("trigram")
    beats = None if ref_loss is None or trigram is None or not math.isfinite(ref_loss) else ref_loss < trigram
    return [
        {"check": "non-embedding share of the parameters", "value": share, "bar": f">= {MIN_NON_EMBEDDING_SHARE:.0%}",
         "ok": share >= MIN_NON_EMBEDDING_SHARE},
        {"check": "tokens per non-embedding parameter (full budget)", "value": per_param,
         "bar": f">= {MIN_TOKENS_PER_PARAM:g}", "ok": per_param >= MIN_TOKENS_PER_PARAM},
        {"check": "reference's end-of-schedule loss (median) vs the trigram", "value": ref_loss,
         "bar": f"< {trigram:.4f}" if trigram is not None else "< trigram (not computed)", "ok": beats},
        {"check": "epochs of the training tokens (full budget)", "value": workload.get("epochs"), "bar": "stated",
         "ok": None},
    ]


def ngram_lines(cfg) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    from data.config import DataConfig
    from data.loader import TokenData
    from harness.lifecycle.records import REPO

    dcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
    data_dir = dcfg.dir if Path(dcfg.dir).is_absolute() else str(REPO / dcfg.dir)
    try:
        data = TokenData(data_dir, dcfg, int(cfg.train.seq_len))
    except (OSError, ValueError):
        return None
    return baselines(data, int(cfg.train.seq_len), int(cfg.train.eval_batch_size))


def code_label(code: dict[str, Any]) -> str:
    """A run's code version as reports group it: the hash of the code's tree (documents, tests and results
    left out, harness/lifecycle/records.py), else the commit; `-dirty` for uncommitted code changes."""
    tag = code.get("tree") or code.get("commit") or "unknown"
    return tag[:12] + ("-dirty" if code.get("dirty") else "")


def analyze(bench_dir: Path | str, runs: list[RunRecord]) -> dict[str, Any]:
    bench = read_bench(bench_dir)
    main = [a for a, d in bench["arms"].items() if not d.get("variant_of")]
    for budget in sorted({r.budget for r in runs if r.phase in ("seed", "branch") and r.arm in main}):
        if not bench.get("tune_hybrid_lr"):
            # the compared runs (fresh seeds); tuning runs may differ in the shared group by design (the
            # reference's own tuning with hybrid.from_reference)
            check_one_workload([r for r in runs if r.budget == budget and r.arm in main
                                and r.phase in ("seed", "branch")], f"{bench_dir} at budget {budget}")
    if not any(r.phase == "seed" for r in runs):
        raise RecordError(f"{bench_dir}: no complete seed run yet (the report needs the fresh seeds)")
    order = bench.get("arm_order") or list(bench["arms"])  # the declaration's order (bench.json's keys are sorted)
    bench["arms"] = {a: bench["arms"][a] for a in order}
    arms = {a: _arm(bench, a, runs, None) for a in bench["arms"]}
    target = _target(bench, arms)
    arms = {a: _arm(bench, a, runs, target["loss"]) for a in bench["arms"]}
    ref_name, muon = bench["reference"], bench["muon_reference"]
    ref = arms[ref_name]
    tests: dict[str, dict] = {}
    for name, a in arms.items():
        if a["state_bytes"] and ref["state_bytes"]:  # variants too: a whole-model variant's memory claim
            a["state_ratio"] = a["state_bytes"] / ref["state_bytes"]
        if a["variant_of"]:
            t = compare(a, arms[a["variant_of"]], a["variant_of"])
            if t:
                tests[f"{name} vs {a['variant_of']}"] = t
            continue
        if name != ref_name and (t := compare(a, ref, ref_name)):
            tests[f"{name} vs {ref_name}"] = t
        if name in bench.get("muon_variants", []) and muon in arms and (t := compare(a, arms[muon], muon)):
            tests[f"{name} vs {muon}"] = t
        full = max(ref["budgets"]) if ref["budgets"] else None
        if a["end_loss"] and ref["budgets"] and full in a["losses"]:
            a["data_equivalent_speedup"] = stats.data_equivalent_speedup(
                ref["budgets"], ref["curve"], full, a["end_loss"]["median"])
            # at every budget: the largest one where the reference's curve brackets the arm's loss is the figure
            # that needs no extrapolation (a better arm's full-budget loss lies below all of the reference's)
            a["data_equivalent_by_budget"] = {
                B: stats.data_equivalent_speedup(ref["budgets"], ref["curve"], B, loss)
                for B, loss in zip(a["budgets"], a["curve"]) if loss is not None and math.isfinite(loss)}
    for a in arms.values():
        a["to_target"] = cost_to_target(a, ref)
    for key, p in stats.holm({k: t["p"] for k, t in tests.items()}).items():
        tests[key]["p_holm"] = p
    workload, cfg = workload_info(runs, bench)
    base = ngram_lines(cfg)
    if base and base.get("train_tokens"):
        workload["epochs"] = bench["budgets"][-1] * workload["tokens_per_step"] / base["train_tokens"]
    flags = [f for f in [ngram_flag(ref["end_loss"]["median"] if ref["end_loss"] else None, base)
                         if base else None] if f]
    for name, a in arms.items():
        for row in a["certificate"]:
            if row["edge"] or row["beaten"]:
                flags.append(f"{name}: the chosen {row['axis']}={row['value']:g} is "
                             + ("at the edge of its range" if row["edge"] else "beaten by a neighbour"))
        gone = {f"s{s} at {b}" for b, v in a["losses"].items() for s, x in v.items() if not _finite(x)}
        if gone:  # otherwise silent: the interval and paired tests use the finite losses, the curve all of them
            flags.append(f"{name}: fresh-seed runs diverged ({', '.join(sorted(gone))}); left out of its end-loss "
                         "mean, interval and paired tests, counted as the worst value in its medians (the "
                         "end-of-schedule loss, the loss-vs-budget curve, steps to target, speedups)")
        d = a.get("data_equivalent_speedup")
        if d and d["extrapolated"]:
            flags.append(f"{name}: its data-equivalent speedup is extrapolated beyond the reference's budgets")
    checks = workload_checks(workload, ref["end_loss"]["median"] if ref["end_loss"] else None, base)
    failed = [c["check"] for c in checks if c["ok"] is False]
    if failed:
        flags.append("the workload misses the bars of a benchmark that measures optimization (" + "; ".join(failed)
                     + "): read its differences as differences in learning n-gram statistics")
    codes = sorted({code_label(r.env.get("code") or {}) for r in runs})
    return {"bench": bench, "arms": arms, "tests": tests, "target": target, "baselines": base,
            "workload": workload, "workload_checks": checks, "flags": flags, "code_versions": codes, "reference": ref_name,
            "muon_reference": muon, "few_seeds": min((a["n_seeds"] for a in arms.values()), default=0) < FEW_SEEDS}


def summary(analysis: dict[str, Any]) -> dict[str, Any]:
    """results/<bench>/summary.json: the machine-readable headline that other tools and the README read (tests/test_docs.py)."""
    b, ref = analysis["bench"], analysis["reference"]
    arms = {}
    for name, a in analysis["arms"].items():
        t = analysis["tests"].get(f"{name} vs {a['variant_of'] or ref}")
        e = a["end_loss"]
        arms[name] = {
            "optimizer": a["optimizer"], "variant_of": a["variant_of"], "n_seeds": a["n_seeds"],
            "n_seeds_diverged": e["n_diverged"] if e else 0,
            "trials": a["n_trials"], "tuned_knobs": a["tuned_knobs"],
            "chosen": a["chosen"]["setting"] if a["chosen"] else None,
            # median: every seed, a diverged one as +inf, null when that makes it +inf (JSON has no inf); mean and
            # ci: the n_finite finite seeds only (docs/protocol.md 5.6)
            "end_loss": {"median": e["median"] if _finite(e["median"]) else None, "mean": e["mean"],
                         "ci": [e["lo"], e["hi"]], "ci_method": e["method"], "ci_of": "mean",
                         "n_finite": e["n"]} if e else None,
            "curve": dict(zip(a["budgets"], a["curve"])),
            "vs_reference": {"against": t["against"], "mean_diff": t["mean_diff"], "ci": [t["lo"], t["hi"]],
                             "p": t["p"], "p_holm": t.get("p_holm"), "mdd": t["mdd"], "n": t["n"]} if t else None,
            "data_equivalent_speedup": a.get("data_equivalent_speedup") and {
                "value": a["data_equivalent_speedup"]["value"],
                "extrapolated": a["data_equivalent_speedup"]["extrapolated"]},
            "data_equivalent_by_budget": {B: {"value": x["value"], "extrapolated": x["extrapolated"]}
                                          for B, x in (a.get("data_equivalent_by_budget") or {}).items()},
            "steps_to_target": a["steps_to_target"], "seconds_per_step": a["seconds_per_step"],
            "flops_per_step": a["flops_per_step"], "to_target": a["to_target"], "step_overhead": a["step_overhead"],
            "state_ratio": a.get("state_ratio")}
    base = analysis["baselines"] or {}
    return {"protocol": 2, "bench": b["name"], "code_versions": analysis["code_versions"],
            "workload": analysis["workload"], "workload_checks": analysis["workload_checks"],
            "precision": b.get("precision_probe"),
            "baselines": {k: base.get(k) for k in ("unigram", "bigram", "trigram")},
            "hybrid": b.get("hybrid_used"), "hybrid_source": b["hybrid"].get("source"),
            "hybrid_chosen_by": (b.get("hybrid_chosen") or {}).get("by"),
            "target": analysis["target"], "reference": ref, "search": b["search"], "arms": arms,
            "flags": analysis["flags"]}
