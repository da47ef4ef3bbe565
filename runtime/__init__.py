"""What a process runs on, below every other package (it imports only torch and the standard library):
harness/, optimizers/, data/ and bench/ all build on it, and it imports none of them.

    device.py       device and precision choice from measurements: matmul_rates, bf16_is_fast (the capability
                    probe optimizers/ortho.py consults for its Newton-Schulz dtype), autocast, synchronize
    distributed.py  multi-process training (accelerate over torch.distributed): world_size, init, Dist, LaunchError
    files.py        atomic writes (atomic_write_text, atomic_write_json: strict JSON, non-finite as null)
"""
