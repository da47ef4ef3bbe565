"""A run's life on disk, from the first check to the last record.

    prepare.py     prepare_run: config, run directory, data, model, split, optimizer -> PreparedRun (or
                   CompleteRun: nothing to do); build_trainable, the model and optimizer every run is built with
    rundir.py      the run directory: its lock, what a launch finds there and the policies train.on_complete /
                   train.on_broken; SetupError
    checkpoint.py  bit-exact checkpoints, their checks, the resume note
    precision.py   train.precision=auto: bf16 autocast or fp32 by timing the run's own model (CPU), kept on resume
    branch.py      cooldown branches (train.branch_from): the parent's checkpoint and the checks against it
    records.py     code version, environment, workload hash, metrics.jsonl, the figures of a summary
    recorder.py    rank 0's writes (config.yaml, env.json, metrics, summary.json) and W&B; run_summary
"""
