"""A user's optimizer that fails on its third step (a failed decomposition, say): tests/test_policies.py runs it
through train.py with `optimizer._target_=crashing_optimizer.CrashingAdamWSpec` and tests/ on PYTHONPATH."""

from dataclasses import dataclass

from optimizers.adamw import AdamWSpec

FAIL_AT = 3


@dataclass
class CrashingAdamWSpec(AdamWSpec):
    def build(self, split, *args, **kwargs):
        opt = super().build(split, *args, **kwargs)
        step, calls = opt.step, [0]

        def failing_step(*a, **k):
            calls[0] += 1
            if calls[0] == FAIL_AT:
                raise RuntimeError(f"injected failure at step {FAIL_AT}")
            return step(*a, **k)

        opt.step = failing_step
        return opt
