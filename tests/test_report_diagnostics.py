"""The report's diagnostics section (bench/diagnostics.py) on a synthetic protocol-v2 benchmark whose seed runs
carry diagnostics.jsonl files with known values: every number asserted is computed by hand here.

    .venv/bin/pytest -q tests/test_report_diagnostics.py

Two arms, one budget (100 steps), seeds 1, 2 (and muon's seed 3, which diverged with absurd diagnostics). A
run's statistics are base x f x role multiplier x step / 30, with the run factor f = 1, 3 (adamw seeds 1, 2)
and 2, 4 (muon), so at the last diagnostic step (30) adamw's median over seeds is 2 x base with range
base..3 x base and muon's 3 x base with range 2..4 x base. The Hessian is measured at steps 10 and 20 only;
muon seed 2 has no noise measurement at step 10.
"""

import json

import matplotlib.image as mpimg
import pytest
from synthetic_bench import SPACES, sid, write_bench, write_run

from bench.diagnostics import diagnostics_blocks, load_diagnostics, series
from bench.records import RecordError, load_runs, read_bench
from bench.report import build_report

FACTOR = {("adamw", 1): 1, ("adamw", 2): 3, ("muon", 1): 2, ("muon", 2): 4, ("muon", 3): 1000}
STAT_BASE = {"update_rms_per_lr": 0.1, "update_stable_rank": 5.0, "update_eff_rank": 10.0,
             "update_nuc_over_fro": 2.0, "update_to_weight": 0.001, "cos_update_grad": 0.1,
             "weight_stable_rank": 20.0, "weight_spectral_norm": 1.5, "grad_noise_to_signal": 0.5}
ROLE_MULT = {"attn_q": 1, "mlp_up": 3, "all": 2}  # "all" = the mean over the two matrices
HESSIAN_BASE = {"lambda_max": 10.0, "sharpness_x_lr_over_2": 0.1, "trace": 100.0, "block_offdiag_share": 0.05,
                "step_curvature_ratio": 0.5}
DIAG_STEPS = (10, 20, 30)
BUDGET = 100
FINAL = {("adamw", 1): 3.0, ("adamw", 2): 3.1, ("muon", 1): 2.9, ("muon", 2): 2.95}


def diag_line(f, step, *, noise=True, hessian=True):
    """One diagnostics.jsonl line of a run with factor f at step; cost: geometry 0.01 f, noise 0.05 and
    hessian_top 0.3 s per call when measured."""
    x = f * step / 30
    roles = {role: {k: b * m * x for k, b in STAT_BASE.items()} for role, m in ROLE_MULT.items()}
    rec = {"step": step, "tokens": step * 1000, "lr": 0.003,
           "matrices": {"L0.attn_q": {"role": "attn_q", "layer": 0, "shape": [8, 8], **roles["attn_q"]},
                        "L0.mlp_up": {"role": "mlp_up", "layer": 0, "shape": [32, 8], **roles["mlp_up"]}},
           "roles": roles, "cost_s": {"geometry": 0.01 * f}}
    if noise:
        rec["noise"] = {"pieces": 4, "piece_tokens": 256, "noise_to_signal": 0.25 * x,
                        "noise_scale_tokens": None}
        rec["cost_s"]["noise"] = 0.05
    if hessian:
        rec["hessian"] = {**{k: b * x for k, b in HESSIAN_BASE.items()}, "blocks": "group"}
        rec["cost_s"]["hessian_top"] = 0.3
    return rec


def write_diagnostics(run_dir, arm, seed):
    f = FACTOR[arm, seed]
    lines = [diag_line(f, s, noise=(arm, seed, s) != ("muon", 2, 10), hessian=s < 30) for s in DIAG_STEPS]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (run_dir / "diagnostics.jsonl").write_text(text[:-1] + "\n\n")  # a trailing blank line is skipped


