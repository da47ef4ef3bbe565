"""The harness: what train.py needs around the training loop, one room a theme.

    config/     what a run is asked to do: the typed schema (schema.py), the value checks and the optimizer's
                spec (validate.py), one-line errors for what Hydra would reject in a traceback (preflight.py)
    lifecycle/  a run's life on disk: prepare_run (prepare.py), the run directory and its policies (rundir.py),
                checkpoints (checkpoint.py), cooldown branches (branch.py), records (records.py) and the
                rank-0 recorder that writes them and logs to W&B (recorder.py)
    loop/       the training loop's parts: the lr schedule and evaluation steps (schedule.py), the loop's
                state, clocks and divergence watch (state.py)
    probes/     what looks inside a run without changing it: layer-input hooks for optimizers that ask for
                them (hooks.py), the diagnostics of docs/protocol.md (diagnostics.py)

Below it, runtime/ (device, processes, atomic files); beside it, optimizers/, models/ and data/, which it
builds on and which never import it. Above it, train.py, the bench/ engine and scripts/.
"""
