"""The command lines describe themselves: `train.py --help` lists the config groups one line each (Hydra's help
template, conf/config.yaml), `scripts/bench.py --help` documents every option."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO


def group_options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))


def test_train_help_lists_each_group_on_one_line():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
    lines = proc.stdout.splitlines()
    for group in ("optimizer", "model", "data", "schedule", "experiment", "bench", "logger"):
        assert f"{group}: {group_options(group)}" in lines, proc.stdout
    assert "hydra/" not in proc.stdout  # Hydra's own groups are --hydra-help's
    assert "train:" not in lines and len(lines) < 30  # the groups and pointers, not the whole composed config
    assert lines[0].startswith("train.py: pretrain")


def test_bench_help_documents_every_option(capsys):
    spec = importlib.util.spec_from_file_location("bench_script", REPO / "scripts" / "bench.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    options = [a for a in script.parser()._actions if a.dest != "help"]
    assert {a.dest for a in options} >= {"bench", "out", "launcher", "jobs", "threads", "logger", "dry_run", "no_report"}
    assert all(a.help and len(a.help) > 10 for a in options), [a.dest for a in options if not a.help]
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "resumable" in text and "python scripts/bench.py tiny --dry-run" in text  # the epilog, the examples