def make_bench(root, diagnostics=True):
    """adamw and muon, one tuning trial each (their defaults), seed runs at the one budget."""
    arms = {a: {"space": SPACES[a]} for a in ("adamw", "muon")}
    setting = {a: {k: ax["default"] for k, ax in SPACES[a].items()} for a in arms}
    chosen = {a: {"trial": sid(s), "setting": s, "final_val_loss": 3.0} for a, s in setting.items()}
    write_bench(root, arms, chosen=chosen, budgets=[BUDGET], seeds=[1, 2, 3], trials=1, muon_variants=())
    for arm in arms:
        write_run(root, "tune", arm, sid(setting[arm]), seed=0, budget=BUDGET, setting=setting[arm], final=3.0)
        for seed in (1, 2):
            d = write_run(root, "seed", arm, f"s{seed}", seed=seed, budget=BUDGET, setting=setting[arm],
                          final=FINAL[arm, seed], evals=[0, 50, 100])
            if diagnostics:
                write_diagnostics(d, arm, seed)
    d = write_run(root, "seed", "muon", "s3", seed=3, budget=BUDGET, setting=setting["muon"], final=None,
                  evals=[0, 50, 100], diverged=True)
    if diagnostics:
        write_diagnostics(d, "muon", 3)
    return root


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return make_bench(tmp_path_factory.mktemp("diag") / "bench")


@pytest.fixture(scope="module")
def blocks(bench_dir, tmp_path_factory):
    plots = tmp_path_factory.mktemp("plots")
    return diagnostics_blocks(read_bench(bench_dir), load_runs(bench_dir), plots, bench_dir), plots


def tables(blocks):
    return [(b[1], b[2]) for b in blocks if b[0] == "table"]


def test_records(bench_dir):
    runs = {(r.phase, r.arm, r.trial): r for r in load_runs(bench_dir)}
    assert sorted(runs) == [("seed", a, f"s{s}") for a, s in (("adamw", 1), ("adamw", 2), ("muon", 1),
                                                              ("muon", 2), ("muon", 3))] + \
        [("tune", a, sid({k: ax["default"] for k, ax in SPACES[a].items()})) for a in ("adamw", "muon")]
    r = runs["seed", "muon", "s3"]
    assert r.diverged and r.budget == BUDGET and r.seed == 3 and r.hybrid["enabled"]


