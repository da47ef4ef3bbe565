"""The GPU check (issue 22): what this repository claims about CUDA, measured on one GPU in <= 8 minutes.

    make gpu-check                                # = python scripts/gpu_check.py: results/gpu/<gpu>.{json,md}
    make gpu-check ARGS="--out $OUT/gpu"          # on a lent machine: the results where they come back
    python scripts/gpu_check.py --dry-run         # any machine: the plan, every command composed, nothing run
    python scripts/gpu_check.py --only train,fsdp --budget-scale 1.5 --budget perf=300

Steps, in order, each a subprocess tree with its own time budget (seconds; --budget STEP=S, --budget-scale F):
  env       torch / CUDA versions, the GPU, the measured bf16 4096^3 matmul rate against the datasheet peak
            (scripts/perf_setup.py's table, as perf's MFU)
  perf      scripts/perf.py gpt2_124m (bf16 autocast, torch.compile): tokens/s, MFU against the measured and
            the datasheet peak, each optimizer's training step and state bytes over AdamW's
  train     --steps (30) of train.py for every conf/optimizer/*.yaml on perf's gpt2_124m workload (GPT-2 124M,
            vocab 50304, as perf; the KJV corpus of `make data` uses ids < 4096 of it), bf16 and compiled
            (train.py's CUDA defaults), --jobs at a time: the loss falls and every metric is finite; AdamW
            twice with the same seed: how far apart the losses are (fails beyond 1e-2 relative)
  torchrun  a 1-process nccl all-reduce under torchrun, then train.py under torchrun (WORLD_SIZE=1 takes the
            harness's single-process path: nccl itself is exercised by the probe, not by train.py)
  fsdp      train.parallel=fsdp in one process is refused with runtime/distributed.py's one-line error
A step past its budget is killed (its process groups) and recorded as timed_out, and the next one runs; the
results are rewritten atomically after every step (scripts/gpu_results.py: the record, each step's figures,
the Markdown). Exit 1 when a step failed or timed out (each named on stderr), 2 without CUDA (nothing run).
Run directories and logs: <out>/runs/<time>/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf

from scripts.gpu_results import PRESET, determinism, perf_figures, read_run, record, write_results

PY, THIS = sys.executable, "scripts/gpu_check.py"
CONF = REPO / "conf"
BUDGETS = {"env": 30, "perf": 240, "train": 150, "torchrun": 45, "fsdp": 15}  # seconds: 480 in all
TOTAL_LIMIT = 480  # what fits a 15-minute GPU loan with its start-up
PERF_OPTIMIZERS = ["adamw", "muon", "muon_fp32", "normuon", "polargrad", "newton_muon", "adam_mini", "soap"]
FSDP_REFUSAL = ("error: train.parallel=fsdp needs several processes (WORLD_SIZE is 1): launch with torchrun or "
                "accelerate launch, or use train.parallel=ddp")  # runtime/distributed.py, init()
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
MARK = "GPU_CHECK_JSON "  # a probe's result line
RUNNING: dict[str, subprocess.Popen] = {}  # killed with their process groups if this process is terminated


def train_cmd(args, run_dir: Path, optimizer: str, steps: int, *more: str, launcher=(PY,)) -> list[str]:
    """train.py on scripts/perf.py's gpt2_124m workload (its overrides), evaluation at step 0 and the end."""
    from scripts.perf import PRESETS

    return [*launcher, "train.py", *PRESETS[PRESET], f"optimizer={optimizer}", "logger=none",
            f"train.max_steps={steps}", f"train.eval_every={steps}", "train.eval_dense_frac=0",
            "train.ckpt_every=0", "train.save_final=false", "train.progress=false", *args.extra, *more,
            f"hydra.run.dir={run_dir}"]


