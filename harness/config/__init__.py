"""What a run is asked to do, checked before any compute.

    schema.py     the typed Config (train, schedule, wandb, bench tag, diagnostics, hybrid) Hydra merges into;
                  ConfigError; to_typed
    validate.py   value ranges and cross-field constraints; the optimizer's typed spec from its `_target_`
    preflight.py  composes the command line first, so that an unknown key or option is one line, not a traceback;
                  config_error: the same checks and the typed validation, without a run
    search.py     where configs are found: conf/, then the user's directories (OPTBENCH_CONFIG_PATH), importable
"""