def test_load_diagnostics(bench_dir, tmp_path):
    lines = load_diagnostics(bench_dir / "runs" / "seed" / "adamw" / "s1")
    assert [r["step"] for r in lines] == [10, 20, 30]  # the blank line skipped
    assert lines[-1]["roles"]["all"]["update_stable_rank"] == pytest.approx(10.0)
    assert load_diagnostics(tmp_path) == []
    (tmp_path / "diagnostics.jsonl").write_text('{"step": 1}\n\n{"step": 2, "roles": {\n')
    with pytest.raises(RecordError, match=r"diagnostics\.jsonl, line 3: not JSON"):
        load_diagnostics(tmp_path)
    (tmp_path / "diagnostics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(RecordError, match=r"diagnostics\.jsonl, line 2: a diagnostics line"):
        load_diagnostics(tmp_path)
    (tmp_path / "diagnostics.jsonl").write_text('{"step": 1.5}\n')
    with pytest.raises(RecordError, match="integer 'step'"):
        load_diagnostics(tmp_path)


def test_summary_table_at_last_step(blocks):
    headers, rows = tables(blocks[0])[0]
    assert headers[:4] == ["arm", "seeds", "last step", "update RMS / lr"]
    assert [r[:3] for r in rows] == [["adamw", "2", "30"], ["muon", "2", "30"]]  # diverged muon/s3 left out
    cells = {r[0]: dict(zip(headers, r)) for r in rows}
    a, m = cells["adamw"], cells["muon"]
    # all-role stats are base x 2 x f: adamw f = 1, 3 -> median 4 base; muon f = 2, 4 -> median 6 base
    assert a["update RMS / lr"] == "0.4 (0.2..0.6)" and m["update RMS / lr"] == "0.6 (0.4..0.8)"
    assert a["update stable rank"] == "20 (10..30)" and m["update stable rank"] == "30 (20..40)"
    assert a["update eff. rank"] == "40 (20..60)" and a["nuclear / Frobenius"] == "8 (4..12)"
    assert a["update / weight"] == "0.004 (0.002..0.006)" and a["cos(update, grad)"] == "0.4 (0.2..0.6)"
    assert m["weight stable rank"] == "120 (80..160)"
    assert a["noise / signal"] == "0.5 (0.25..0.75)" and m["noise / signal"] == "0.75 (0.5..1)"
    # the Hessian's last measurement is step 20: x = f x 2/3, so adamw 10 x [2/3, 2] -> median 13.3
    assert a["λ_max"] == "13.3 (6.67..20), step 20" and m["λ_max"] == "20 (13.3..26.7), step 20"
    assert a["λ_max·lr/2"] == "0.133 (0.0667..0.2), step 20" and a["trace"] == "133 (66.7..200), step 20"
    assert m["off-block-diagonal share"] == "0.1 (0.0667..0.133), step 20"
    assert a["step overshoot"] == "0.667 (0.333..1), step 20"
    assert a["curvature along the step"] == "-"  # never recorded


def test_role_table(blocks):
    headers, rows = tables(blocks[0])[1]
    assert headers[:3] == ["arm", "role", "update RMS / lr"] and headers[-1] == "grad noise / signal"
    assert [r[:2] for r in rows] == [["adamw", "attn_q"], ["adamw", "mlp_up"], ["adamw", "all"],
                                     ["muon", "attn_q"], ["muon", "mlp_up"], ["muon", "all"]]
    cells = {(r[0], r[1]): dict(zip(headers, r)) for r in rows}
    # median over seeds only: base x role multiplier x median f (adamw 2, muon 3)
    assert cells["adamw", "attn_q"]["update stable rank"] == "10"
    assert cells["adamw", "mlp_up"]["update stable rank"] == "30"
    assert cells["muon", "mlp_up"]["weight spectral norm"] == "13.5"
    assert cells["muon", "attn_q"]["grad noise / signal"] == "1.5"
    assert cells["adamw", "all"]["update RMS / lr"] == "0.4"
    assert cells["muon", "all"]["update / weight"] == "0.006"


def test_cost_table(blocks):
    headers, rows = tables(blocks[0])[2]
    assert headers == ["arm", "diagnostic steps per run", "geometry (s per call)", "noise (s per call)",
                       "hessian_top (s per call)", "total s per run"]
    # adamw: geometry 0.01 x mean f (2); totals 3 x 0.01 f + 3 x 0.05 + 2 x 0.3 = 0.78, 0.84
    # muon: seed 2 misses one noise call; totals 0.06 + 0.15 + 0.6 = 0.81 and 0.12 + 0.10 + 0.6 = 0.82
    assert rows == [["adamw", "3", "0.02", "0.05", "0.3", "0.81 (0.78..0.84)"],
                    ["muon", "3", "0.03", "0.05", "0.3", "0.815 (0.81..0.82)"]]


def test_trajectory_median_and_band(bench_dir):
    seeds = [{r["step"]: r for r in load_diagnostics(bench_dir / "runs" / "seed" / "muon" / s)}
             for s in ("s1", "s2")]
    # step 10 lacks seed 2's noise: only steps 20 and 30; 0.25 x f x step/30 for f = 2, 4
    noise = series(seeds, ("noise", "noise_to_signal"))
    assert [p[0] for p in noise] == [20, 30]
    assert noise[1][1:] == pytest.approx((0.75, 0.5, 1.0))
    sr = series(seeds, ("roles", "all", "update_stable_rank"))
    assert [p[0] for p in sr] == [10, 20, 30]
    assert sr[0][1:] == pytest.approx((10.0, 20 / 3, 40 / 3))
    assert [p[0] for p in series(seeds, ("hessian", "lambda_max"))] == [10, 20]


def test_pngs_and_text(blocks):
    out, plots = blocks
    imgs = [b for b in out if b[0] == "img"]
    assert [b[3] for b in imgs] == [plots / "diagnostics_trajectories.png", plots / "diagnostics_roles.png"]
    for _, rel, _, path in imgs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert mpimg.imread(path)[..., :3].std() > 0.05  # decodes, not a blank canvas
    # 11 panels with data (every PANELS entry), 2 per row: 6 rows of 2.6 inches + 0.5, 11 inches wide
    assert mpimg.imread(imgs[0][3]).shape[:2] == (int(110 * (2.6 * 6 + 0.5)), 1210)
    text = " ".join(b[1] for b in out if b[0] == "p")
    assert "Diverged runs are left out: seed/muon/s3." in text
    assert "4 pieces of 256 tokens" in text and "0.2" in text and "2/lr" in text and "(blocks: group)" in text


def test_diag_phase_runs_replace_seed_runs(tmp_path):
    """scripts/bench.py's diag phase re-runs the seed runs with diagnostics on (bench/plan.py): an arm that has
    such runs is shown from them (adamw here, factors 10 and 30: 10x its seed values), the others from their
    seed runs."""
    root = make_bench(tmp_path / "diag")
    setting = {k: ax["default"] for k, ax in SPACES["adamw"].items()}
    for seed, f in ((1, 10), (2, 30)):
        d = write_run(root, "diag", "adamw", f"s{seed}", seed=seed, budget=BUDGET, setting=setting, final=3.0)
        (d / "diagnostics.jsonl").write_text("".join(json.dumps(diag_line(f, s)) + "\n" for s in DIAG_STEPS))
    diag = load_runs(root, phases=("diag",))
    assert [(r.phase, r.arm, r.trial, r.seed) for r in diag] == [("diag", "adamw", "s1", 1),
                                                                 ("diag", "adamw", "s2", 2)]
    out = diagnostics_blocks(read_bench(root), load_runs(root) + diag, tmp_path / "plots", root)
    headers, rows = tables(out)[0]
    stable_rank = headers.index("update stable rank")
    assert [(r[0], r[1], r[stable_rank]) for r in rows] == [("adamw", "2", "200 (100..300)"),
                                                            ("muon", "2", "30 (20..40)")]
    # build_report reads the diag phase itself, and runs.csv lists its runs beside the others
    built = build_report(root)
    assert "| adamw | 2 | 30 | 4 (2..6) | 200 (100..300) |" in built["md"].read_text()
    assert built["csv"].read_text().count("\ndiag,adamw,") == 2


def test_not_recorded(tmp_path):
    root = make_bench(tmp_path / "bare", diagnostics=False)
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "diagnostics_roles.png").write_bytes(b"stale")  # an earlier report's figure
    out = diagnostics_blocks(read_bench(root), load_runs(root), plots, root)
    assert [b[0] for b in out] == ["h2", "p"]
    assert "not recorded" in out[1][1] and "`diagnostics.every=N`" in out[1][1]
    assert "Diverged runs are left out: seed/muon/s3." in out[1][1]
    assert not list(plots.glob("diagnostics_*.png"))  # the stale figure removed
    md = build_report(root)["md"].read_text()
    assert "Diagnostics were not recorded" in md and not list((root / "plots").glob("diagnostics_*"))