def plan(args) -> dict[str, dict[str, list[str]]]:
    """Every step's commands (key -> argv), in order; AdamW first and twice (same seed: repeatability)."""
    runs, names = args.runs, sorted(args.optimizers, key=lambda n: n != "adamw")
    train = {}
    for name in names:
        train[name] = train_cmd(args, runs / "train" / name, name, args.steps)
        if name == "adamw":
            train["adamw_repeat"] = train_cmd(args, runs / "train" / "adamw_repeat", name, args.steps)
    return {"env": {"env": [PY, THIS, "--probe", "env"]},
            "perf": {"perf": [PY, "scripts/perf.py", PRESET, "--repeats", str(args.perf_repeats), "--optimizers",
                              ",".join(args.perf_optimizers), "--out", str(runs / "perf")]},
            "train": train,
            "torchrun": {"nccl": [*TORCHRUN, THIS, "--probe", "nccl"],
                         "train": train_cmd(args, runs / "torchrun", "adamw", 5, launcher=TORCHRUN)},
            "fsdp": {"fsdp": train_cmd(args, runs / "fsdp", "adamw", 5, "train.parallel=fsdp")}}


# ---- the dry run: every command composed, nothing run ------------------------------------------------------

def command_error(cmd: list[str]) -> str | None:
    """Why a planned command would not start: torchrun arguments that do not parse or are not one standalone
    process, a probe this script refuses, train.py overrides that do not compose (or do not validate)."""
    from harness.config.preflight import config_error

    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        from torch.distributed.run import get_args_parser

        try:
            a = get_args_parser().parse_args(cmd[3:])
        except SystemExit:
            return f"torchrun arguments do not parse: {' '.join(cmd[3:])}"
        if not (a.standalone and str(a.nproc_per_node) == "1" and (REPO / a.training_script).is_file()):
            return f"torchrun must be --standalone --nproc_per_node 1 FILE: {' '.join(cmd[3:])}"
        cmd = [PY, a.training_script, *a.training_script_args]
    if cmd[1] == THIS:
        try:
            parser().parse_args(cmd[2:])
        except SystemExit:
            return f"{THIS} refuses {cmd[2:]}"
    return config_error(CONF, cmd[2:]) if cmd[1] == "train.py" else None


def check_plan(args, steps: dict) -> list[str]:
    """The plan's problems, first one first (none: every command composes)."""
    try:
        from scripts import perf
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return [f"perf: scripts/perf.py does not import ({e.__class__.__name__}: {e})"]
    problems = [] if PRESET in perf.PRESETS else [f"perf: scripts/perf.py has no preset {PRESET}"]
    usage = subprocess.run([PY, "scripts/perf.py", "--help"], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=60, check=False).stdout
    if missing := [flag for flag in ("--repeats", "--optimizers", "--out") if flag not in usage]:
        problems.append(f"perf: scripts/perf.py --help lists no {', '.join(missing)}")
    unknown = sorted(set(args.perf_optimizers) - set(perf.optimizer_names()))
    if unknown or "adamw" not in args.perf_optimizers:
        problems.append(f"perf: --perf-optimizers: {', '.join(unknown) or 'adamw is required'} "
                        f"(scripts/perf.py knows {', '.join(perf.optimizer_names())})")
    return problems + [f"{step}[{key}]: {e}" for step, cmds in steps.items() for key, cmd in cmds.items()
                       if (e := command_error(cmd))]


# ---- running commands under a deadline ---------------------------------------------------------------------

def kill(proc: subprocess.Popen) -> None:
    """SIGTERM the command's process group (torchrun's workers, compile workers too), SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(5)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def stop(signum, _frame) -> None:
    """The signal handler of a real run: a terminated check takes its commands' process groups with it."""
    for proc in list(RUNNING.values()):
        kill(proc)
    sys.exit(128 + signum)


