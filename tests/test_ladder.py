"""The scaling ladder (scripts/ladder.py declares and runs it, bench/ladder.py fits and reports): budgets follow
the tokens-per-parameter rule exactly, every bad declaration is refused in one line before any compute, the fit
recovers known slopes from constructed rung directories, the paired seed bootstrap covers the true slope and
widens with the seed noise, and the report says in words whether each gain shrinks or grows with scale."""

import csv
import importlib.util
import json
import math
import shutil
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO
from synthetic_bench import write_bench, write_run

from bench import rungs
from bench.analysis import analyze, summary
from bench.declaration import BenchError, composed_schedule
from bench.ladder import LADDER_FILE, RungLosses, build_ladder_report, fit_flags, fits
from bench.launch import hydra_command
from bench.records import load_runs

LR = {"default": 3.0e-3, "low": 1.0e-4, "high": 3.0e-2, "step": 3.1623, "source": "test"}
WD = {"default": 0.1, "low": 0.01, "high": 1.0, "step": 3.1623, "source": "test"}
MUON_LR = {"default": 0.02, "low": 2.0e-3, "high": 0.2, "step": 3.1623, "source": "test"}
BASE_OVERRIDES = ["schedule=wsd", "schedule.warmup_steps=1", "schedule.decay_frac=0.25", "schedule.min_lr_frac=0.0"]
# experiment smoke: 64 tokens x 8 sequences = 512 tokens/step. GPT-2, 1 layer, width d: N = 12 d^2 + 13 d (the
# block) + 2 d (the final LayerNorm): d 16 -> 3,312, d 32 -> 12,768, d 64 -> 50,112
N = {16: 3312, 32: 12768, 64: 50112}


