"""What looks inside a run without changing its numbers.

    hooks.py        InputHooks: layer inputs of the step's micro-batches, for optimizers that ask (Newton-Muon)
    diagnostics.py  docs/protocol.md's diagnostics (update geometry, gradient noise, curvature), off the training clock
"""
