"""Multi-process data-parallel training: accelerate on top of torch.distributed (gloo on CPU, nccl on GPU).

    torchrun --standalone --nproc_per_node 2 train.py hydra.run.dir=results/runs/ddp ...   # CPU or GPU
    accelerate launch --multi_gpu --num_processes 2 train.py hydra.run.dir=results/runs/ddp ...
    make ddp ARGS="experiment=bench_micro hydra.run.dir=results/runs/ddp"                    # 2 processes

The launcher sets WORLD_SIZE / RANK / LOCAL_RANK; `init()` builds accelerate's Accelerator from them
(`cpu=True` when there is no GPU or train.device=cpu, which makes accelerate use gloo), and the training
loop sees a `Dist`: its rank, the world size, DDP wrapping of the model (accelerate's prepare_model), and
the collectives the loop needs (mean of the training loss, sum of the validation loss, the RNG states an
FSDP checkpoint gathers). Every rank reads its own share of each global batch (data/loader.py), so the global
token order is the single-process one.

`accelerate launch --cpu --num_processes N` starts ONE process (measured, accelerate 1.15): such a run is
refused with the commands that do start N (see `requested_processes`), never recorded as distributed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime.device import resolve_device


def world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class LaunchError(RuntimeError):
    """A launch that does not give the processes it asked for."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    accelerator: Any = None  # accelerate.Accelerator when world > 1
    fsdp: bool = False  # train.parallel=fsdp with world > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def shard(self, model: torch.nn.Module, device: torch.device) -> None:
        """FSDP2: fully_shard every block (each element of the model's nn.ModuleLists) and then the root, on a
        1-D mesh of all ranks. Parameters become DTensors sharded along dim 0; build the optimizer after."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (self.world,))
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel through accelerate (gradients averaged over ranks); an FSDP model (already
        sharded) or a single process's model as it is."""
        if self.world == 1 or self.fsdp:
            return model
        return self.accelerator.prepare_model(model, device_placement=False)

    def no_sync(self, model: torch.nn.Module, sync: bool):
        """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) on all but the last micro-batch."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.fsdp:
            model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else model.no_sync()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x)  # gloo has no AVG: sum, then divide
            x /= self.world
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable `obj` on rank 0, in rank order (None on the other ranks): e.g. the RNG states
        a sharded checkpoint keeps (harness/lifecycle/checkpoint.py)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_rank0 else None
        dist.gather_object(obj, out, dst=0)
        return out


def shutdown() -> None:
    """Leave the process group in step (a barrier, then destroy it), then end a multi-process rank at once.

    Exiting with a live gloo group can abort a rank at interpreter exit ("terminate called without an active
    exception"), and so, rarely and under load, can exiting after destroying it: gloo's worker threads may still
    be torn down during interpreter finalization (pytorch/pytorch#190489, #179291), which turns a finished run
    into a SIGABRT. So a rank that ran a process group flushes its streams and logs and leaves by os._exit(0),
    skipping finalization; by then its records are written and closed. Single-process runs return normally."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    exit_now()


def exit_now(code: int = 0) -> None:
    """Flush stdout, stderr and logging, then os._exit(code): no interpreter finalization."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def requested_processes(pid: int | None = None) -> int | None:
    """The process count a parent `accelerate launch` was asked for (--num_processes N / --num-processes N),
    read from the parent's command line (Linux /proc); None when the parent is not accelerate or says none."""
    try:
        with open(f"/proc/{pid or os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    head = argv[:3]  # `accelerate launch ...`, `python .../accelerate launch ...`, `python -m accelerate.commands.launch`
    if not (any(a.endswith("/accelerate") or a == "accelerate" for a in head) and "launch" in argv[:4]
            or "accelerate.commands.launch" in head):
        return None
    for i, a in enumerate(argv):
        m = re.fullmatch(r"--num[_-]processes(?:=(\d+))?", a)
        if m:
            value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def launcher_numerics() -> str | None:
    """Why this launch must not start: an accelerate launcher setting that would change the numerics behind the
    harness's back (its model wrapper autocasts or compiles the forward while the records say otherwise), or None.
    Precision is train.precision's and compilation train.compile's, recorded in env.json and summary.json."""
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision.lower() != "no":
        return (f"accelerate launch --mixed_precision {precision}: the harness sets precision itself and records it; "
                "launch without --mixed_precision and set train.precision=bf16 (or fp32)")
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO")
    if backend.upper() != "NO":
        return (f"accelerate launch --dynamo_backend {backend}: the harness compiles (or not) itself and records it; "
                "launch without --dynamo_backend and set train.compile=true")
    return None


def init(device: str, parallel: str = "ddp") -> tuple[torch.device, Dist]:
    """The device and process layout of this run. With WORLD_SIZE > 1, accelerate initialises the process
    group (gloo on CPU, nccl on CUDA) and picks this rank's device."""
    problem = launcher_numerics()
    if problem:
        raise LaunchError(problem)
    ws = world_size()
    if ws == 1 and parallel == "fsdp":
        raise LaunchError("train.parallel=fsdp needs several processes (WORLD_SIZE is 1): launch with torchrun or "
                          "accelerate launch, or use train.parallel=ddp")
    if ws == 1:
        asked = requested_processes()
        if asked and asked > 1:
            raise LaunchError(
                f"accelerate launch asked for {asked} processes but started 1 (WORLD_SIZE unset; `accelerate "
                f"launch --cpu` runs one process): for {asked} CPU processes use `accelerate launch --multi_gpu "
                f"--num_processes {asked} train.py ...` or `torchrun --nproc_per_node {asked} train.py ...`")
        return resolve_device(device), Dist()
    from accelerate import Accelerator

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not cpu and not torch.cuda.is_available():
        raise LaunchError(f"train.device={device} with WORLD_SIZE={ws}, but CUDA is not available")
    accelerator = Accelerator(cpu=cpu)
    if accelerator.num_processes != ws:
        raise LaunchError(f"WORLD_SIZE={ws} but accelerate sees {accelerator.num_processes} processes")
    return accelerator.device, Dist(rank=accelerator.process_index, world=accelerator.num_processes,
                                    local_rank=accelerator.local_process_index, accelerator=accelerator,
                                    fsdp=parallel == "fsdp")
