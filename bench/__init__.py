"""The benchmark engine (docs/protocol.md v2), one module per step of the protocol.

    declaration.py  the typed benchmark declaration (conf/bench/*.yaml): workload, budgets, shared group,
                    every arm's search space with sources, search, seeds, target rule; checked before any run
    search.py       the search, the same for every arm: coordinate descent or quasi-random (scipy.stats.qmc);
                    the local-optimality certificate's neighbours
    plan.py         the runs of each phase (tune, cert, seed, branch, diag) and their Hydra trial configs
    launch.py       a phase's missing runs as one Hydra multirun of train.py (basic, joblib or SLURM launcher)
    supervise.py    the multirun's supervisor (Linux): it and every process it starts end when the driver dies
    run.py          a benchmark end to end (the phases in order, the choices), resumable from the records
    records.py      reading the run records back (RunRecord)
    stats.py        intervals, paired tests, Holm, detectable differences, best-of-k, crossings, speedups
    baselines.py    unigram / bigram / trigram cross-entropies on the validation tokens (cached per data set)
    analysis.py     the numbers of a report from bench.json and the records; summary.json
    report.py       report.md / report.html / runs.csv (render.py: Markdown and HTML; plots.py: figures;
                    diagnostics.py: the diagnostics section)
    rungs.py        a scaling ladder's declaration (conf/ladder/*.yaml): one base benchmark at >= 3 model sizes,
                    budgets from a fixed tokens per non-embedding parameter; each rung a benchmark directory
    ladder.py       the ladder's fit (speedup over the reference against log10 N, paired bootstrap over seeds),
                    summary.json, report.md / report.html, plots/speedup_vs_size.png

Command lines: scripts/bench.py (run), scripts/ladder.py (run a ladder) and scripts/report.py (rebuild a report).
"""