def run_all(cmds: dict[str, list[str]], deadline: float, logs: Path, jobs: int = 1) -> dict[str, dict]:
    """Run the commands, `jobs` at a time, each in its own process group with its output in logs/KEY.log,
    until `deadline` (time.monotonic()): one still running then is killed (timed_out), one not yet started
    is skipped. Returns key -> {status: ran|timed_out|skipped, rc, seconds, log, reason}, in order."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, done, started = list(cmds), {}, {}
    while pending or started:
        now = time.monotonic()
        while pending and len(started) < jobs and now < deadline:
            key = pending.pop(0)
            with open(logs / f"{key}.log", "w") as log:
                RUNNING[key] = subprocess.Popen(cmds[key], cwd=REPO, env=ENV, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
            started[key] = now
        for key, t0 in list(started.items()):
            rc = RUNNING[key].poll()
            if rc is None and now < deadline:
                continue
            if rc is None:
                kill(RUNNING[key])
            done[key] = {"status": "ran" if rc is not None else "timed_out", "rc": rc,
                         "log": str(logs / f"{key}.log"),
                         "reason": None if rc is not None else f"killed after {now - t0:.0f} s, the step's budget"}
            done[key]["seconds"] = round(time.monotonic() - t0, 1)
            del started[key], RUNNING[key]
        if now >= deadline:
            done.update({k: {"status": "skipped", "rc": None, "seconds": 0.0,
                             "reason": "not started: the step's budget was spent"} for k in pending})
            pending = []
        time.sleep(0.1)
    return {k: done[k] for k in cmds}


def verdict(key: str, r: dict) -> str | None:
    """None when the command ran and exited 0, else why not, in one line (its last error line)."""
    if r["status"] != "ran":
        return f"{key}: {r['status']} ({r['reason']})"
    if not r["rc"]:
        return None
    lines = [s.strip() for s in Path(r["log"]).read_text(errors="replace").splitlines() if s.strip()] or [""]
    error = next((s for s in reversed(lines) if s.startswith("error:") or re.match(r"\w+(Error|Exception)\b", s)),
                 lines[-1])
    return f"{key}: exit {r['rc']}: {error[:300]}"


def probe_result(r: dict) -> dict:
    lines = [s for s in Path(r["log"]).read_text(errors="replace").splitlines() if s.startswith(MARK)]
    return json.loads(lines[-1][len(MARK):]) if lines else {}


def status_of(r: dict, problems) -> str:
    return r["status"] if r["status"] != "ran" else "failed" if problems else "ok"


def worst(statuses) -> str:
    return next((s for s in ("failed", "timed_out", "skipped") if s in set(statuses)), "ok")


# ---- the steps: each returns {status, reason, detail, figures} ---------------------------------------------

def step_env(ctx) -> dict:
    r = run_all(ctx.plan["env"], ctx.deadline, ctx.logs)["env"]
    if why := verdict("env", r):
        return {"status": status_of(r, [why]), "reason": why}
    f = probe_result(r)
    ctx.results.update(gpu=f["gpu"], torch=f["torch"], cuda=f["cuda"])
    of = f"{f['measured_over_datasheet']:.0%} of" if f["datasheet_bf16_tflops"] else "no datasheet peak:"
    return {"status": "ok", "figures": f, "detail": f"{f['gpu']}: bf16 4096^3 matmul "
            f"{f['bf16_matmul_tflops']:.0f} TFLOP/s, {of} the datasheet {f['datasheet_bf16_tflops']} TFLOP/s"}


def step_perf(ctx) -> dict:
    r = run_all(ctx.plan["perf"], ctx.deadline, ctx.logs)["perf"]
    if why := verdict("perf", r):
        return {"status": status_of(r, [why]), "reason": why}
    res = json.loads((ctx.args.runs / "perf" / f"{PRESET}.json").read_text())
    f = {**perf_figures(res, ctx.figures("env").get("bf16_matmul_tflops")), "perf_json": res}
    why = None if f["precision"] == "bf16" and f["compiled"] else (
        f"perf: ran {f['precision']}, compiled={f['compiled']} (bf16 and torch.compile expected)")
    return {"status": status_of(r, [why] * bool(why)), "figures": f, "reason": why,
            "detail": f"{f['tokens_per_s_fwd_bwd'] or 0:,.0f} tokens/s (fwd+bwd), MFU "
            f"{f['mfu_vs_measured_matmul'] or 0:.0%} of measured, {f['mfu_vs_datasheet_bf16'] or 0:.0%} of datasheet"}


def step_train(ctx) -> dict:
    runs = run_all(ctx.plan["train"], ctx.deadline, ctx.logs / "train", jobs=ctx.args.jobs)
    figures, problems = {}, []
    for key, r in runs.items():
        rec, why = {"seconds": r["seconds"], "log": r.get("log")}, verdict(key, r)
        if not why:
            rec.update(read_run(ctx.args.runs / "train" / key, ctx.args.steps))
            why = f"{key}: {'; '.join(rec['problems'])}" if rec["problems"] else None
        figures[key] = {"status": status_of(r, [why] * bool(why)), **rec}
        problems += [why] * bool(why)
    statuses = [rec["status"] for rec in figures.values()]
    d = None
    if figures.get("adamw", {}).get("losses") and figures.get("adamw_repeat", {}).get("losses"):
        figures["determinism"] = d = determinism(figures["adamw"]["losses"], figures["adamw_repeat"]["losses"])
        if not d["ok"]:
            problems.append(f"determinism: adamw twice differs by {d['max_rel_diff']} relative (> {d['rtol']})")
    return {"status": worst(statuses + ["failed"] * bool(d and not d["ok"])), "figures": figures, "jobs": ctx.args.jobs,
            "reason": "; ".join(problems) or None, "detail": f"{statuses.count('ok')}/{len(runs)} runs ok"
            + (f"; adamw twice: max |diff| {d['max_abs_diff']:.2e}" if d else "")}


def step_torchrun(ctx) -> dict:
    runs = run_all(ctx.plan["torchrun"], ctx.deadline, ctx.logs / "torchrun", jobs=2)  # independent
    problems = {k: [v] for k, r in runs.items() if (v := verdict(k, r))}
    figures = {}
    if "nccl" not in problems:
        figures["nccl"] = n = probe_result(runs["nccl"])
        if not (n.get("backend") == "nccl" and n.get("all_reduce") == n.get("expected")):
            why = f"nccl: expected an nccl all_reduce of {n.get('expected')}, got {n or 'no result line'}"
            problems["nccl"] = [why]
    if "train" not in problems:
        figures["train"] = t = read_run(ctx.args.runs / "torchrun", 5)
        t["problems"] += [f"world_size {t.get('world_size')}, expected 1"] * (t.get("world_size", 1) != 1)
        if t["problems"]:
            problems["train"] = [f"train: {'; '.join(t['problems'])}"]
    n = figures.get("nccl") or {}
    return {"status": worst(status_of(r, problems.get(k)) for k, r in runs.items()), "figures": figures,
            "reason": "; ".join(p for ps in problems.values() for p in ps) or None,
            "detail": f"nccl {n.get('nccl_version')}: all_reduce {n.get('all_reduce')}; "
                      "train.py 5 steps under torchrun"}


def step_fsdp(ctx) -> dict:
    r = run_all(ctx.plan["fsdp"], ctx.deadline, ctx.logs)["fsdp"]
    if r["status"] != "ran":
        return {"status": r["status"], "reason": verdict("fsdp", r)}
    lines = [s.strip() for s in Path(r["log"]).read_text(errors="replace").splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("error:")]
    ok = r["rc"] == 2 and errors == [FSDP_REFUSAL] and not any("Traceback" in s for s in lines)
    return {"status": "ok" if ok else "failed", "figures": {"rc": r["rc"], "error_lines": errors},
            "detail": f"exit {r['rc']}: {(errors or [''])[0]}", "reason": None if ok else
            f"fsdp: exit {r['rc']}, error lines {errors or lines[-1:]} (expected exit 2 and {FSDP_REFUSAL!r})"}


STEPS = {"env": step_env, "perf": step_perf, "train": step_train, "torchrun": step_torchrun, "fsdp": step_fsdp}


# ---- the probes (subprocesses of the steps above) ----------------------------------------------------------

def probe_env() -> dict:
    import torch

    from scripts.perf_setup import datasheet_peak

    name, n, reps = torch.cuda.get_device_name(0), 4096, 50
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(10):  # warm-up: kernel choice, clocks
        a @ b
    torch.cuda.synchronize()
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    peak = datasheet_peak(name)
    rate, (major, minor) = statistics.median(rates), torch.cuda.get_device_capability(0)
    return {"gpu": name, "gpu_count": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "capability": f"{major}.{minor}",
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30, "bf16_matmul_tflops": rate,
            "bf16_matmul_tflops_best": max(rates), "datasheet_bf16_tflops": peak,
            "measured_over_datasheet": rate / peak if peak else None, "matmul": f"{n}^3 bf16, median of 5 x {reps}"}


def probe_nccl() -> dict:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    world, x = dist.get_world_size(), torch.full((1 << 20,), float(dist.get_rank() + 1), device="cuda")
    dist.all_reduce(x)
    gathered = torch.empty(world * x.numel(), device="cuda")
    dist.all_gather_into_tensor(gathered, x)
    dist.barrier()
    out = {"backend": dist.get_backend(), "world_size": world, "all_reduce": x[0].item(),
           "expected": world * (world + 1) / 2, "all_gather_sum": gathered.sum().item() / x.numel(),
           "nccl_version": ".".join(map(str, v)) if isinstance(v := torch.cuda.nccl.version(), tuple) else str(v)}
    dist.destroy_process_group()
    return out


# ---- main ----------------------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, args, steps: dict, results: dict):
        self.args, self.plan, self.results, self.logs, self.deadline = args, steps, results, args.runs / "logs", 0.0

    def figures(self, name: str) -> dict:
        return next((s.get("figures") or {} for s in self.results["steps"] if s["name"] == name), {})


def execute(args, steps: dict, budgets: dict[str, float]) -> int:
    res = record(args.runs, list(steps), budgets)
    ctx, written = Ctx(args, steps, res), set()
    for name, cmds in steps.items():
        t0 = time.monotonic()
        ctx.deadline = t0 + budgets[name]
        print(f"[gpu-check] {name} (budget {budgets[name]:.0f} s) ...", flush=True)
        try:
            rec = STEPS[name](ctx)
        except Exception as e:  # noqa: BLE001 - a broken step is recorded and the next one runs
            rec = {"status": "failed", "reason": f"{name}: {e.__class__.__name__}: {e}"}
        res["steps"].append({"name": name, "budget_s": budgets[name], "seconds": round(time.monotonic() - t0, 1),
                             "commands": {k: " ".join(c) for k, c in cmds.items()}, **rec})
        print(f"[gpu-check] {name}: {rec['status']} in {res['steps'][-1]['seconds']:.0f} s: "
              f"{rec.get('reason') or rec.get('detail') or ''}", flush=True)
        paths = write_results(res, args.out)
        for stale in written - set(paths):  # the GPU's name became known: no file left under the placeholder
            stale.unlink(missing_ok=True)
        written = set(paths)
    print(f"[gpu-check] {res['verdict']}; wrote {paths[0]} and {paths[1]}")
    for f in res["failures"]:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if res["failures"] else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and compose every command; run nothing")
    p.add_argument("--out", type=Path, default=REPO / "results" / "gpu", help="results directory (runs/ inside)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every step's budget")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=S", help="one step's budget, seconds")
    p.add_argument("--only", default=",".join(STEPS), help=f"steps to run, comma-separated ({','.join(STEPS)})")
    p.add_argument("--optimizers", help="train step: conf/optimizer names, comma-separated (default: every file)")
    p.add_argument("--steps", type=int, default=30, help="train step: optimizer steps per run")
    p.add_argument("--jobs", type=int, default=3, help="train step: runs at a time on the GPU")
    p.add_argument("--extra", action="append", default=[], metavar="OVERRIDE", help="added to every train.py")
    p.add_argument("--perf-repeats", type=int, default=3, help="scripts/perf.py --repeats")
    p.add_argument("--perf-optimizers", default=",".join(PERF_OPTIMIZERS), help="scripts/perf.py --optimizers")
    p.add_argument("--probe", choices=["env", "nccl"], help=argparse.SUPPRESS)  # the steps' own subprocesses
    return p


def zoo(name: str) -> bool:
    """A shipped conf/optimizer YAML of a registry package's class (optimizers/external.py), not the project's."""
    path = CONF / "optimizer" / f"{name}.yaml"
    return path.is_file() and not str(OmegaConf.load(path).get("_target_", "")).startswith("optimizers.")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.probe:
        print(MARK + json.dumps(probe_env() if args.probe == "env" else probe_nccl()), flush=True)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(f"error: no CUDA device (torch {torch.__version__}): the GPU check needs a GPU; "
                  "`python scripts/gpu_check.py --dry-run` checks its plan without one", file=sys.stderr)
            return 2
    budgets = {k: v * args.budget_scale for k, v in BUDGETS.items()}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets:
            p.error(f"--budget {item}: no step {name!r} (steps: {', '.join(STEPS)})")
        budgets[name] = float(seconds) * args.budget_scale
    only = [s for s in args.only.split(",") if s]
    if not only or set(only) - set(STEPS):
        p.error(f"--only {args.only}: steps are {', '.join(STEPS)}")
    from harness.config import search
    from harness.config.schema import ConfigError

    try:  # the user's optimizers (OPTBENCH_CONFIG_PATH) join the train step
        search.activate()  # the variable made absolute: the steps run from the repository
        files = search.options("optimizer")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if search.ENV in os.environ:
        ENV[search.ENV] = os.environ[search.ENV]
    args.optimizers = args.optimizers.split(",") if args.optimizers else [f for f in files if not zoo(f)]
    args.perf_optimizers = args.perf_optimizers.split(",")
    args.out = args.out.absolute()
    args.runs = args.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    steps = {k: v for k, v in plan(args).items() if k in only}
    total = sum(budgets[s] for s in steps)
    print(f"GPU check plan ({'dry run' if args.dry_run else 'run'}): {len(steps)} steps, {total:.0f} s in all "
          f"(budget scale {args.budget_scale:g}); results {args.out}/<gpu>.json and .md, runs {args.runs}")
    for name, cmds in steps.items():
        print(f"step {name}: budget {budgets[name]:.0f} s, {len(cmds)} command(s)")
        print("\n".join(f"  {key}: {' '.join(cmd)}" for key, cmd in cmds.items()))
    if missing := sorted(set(files) - set(args.optimizers)):
        print(f"note: not in the train step (--optimizers): {', '.join(missing)}"
              + ("; the shipped zoo is left out by default (Shampoo's two SVDs per matrix per step at GPT-2 124M "
                 "do not fit the step's budget): name them to include them" if any(map(zoo, missing)) else ""))
    if total > TOTAL_LIMIT:
        print(f"note: {total:.0f} s in all is more than the {TOTAL_LIMIT} s that fit a 15-minute GPU loan")
    if not (REPO / "data" / "cache" / "kjv" / "meta.json").is_file():
        print("note: data/cache/kjv is not prepared here: `make data` (make gpu-check does it first)")
    if args.dry_run:
        problems = check_plan(args, steps)
        for i, problem in enumerate(problems):
            print(f"{'also' if i else 'error'}: {problem}", file=sys.stderr)
        if not problems:
            print(f"dry run: every command composes ({sum(map(len, steps.values()))} commands)")
        return 1 if problems else 0
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    return execute(args, steps, budgets)


if __name__ == "__main__":
    sys.exit(main())
