"""scripts/ read run records only: tables from summaries, refusal to mix workloads."""

import json

import yaml

from scripts.runs_table import main as runs_table


def fake_run(path, optimizer, lr, seed, final, workload="a" * 64):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "optimizer": optimizer, "seed": seed, "steps": 100, "final_val_loss": final, "min_val_loss": final - 0.01,
        "steps_to_target": 80, "tokens_per_s": 12345.6, "optimizer_step_time_s": 0.5, "diverged": False,
        "workload_hash": workload}))
    (path / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"lr": lr}}))


def test_table_from_records(tmp_path, capsys):
    fake_run(tmp_path / "0", "muon", 0.02, 0, 4.1)
    fake_run(tmp_path / "1", "adamw", 0.003, 0, 4.25)
    assert runs_table([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"workload {'a' * 16}, 2 runs"
    assert out[4] == "| adamw | 0.003 | 0 | 100 | 4.25 | 4.24 | 80 | 12,346 | 5 | False |"
    assert out[5].startswith("| muon | 0.02 | 0 | 100 | 4.1 | 4.09 |")


def test_mixed_workloads_refused(tmp_path, capsys):
    fake_run(tmp_path / "0", "muon", 0.02, 0, 4.1)
    fake_run(tmp_path / "1", "adamw", 0.003, 0, 4.25, workload="b" * 64)
    assert runs_table([str(tmp_path)]) == 2
    assert "refusing to mix 2 workloads" in capsys.readouterr().err
