"""Optimizers under test. Each method is one module here plus one conf/optimizer/<name>.yaml whose
`_target_` names the module's spec dataclass (typed hyperparameters + `build(split)`); nothing else changes.
A YAML may also name any torch.optim.Optimizer subclass, its other keys the class's arguments (external.py).

    hparams.py      knob (a spec field's default and constraint), validate, Spec, SpecOptimizer (the base of
                    every home-made optimizer: defaults from the spec, step(closure) -> update())
    groups.py       the parameter split every optimizer sees (hidden, embedding, head, gain_bias), row blocks
    hybrid.py       CombinedOptimizer (a matrix method + its auxiliary AdamW), aux_adamw, the shared group
    ortho.py        orthogonalization back-ends (Newton-Schulz, Polar Express, QDWH, qdwh_ns, SVD)
    sharded.py      unshard / apply_update_ for FSDP-sharded parameters
    external.py     any torch.optim.Optimizer by `_target_` (a zoo's, unmodified): ExternalSpec, the adapter,
                    eval_weights (Schedule-Free's eval mode), step_closure (LBFGS)
    adamw.py        AdamW (torch.optim.AdamW)          lion.py         Lion
    adam_mini.py    Adam-mini                          soap.py         SOAP
    muon.py         Muon                               normuon.py      NorMuon (a Muon stage)
    newton_muon.py  Newton-Muon (a Muon stage)         polargrad.py    PolarGrad

This package never imports models/ or data/: an optimizer sees parameter groups with their roles.

    python train.py experiment=bench_tiny optimizer=muon optimizer.lr=0.02
"""