def test_corrupt_line_fails_the_report(tmp_path):
    root = make_bench(tmp_path / "corrupt")
    path = root / "runs" / "seed" / "adamw" / "s2" / "diagnostics.jsonl"
    path.write_text(path.read_text().replace('"step": 20', '"step": 20,,', 1))
    with pytest.raises(RecordError, match=r"adamw/s2/diagnostics\.jsonl, line 2"):
        build_report(root)


def test_section_in_report(bench_dir):
    before = {p for p in bench_dir.rglob("*") if p.is_file()}
    out = build_report(bench_dir)
    md = out["md"].read_text()
    i, j, k = md.index("## Tuning"), md.index("## Validation curves"), md.index("## Diagnostics: why an optimizer wins")
    assert i < j < k
    assert "![diagnostics over training](plots/diagnostics_trajectories.png)" in md
    assert "| adamw | 2 | 30 | 0.4 (0.2..0.6) | 20 (10..30) |" in md
    assert out["plot_diagnostics_roles"] == bench_dir / "plots" / "diagnostics_roles.png"
    assert out["plot_diagnostics_trajectories"] == bench_dir / "plots" / "diagnostics_trajectories.png"
    assert {p for p in bench_dir.rglob("*") if p.is_file()} - before == set(out.values())  # every file listed
    assert out["html"].read_text().count('<img src="data:image/png;base64,') == 3 + 2
