"""Device and precision choices come from measurements and never disturb the run's RNG."""

import torch

from runtime.device import bf16_is_fast, matmul_rates, resolve_device, resolve_precision


def test_probe_does_not_shift_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    matmul_rates.cache_clear()
    rates = matmul_rates("cpu", n=128, seconds=0.02)
    assert torch.equal(torch.rand(3), expected)
    # GFLOP/s, measured (a floor would only test how busy the machine is: 0.29 was seen under 3x contention)
    assert 0.0 < rates["float32"] < 1e6 and 0.0 < rates["bfloat16"] < 1e6


def test_bf16_choice_follows_measurement():
    r = matmul_rates("cpu")
    assert bf16_is_fast(torch.device("cpu")) == (r["bfloat16"] >= 0.5 * r["float32"])


def test_cpu_defaults_to_fp32_without_compile():
    cpu = resolve_device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