def load_script():
    spec = importlib.util.spec_from_file_location("ladder_script", REPO / "scripts" / "ladder.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    return script


ladder = load_script()


def bench_decl(**changes):
    d = {"name": "lbase", "protocol": 2, "experiment": "smoke", "overrides": list(BASE_OVERRIDES),
         "budgets": [4, 8, 12], "hybrid": {"lr": 3.0e-3, "source": "test"}, "search": {"method": "coordinate",
         "trials": 3}, "reference": "adamw", "muon_variants": [], "tuning_seed": 0, "seeds": [1, 2, 3],
         "launcher": "basic", "logger": "none",
         "arms": {"adamw": {"optimizer": "adamw", "space": {"optimizer.lr": LR, "optimizer.weight_decay": WD}},
                  "muon": {"optimizer": "muon", "space": {"optimizer.lr": MUON_LR, "optimizer.weight_decay": WD}}}}
    d.update(changes)
    return d


def rung(d, name=None):
    return {"name": name or f"d{d}", "set": {"model.n_layer": 1, "model.n_head": 2, "model.d_model": d}}


def write_ladder(tmp_path, base=None, **changes):
    base_path = tmp_path / "lbase.yaml"
    base_path.write_text(yaml.safe_dump(base or bench_decl()))
    d = {"name": "t", "base": str(base_path), "arms": ["adamw", "muon"], "tokens_per_param": 10,
         "warmup_frac": 0.05, "rungs": [rung(16), rung(32), rung(64)]}
    d.update(changes)
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


def shared_bench(tmp_path, budgets=(245, 490, 979), warmup=49, arms=None):
    """A declared benchmark at width 64 (N 50,112), usable as the ladder's `bench` rung."""
    d = bench_decl(name="lshared", budgets=list(budgets),
                   overrides=[*BASE_OVERRIDES[:1], f"schedule.warmup_steps={warmup}", *BASE_OVERRIDES[2:],
                              "model.n_layer=1", "model.n_head=2", "model.d_model=64"])
    if arms:
        d["arms"] = arms
    path = tmp_path / "lshared.yaml"
    path.write_text(yaml.safe_dump(d))
    return {"name": "d64", "bench": str(path)}


def test_budget_rule_numbers():
    # the standard benchmark: N 396,800 at 4,096 tokens/step -> round(968.75) = 969, round(242.25), round(484.5)
    assert rungs.derived_budgets(10, 396_800, 4096) == [242, 484, 969]
    assert rungs.derived_budgets(10, 25_472, 4096) == [16, 31, 62]  # round(62.1875); round(15.5) = 16, even
    assert rungs.derived_budgets(20, 302_311_424, 524_288) == [2883, 5766, 11532]


def test_rungs_get_their_budgets_warmup_and_model(tmp_path):
    lad = rungs.load_ladder(write_ladder(tmp_path), out=tmp_path / "out")
    # B = round(10 N / 512): 64.6875 -> 65, 249.375 -> 249, 978.75 -> 979; warmup round(0.05 B): 3, 12, 49
    got = {r.name: (r.n, list(r.bench.budgets), r.bench.schedule["warmup_steps"]) for r in lad.rungs}
    assert got == {"d16": (3312, [16, 32, 65], 3), "d32": (12768, [62, 124, 249], 12),
                   "d64": (50112, [245, 490, 979], 49)}
    assert all(r.bench.schedule == composed_schedule(r.bench) for r in lad.rungs)  # as load_bench would set
    r = lad.rungs[0]
    assert r.bench.overrides == ["schedule=wsd", "schedule.decay_frac=0.25", "schedule.min_lr_frac=0.0",
                                 "schedule.warmup_steps=3", "model.n_layer=1", "model.n_head=2", "model.d_model=16"]
    assert r.dir == tmp_path / "out" / "d16" and not r.shared and r.tokens == 65 * 512
    assert r.bench.description == (f"rung d16 of ladder t: the {lad.base.name} benchmark's workload with "
                                   f"model.n_layer=1 model.n_head=2 model.d_model=16 ({r.size['n_params']:,} "
                                   f"params, {3312 / r.size['n_params']:.0%} non-embedding), budgets 16/32/65 "
                                   "steps x 512 tokens")  # its own size, not the base's description
    assert "model.d_model=16" in hydra_command(r.bench, r.dir, ["x"])  # the multirun trains this size


def test_shared_rung_is_the_benchmark_itself(tmp_path):
    lad = rungs.load_ladder(write_ladder(tmp_path, rungs=[rung(16), rung(32), shared_bench(tmp_path)]))
    r = lad.rungs[-1]
    assert r.shared and r.bench.name == "lshared" and r.dir == REPO / "results" / "bench_lshared"
    assert list(r.bench.budgets) == [245, 490, 979] and r.n == N[64]


@pytest.mark.parametrize("changes, message", [
    ({"rungs": [rung(16), rung(32)]}, "ladder.rungs: need >= 3 rungs (model sizes), got 2"),
    ({"rungs": [rung(16), rung(20), rung(24)]}, "ladder.rungs: the sizes span 2.2x in non-embedding parameters"),
    ({"tokens_per_parm": 10}, "ladder.tokens_per_parm: unknown key (did you mean ladder.tokens_per_param?)"),
    ({"rungs": [rung(16), rung(32), {"name": "d64", "sett": {}}]},
     "ladder.rungs.d64.sett: unknown key (did you mean ladder.rungs.d64.set?)"),
    ({"arms": ["adamw", "muon", "lion"]}, "ladder.arms: 'lion' is not an arm of bench lbase"),
    ({"arms": ["muon"]}, "ladder.arms: must include bench lbase's reference 'adamw'"),
    ({"arms": ["adamw"]}, "ladder.arms: must include bench lbase's Muon reference 'muon'"),
    ({"rungs": [rung(16), rung(32), {"name": "d64", "set": {"train.seq_len": 32}}]},
     "ladder.rungs.d64.set: 'train.seq_len': a rung sets model.* keys"),
    ({"rungs": [rung(16), rung(32), {"name": "x", "set": {"model.d_model": 30, "model.n_head": 4}}]},
     "ladder.rungs.x.set: model.n_head: d_model=30 is not divisible by n_head=4"),
    ({"rungs": [rung(16), rung(32), {**rung(64), "bench": "tiny"}]}, "ladder.rungs.d64: either set"),
    ({"rungs": [rung(16), rung(16, "d16"), rung(64)]}, "ladder.rungs: 'd16': names are unique"),
])
def test_refusals_are_one_line(tmp_path, changes, message):
    with pytest.raises(BenchError) as e:
        rungs.load_ladder(write_ladder(tmp_path, **changes))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("kw, message", [
    ({"budgets": (245, 490, 980)}, "bench lshared's budgets [245, 490, 980] are not the ladder's [245, 490, 979]"),
    ({"warmup": 48}, "bench lshared's schedule.warmup_steps 48 is not the ladder's round(0.05 x 979) = 49"),
    ({"arms": {"adamw": {"optimizer": "adamw", "space": {"optimizer.lr": LR, "optimizer.weight_decay": WD}}}},
     "bench lshared lacks the ladder's arms ['muon']"),
])
def test_shared_rung_refusals(tmp_path, kw, message):
    with pytest.raises(BenchError) as e:
        rungs.load_ladder(write_ladder(tmp_path, rungs=[rung(16), rung(32), shared_bench(tmp_path, **kw)]))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_ladder_dir_refuses_another_ladder(tmp_path):
    lad = rungs.load_ladder(write_ladder(tmp_path), out=tmp_path / "out")
    rungs.open_ladder_dir(lad)
    rungs.open_ladder_dir(lad)  # a rerun continues
    path = tmp_path / "out" / LADDER_FILE
    rec = json.loads(path.read_text())
    rec["rungs"][0]["budgets"] = [1, 2, 3]
    path.write_text(json.dumps(rec))
    with pytest.raises(BenchError, match="holds a ladder with other rungs"):
        rungs.open_ladder_dir(lad)


def test_dry_run_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert ladder.main([write_ladder(tmp_path), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[245, 490, 979]" in text and "rung d16: experiment=smoke" in text and "tune round 0" in text
    assert not out.exists()


def test_run_goes_rung_by_rung(tmp_path, monkeypatch):
    import bench.run

    calls = []
    monkeypatch.setattr(bench.run, "run_benchmark", lambda b, out, dry_run=False: calls.append((b.name, out)))
    out = tmp_path / "out"
    path = write_ladder(tmp_path, rungs=[rung(16), rung(32), shared_bench(tmp_path)])
    assert ladder.main([path, "--out", str(out), "--skip-shared", "--no-report"]) == 0
    assert calls == [("ladder_t_d16", out / "d16"), ("ladder_t_d32", out / "d32")]  # the shared rung left alone
    rec = json.loads((out / LADDER_FILE).read_text())
    assert [(r["name"], r["shared"], (out / r["dir"]).resolve()) for r in rec["rungs"]] == [
        ("d16", False, out / "d16"), ("d32", False, out / "d32"), ("d64", True, REPO / "results" / "bench_lshared")]


def test_cpu_ladder_dry_run(tmp_path, capsys):
    if not (REPO / "conf" / "bench" / "standard.yaml").is_file():
        pytest.skip("conf/bench/standard.yaml (the cpu ladder's base) is not written yet")
    assert ladder.main(["cpu", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    for line in ("[16, 31, 62]", "[61, 122, 244]", "[137, 274, 547]", "[242, 484, 969]", "25,472", "396,800"):
        assert line in text


def test_gpu_ladder_loads_without_data():
    # composing the configs and building the models on the meta device reads no FineWeb shard and needs no GPU
    lad = rungs.load_ladder("gpu")
    assert [(r.n, list(r.bench.budgets)) for r in lad.rungs] == [
        (31_524_864, [301, 602, 1203]), (85_056_000, [811, 1622, 3245]), (151_156_736, [1442, 2883, 5766]),
        (302_311_424, [2883, 5766, 11532])]
    assert lad.rungs[1].bench.target.loss == 3.28 and lad.rungs[0].bench.target.loss is None


# ---- the fit ---------------------------------------------------------------------------------------------

BUDGETS, SEEDS = [100, 200, 400], [1, 2, 3, 4, 5]
UNIT = {1: -2.0, 2: -1.0, 3: 0.0, 4: 1.0, 5: 2.0}  # median 0: the medians over seeds are the noise-free curve
SHUFFLE = {"adamw": [3, 1, 5, 2, 4], "muon": [2, 5, 1, 4, 3], "normuon": [5, 3, 2, 1, 4]}  # independent per arm


def loss(c, speedup, budget, arm, seed, sigma):
    """The reference's curve c - 0.4 log2(B/100) (log-linear in B), at speedup x the arm's budget: the reference
    needs exactly `speedup` x B steps for the arm's loss at B; seed offsets sigma x a permutation of UNIT."""
    return c - 0.4 * math.log2(speedup * budget / 100) + sigma * UNIT[SHUFFLE[arm][seed - 1]]


def rung_losses(n, speedups, sigma=0.0, c=4.0):
    table = {arm: {B: {s: loss(c, sp, B, arm, s, sigma) for s in SEEDS} for B in BUDGETS}
             for arm, sp in {"adamw": 1.0, **speedups}.items()}
    return RungLosses(f"n{n:g}", int(n), SEEDS, BUDGETS, table)


def test_fit_recovers_the_slope_per_decade():
    rungs = [rung_losses(n, {"muon": s}) for n, s in ((1e4, 1.5), (1e5, 1.3), (1e6, 1.1))]
    f = fits(rungs, ["muon"], "adamw")["muon"]
    assert f["slope_per_decade"] == pytest.approx(-0.2, abs=1e-9)
    assert f["speedup_at_smallest"] == pytest.approx(1.5) and f["speedup_at_largest"] == pytest.approx(1.1)
    assert [p[1] for p in f["points"]] == pytest.approx([1.5, 1.3, 1.1])
    assert f["budget_fraction"] == 0.5 and f["extrapolated"] == [False] * 3  # above 1: compared at B/2
    # no seed noise: every replicate gives the same slope, so the t interval (exact line: zero width) stands in
    assert f["ci_method"].startswith("t ") and f["ci"] == pytest.approx([-0.2, -0.2], abs=1e-9)


def test_extrapolated_and_missing_points():
    # above 4x no budget fraction is interpolated (B/4 x 4 = B, the reference's last budget): the full budget's
    # extrapolated speedups (forward along the reference's last segment) are fitted and flagged
    rungs = [rung_losses(n, {"muon": s, "normuon": 0.9}) for n, s in ((1e4, 5.0), (1e5, 4.8), (1e6, 4.6))]
    del rungs[1].losses["normuon"]  # not run at this rung
    f = fits(rungs, ["muon", "normuon"], "adamw")
    assert f["muon"]["budget_fraction"] == 1.0 and f["muon"]["extrapolated"] == [True] * 3
    assert f["muon"]["slope_per_decade"] == pytest.approx(-0.2, abs=1e-9)
    assert f["normuon"]["excluded"] == ["n100000"] and f["normuon"]["rungs"] == ["n10000", "n1e+06"]
    assert f["normuon"]["budget_fraction"] == 1.0 and f["normuon"]["ci_t"] is None  # 2 points: no t interval
    assert [x.split(":")[0] for x in fit_flags(f)] == ["muon", "normuon"]


def test_bootstrap_covers_the_slope_and_widens_with_noise():
    def fit(sigma):
        rungs = [rung_losses(n, {"muon": s}, sigma) for n, s in ((1e4, 1.5), (1e5, 1.3), (1e6, 1.1))]
        return fits(rungs, ["muon"], "adamw")["muon"]

    quiet, noisy = fit(0.01), fit(0.03)
    for f in (quiet, noisy):
        assert f["ci_method"].startswith("paired seed bootstrap (2000 replicates")
        assert f["ci"][0] < -0.2 < f["ci"][1] and f["slope_per_decade"] == pytest.approx(-0.2, abs=1e-9)
    width = [f["ci"][1] - f["ci"][0] for f in (quiet, noisy)]
    assert 0 < width[0] < width[1]
    assert fit(0.01) == quiet  # a fixed RNG seed: the same numbers on a rebuild


# ---- the report on constructed rung directories -------------------------------------------------------------

SPEEDUPS = {16: {"muon": 1.5, "normuon": 0.8}, 32: {"muon": 1.3, "normuon": 0.9}, 64: {"muon": 1.1, "normuon": 1.0}}
LEVEL = {16: 4.6, 32: 4.2, 64: 4.0}  # the reference ends at 3.8, 3.4, 3.2; the kjv trigram (seq 64): 3.52


def make_rung_dir(root, d):
    arms = {a: {} for a in ("adamw", "muon", "normuon")}
    write_bench(root, arms, chosen={}, budgets=BUDGETS, seeds=SEEDS, muon_variants=())
    for arm, sp in {"adamw": 1.0, **SPEEDUPS[d]}.items():
        for s in SEEDS:
            parent = write_run(root, "seed", arm, f"s{s}", seed=s, budget=400, setting={},
                               final=loss(LEVEL[d], sp, 400, arm, s, 0.01))
            runs = [parent] + [write_run(root, "branch", arm, f"s{s}_b{B}", seed=s, budget=B, setting={},
                                         final=loss(LEVEL[d], sp, B, arm, s, 0.01), branch_from=str(parent))
                               for B in BUDGETS[:-1]]
            for run in runs:  # this rung's width (synthetic_bench writes d_model 16)
                cfg = yaml.safe_load((run / "config.yaml").read_text())
                cfg["model"]["d_model"] = d
                (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory, kjv_dir):
    root = tmp_path_factory.mktemp("ladder")
    for d in SPEEDUPS:
        make_rung_dir(root / f"d{d}", d)
    rec = {"protocol": 2, "name": "t", "description": "constructed", "base": "synthetic", "reference": "adamw",
           "muon_reference": "muon", "arms": ["adamw", "muon", "normuon"], "tokens_per_param": 10,
           "warmup_frac": 0.05, "rungs": [{"name": f"d{d}", "dir": f"d{d}", "shared": False,
                                           "non_embedding_params": N[d]} for d in SPEEDUPS]
           + [{"name": "d128", "dir": "d128", "shared": False}]}  # not run yet: reported as missing
    (root / LADDER_FILE).write_text(json.dumps(rec))
    return root, build_ladder_report(root)


def test_summary_fields_and_slopes(report):
    root, paths = report
    s = json.loads(paths["summary"].read_text())
    assert [x["rung"] for x in s["sizes"]] == ["d16", "d32", "d64"] and set(s["fits"]) == {"muon", "normuon"}
    bench_arms = summary(analyze(root / "d16", load_runs(root / "d16")))["arms"]
    for size in s["sizes"]:
        assert {"rung", "non_embedding_params", "n_params", "tokens", "tokens_per_param", "epochs", "baselines",
                "arms"} <= set(size)
        assert set(size["arms"]) == {"adamw", "muon", "normuon"}
        assert all(set(a) == set(bench_arms["adamw"]) for a in size["arms"].values())
    assert [x["non_embedding_params"] for x in s["sizes"]] == [N[16], N[32], N[64]]
    assert s["sizes"][0]["tokens"] == 400 * 512
    assert s["sizes"][0]["tokens_per_param"] == pytest.approx(204800 / 3312)
    x = np.log10([N[16], N[32], N[64]])
    for arm, frac in (("muon", 0.5), ("normuon", 1.0)):
        f = s["fits"][arm]
        assert {"slope_per_decade", "ci", "ci_method", "speedup_at_smallest", "speedup_at_largest",
                "points"} <= set(f)
        want = np.polyfit(x, [SPEEDUPS[d][arm] for d in SPEEDUPS], 1)[0]
        assert f["slope_per_decade"] == pytest.approx(want, abs=1e-9) and f["budget_fraction"] == frac
        assert f["ci"][0] < want < f["ci"][1] and f["ci_t"] is not None
    assert s["fits"]["muon"]["slope_per_decade"] < 0 < s["fits"]["normuon"]["slope_per_decade"]


def test_points_are_the_analysis_speedups(report):
    _, paths = report
    s = json.loads(paths["summary"].read_text())
    for size in s["sizes"]:
        an = analyze(size["dir"], load_runs(size["dir"]))
        assert size["speedups"]["muon"]["value"] == pytest.approx(
            an["arms"]["muon"]["data_equivalent_by_budget"][200]["value"], abs=1e-12)
        assert size["speedups"]["normuon"]["value"] == pytest.approx(
            an["arms"]["normuon"]["data_equivalent_speedup"]["value"], abs=1e-12)


def test_report_reads_the_trend_and_flags_the_trigram(report):
    _, paths = report
    md = paths["md"].read_text()
    assert "**muon**: the speedup over adamw shrinks with scale" in md
    assert "**normuon**: the speedup over adamw grows with scale" in md and "a rising speedup closes the gap" in md
    assert "Marin" in md and "below Marin's 130M-1.2B" in md
    s = json.loads(paths["summary"].read_text())
    assert [x["reference_beats_trigram"] for x in s["sizes"]] == [False, True, True]
    assert ("Read the slopes with care: at d16 (1 of 3 rungs) the reference ends above the trigram baseline, so "
            "there the benchmark measures n-gram learning") in md and "Only d32, d64 measure optimization" in md
    assert any(f.startswith("rung d16: the reference (adamw) ends at 3.8") for f in s["flags"])
    assert any(f.startswith("rung d128 is not in this report") for f in s["flags"])
    assert "NO (flagged)" in md and paths["plot_speedup_vs_size"].read_bytes()[:4] == b"\x89PNG"


def test_a_rung_without_run_records_is_read_from_its_committed_report(report, tmp_path):
    """A fresh clone holds a benchmark's committed report (summary.json, runs.csv, bench.json), not its run
    records: the ladder reads such a rung from the report and gets the same sizes and fits, flagged."""
    from bench.ladder import ladder_summary
    from bench.report import build_report

    root, paths = report
    clone = tmp_path / "clone"
    shutil.copytree(root, clone)
    build_report(clone / "d32")
    shutil.rmtree(clone / "d32" / "runs")
    got, want = ladder_summary(clone), json.loads(paths["summary"].read_text())
    assert json.loads(json.dumps(got["fits"])) == want["fits"]
    for a, b in zip(got["sizes"], want["sizes"], strict=True):
        assert json.loads(json.dumps({k: v for k, v in a.items() if k != "dir"})) == \
            {k: v for k, v in b.items() if k != "dir"}
    assert "rung d32: read from its committed report (summary.json, runs.csv): its run records are not in this " \
           "checkout" in got["flags"]
    csv_path = clone / "d32" / "runs.csv"  # a runs.csv that is not the summary's: refused, the rung left out
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if (r["phase"], r["arm"], r["seed"], r["budget"]) == ("seed", "muon", "1", "400"))
    row["final_val_loss"] = str(float(row["final_val_loss"]) + 0.5)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    flags = ladder_summary(clone)["flags"]
    assert any(f.startswith("rung d32 is not in this report:") and "runs.csv's median end loss of muon" in f
               for f in flags)
    assert [x["rung"] for x in ladder_summary(clone)["sizes"]] == ["d16", "d64"]
    (clone / "d32" / "runs.csv").unlink()
    assert any("no run records and no committed report (runs.csv missing)" in f for f in ladder_summary(clone)["flags"])
