"""Optimizers under test. Each method is one module here plus one conf/optimizer/<name>.yaml whose
`_target_` names the module's spec dataclass (typed hyperparameters + `build(split)`); nothing else changes.

This package never imports models/ or data/: an optimizer sees parameter groups with their roles.
"""
