"""Step-cost benchmark: what each optimizer and the harness cost per training step, next to the references.

    python scripts/perf.py cpu_small            # make perf; about a step per second on 2 CPU cores
    python scripts/perf.py cpu_tiny --repeats 3  # seconds; the regression guard's preset
    python scripts/perf.py gpt2_124m            # on a GPU (bf16 autocast, torch.compile)

In one process, repeats interleaved (every measured thing once per round, medians over rounds):
forward+backward of the model over one global batch; each optimizer's step() (as a ratio to forward+
backward and to AdamW's step; PolarGrad's also to Muon's, at Muon's configured NS dtype and with its NS in
fp32, the muon_fp32 entry: polargrad_step_over_muon, polargrad_step_over_muon_fp32), its state bytes (ratio
to AdamW's); the orthogonalization's matmul FLOP rate
(FlopCounterMode count / time) against the machine's measured dense-matmul rate, and the step/fwd+bwd ratio
the FLOPs predict at equal rate (5 Newton-Schulz steps on a d x d matrix: about 30 d^3 FLOPs, against
6 d^2 T for forward+backward over T tokens); references in the same process: torch.optim.AdamW (foreach,
fused), torch.optim.Muon on the same hidden matrices, and the `transformers` model of the identical
configuration (tokens/s of a training step with the same AdamW). Then, in a subprocess, train.py on the
same workload: its clocked step over the bare loop's is the harness overhead. Writes
results/perf/<preset>.json and .md. The presets, the prepared run each measurement times (Setup), the clock
(interleaved rounds, medians) and MFU are scripts/perf_setup.py's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.config import search
from harness.config.schema import ConfigError
from harness.lifecycle.records import environment, state_bytes
from optimizers import ortho
from optimizers.groups import row_slices
from runtime.device import autocast, matmul_rates
from runtime.files import atomic_write_json, atomic_write_text
from scripts.perf_setup import PRECISION, PRESETS, Setup, compose_run, mfu, optimizer_names, rounds, timed


def ortho_cost(s: Setup, repeats: int) -> dict[str, float]:
    """The orthogonalization alone on the optimizer's real hidden-matrix shapes (random inputs):
    matmul FLOPs (FlopCounterMode; QDWH's Cholesky factorizations and inverses not counted) and the median time."""
    group = next(g for g in s.opt.param_groups if "backend" in g)
    # QDWH and SVD run in fp32 whatever the dtype setting (torch has no bf16 QR / Cholesky / SVD)
    dtype = (ortho.compute_dtype(s.device, group["dtype"]) if group["backend"] in ("ns", "polar_express")
             else torch.float32)
    # the matrices the step orthogonalizes: GPT-2's fused q/k/v as three (the group's row_blocks, qkv=split)
    blocks = group.get("row_blocks") or [None] * len(group["params"])
    mats = [torch.randn_like(p[r]) for p, rows in zip(group["params"], blocks) for r in row_slices(rows, p.size(0))]
    steps = group.get("ns_steps")

    def run():
        return ortho.orthogonalize_many(mats, group["backend"], steps, dtype)

    with FlopCounterMode(display=False) as counter:
        run()
    t = rounds({"ortho": run}, repeats, s.device)["ortho"]
    return {"flops": counter.get_total_flops(), "time_s": t, "dtype": str(dtype).removeprefix("torch."),
            "backend": group["backend"], "shapes": [list(m.shape) for m in mats]}


def shape_matmul_rate(shapes: list[list[int]], dtype: torch.dtype, repeats: int,
                      device: torch.device) -> float:
    """FLOP/s of plain batched matmuls with the shapes one Newton-Schulz iteration multiplies (per same-shape
    bucket, rows <= columns: A = X Xᵀ, A @ A, A @ X), in `dtype`: what the orthogonalization could reach
    on these shapes, as opposed to a large square matmul."""
    buckets: dict[tuple[int, int], int] = {}
    for m in shapes:
        shape = tuple(sorted(m))
        buckets[shape] = buckets.get(shape, 0) + 1
    xs = [torch.randn(k, a, b, device=device).to(dtype) for (a, b), k in buckets.items()]
    flops = sum(2 * x.shape[0] * x.shape[1] * x.shape[1] * x.shape[2] * 2 + 2 * x.shape[0] * x.shape[1] ** 3
                for x in xs)

    def run():
        for x in xs:
            a = x @ x.mT
            (a @ a) @ x

    return flops / rounds({"mm": run}, repeats, device)["mm"]


def measure_optimizers(preset: str, optimizers: list[str], device: torch.device, repeats: int) -> dict:
    """fwd+bwd and step() of every optimizer, interleaved; state bytes; the matrix methods' ortho cost."""
    setups = {name: Setup(preset, name) for name in optimizers}
    for s in setups.values():  # gradients to step with (kept: step() does not consume them), state created
        s.fwd_bwd()
        s.step()
    base = setups[optimizers[0]]
    items = {"fwd_bwd": lambda: (base.model.zero_grad(set_to_none=True), base.fwd_bwd())}
    items.update({name: s.step for name, s in setups.items()})
    t = rounds(items, repeats, device)
    out = {"fwd_bwd_s": t["fwd_bwd"], "tokens": base.tokens, "compiled": base.compiled, "precision": base.precision,
           # train.precision=auto's measurement for this preset (perf_setup.PRECISION; on CUDA None)
           "precision_probe": PRECISION.get(preset, {}).get("probe"),
           "fwd_bwd_flops": base.tokens * base.model.flops_per_token(base.cfg.train.seq_len), "optimizers": {}}
    out.update(mfu(out["fwd_bwd_flops"], t["fwd_bwd"], base.precision, device))
    adamw = t.get("adamw")
    bytes_adamw = state_bytes(setups["adamw"].opt) if "adamw" in setups else None
    for name, s in setups.items():
        r = {"step_s": t[name], "step_over_fwd_bwd": t[name] / t["fwd_bwd"],
             "step_over_adamw": t[name] / adamw if adamw else None, "state_bytes": state_bytes(s.opt),
             "state_bytes_over_adamw": state_bytes(s.opt) / bytes_adamw if bytes_adamw else None,
             # a training step with this optimizer over one with AdamW (the published Muon figure: ~1.025
             # at GPT-2 124M on an H100), from the same forward+backward and the two steps
             "train_step_over_adamw": (t["fwd_bwd"] + t[name]) / (t["fwd_bwd"] + adamw) if adamw else None}
        if s.matrix:
            # The orthogonalization's matmul FLOP rate against (1) the machine's measured fp32 matmul rate
            # (512², the yardstick), (2) the rate of its own dtype (bf16 where it runs in bf16), and
            # (3) plain batched matmuls of its own shapes and dtype (what these small matrices allow).
            c = ortho_cost(s, repeats)
            rates = matmul_rates(str(device), 512)
            dtype = getattr(torch, c["dtype"])
            rate = c["flops"] / c["time_s"]
            c["shape_rate_gflops"] = shape_matmul_rate(c["shapes"], dtype, repeats, device) / 1e9
            c["matmul_gflops"] = rates
            r.update(ortho=c, ortho_flops_over_matmul_peak=rate / (rates["float32"] * 1e9),
                     ortho_flops_over_dtype_peak=rate / (rates["bfloat16" if dtype == torch.bfloat16
                                                               else "float32"] * 1e9),
                     ortho_flops_over_shape_rate=rate / (c["shape_rate_gflops"] * 1e9),
                     predicted_step_over_fwd_bwd=c["flops"] / out["fwd_bwd_flops"])
        out["optimizers"][name] = r
    # PolarGrad's step over Muon's: Muon at its configured dtype (auto: bf16 NS where bf16 is fast) and with fp32 NS
    for key, muon in (("polargrad_step_over_muon", "muon"), ("polargrad_step_over_muon_fp32", "muon_fp32")):
        if "polargrad" in t and muon in t:
            out[key] = t["polargrad"] / t[muon]
    return out


def newton_refresh(preset: str, device: torch.device, repeats: int) -> dict:
    """Newton-Muon's refresh, amortized over its interval k: the refresh step (statistics folded, batched
    Cholesky) and the forward hooks' Gram matrices, measured with refresh_every=1, spread over k steps."""
    plain = Setup(preset, "newton_muon")
    every = Setup(preset, "newton_muon", ("optimizer.refresh_every=1",))
    k = plain.opt.spec.refresh_every
    for s in (plain, every):
        s.fwd_bwd()
    every.hooks.begin_step(0)
    every.fwd_bwd()
    every.hooks.end_step()
    every.step()

    def with_inputs():
        every.hooks.begin_step(every.steps)
        every.fwd_bwd()
        every.hooks.end_step()

    def refresh_step():
        every.step()

    times: dict[str, list[float]] = {"fwd_bwd": [], "fwd_bwd_hooks": [], "step": [], "refresh_step": []}
    for _ in range(repeats):
        times["fwd_bwd"].append(timed(plain.fwd_bwd, device))
        times["fwd_bwd_hooks"].append(timed(with_inputs, device))
        times["step"].append(timed(plain.step, device))
        times["refresh_step"].append(timed(refresh_step, device))
    m = {key: statistics.median(v) for key, v in times.items()}
    extra = (m["refresh_step"] - m["step"]) + (m["fwd_bwd_hooks"] - m["fwd_bwd"])
    return {"refresh_every": k, **{f"{key}_s": v for key, v in m.items()},
            "amortized_step_s": m["step"] + extra / k}


def references(preset: str, device: torch.device, repeats: int) -> dict:
    """torch.optim.AdamW (foreach, fused), torch.optim.Muon on our hidden matrices vs our Muon class alone,
    and transformers' model at the same configuration (training step tokens/s, same AdamW)."""
    from transformers import AutoModelForCausalLM

    from models.hf import hf_config

    ours = Setup(preset, "adamw")
    ref = Setup(preset, "adamw")  # its gradients stay (ours.train_step zeroes its own)
    ref.fwd_bwd()
    params = list(ref.model.parameters())
    refs = {"torch_adamw_foreach": torch.optim.AdamW(params, lr=1e-3, foreach=True),
            "torch_adamw_fused": torch.optim.AdamW(params, lr=1e-3, fused=True)}
    muon_setup = Setup(preset, "muon")
    hidden = muon_setup.split.params("hidden")
    our_muon = muon_setup.opt.optimizers[0]  # the Muon member of the CombinedOptimizer: hidden matrices only
    muon_setup.fwd_bwd()
    items = {k: o.step for k, o in refs.items()}
    if hasattr(torch.optim, "Muon"):
        items["torch_muon"] = torch.optim.Muon(hidden, lr=0.02, adjust_lr_fn="match_rms_adamw").step
    items["our_muon_hidden"] = our_muon.step

    hf = AutoModelForCausalLM.from_config(hf_config(ours.cfg.model)).to(device)
    hf.train()
    hf_fast = torch.compile(hf) if ours.compiled else hf  # compiled where ours is: the same configuration
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    b = ours.batches

    def hf_step():
        for x in b:
            with autocast(device, ours.precision):
                loss = hf_fast(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # labels shift inside: T-1 targets
            (loss / len(b)).backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    items.update({"transformers_train_step": hf_step, "ours_train_step": ours.train_step})
    t = rounds(items, repeats, device)
    return {**{f"{k}_s": v for k, v in t.items()},
            "tokens_per_s_ours": ours.tokens / t["ours_train_step"],
            "tokens_per_s_transformers": ours.tokens / t["transformers_train_step"],
            "tokens_per_s_over_transformers": t["transformers_train_step"] / t["ours_train_step"]}


def large_batch_muon(preset: str, device: torch.device, tokens: int, step_s: float) -> dict:
    """Muon's step against forward+backward at >= `tokens` per step (accumulation): the step does not
    grow with the batch, forward+backward does."""
    s = Setup(preset, "muon")
    reps = math.ceil(tokens / s.tokens)
    s.fwd_bwd()
    fb = statistics.median(timed(s.fwd_bwd, device) for _ in range(2)) * reps
    return {"tokens": s.tokens * reps, "fwd_bwd_s": fb, "muon_step_s": step_s, "muon_step_over_fwd_bwd": step_s / fb}


def pc_overhead(preset: str, device: torch.device, repeats: int) -> dict:
    plain, pc = Setup(preset, "adamw"), Setup(preset, "adamw", ("model.pc_level=4",))
    t = rounds({"plain": plain.fwd_bwd, "pc": pc.fwd_bwd}, repeats, device)
    refresh = rounds({"refresh": pc.model.after_optimizer_step}, repeats, device)["refresh"]
    return {"fwd_bwd_s": t["plain"], "pc4_fwd_bwd_s": t["pc"], "pc4_refresh_s": refresh,
            "pc4_overhead": (t["pc"] + refresh) / t["plain"] - 1}


def fused_head(preset: str, device: torch.device, repeats: int) -> dict:
    """The output head with its loss, forward and backward, over one global batch: models/base.py's fused,
    chunked LinearCrossEntropy against F.linear + F.cross_entropy (the full logits in memory), fp32."""
    from models.base import LinearCrossEntropy

    s = Setup(preset, "adamw")
    t, m = s.cfg.train, s.cfg.model
    gen = torch.Generator().manual_seed(2)
    n = t.global_batch_size * t.seq_len
    x = torch.randn(n, m.d_model, generator=gen).to(device).requires_grad_()
    w = (0.02 * torch.randn(m.vocab_size, m.d_model, generator=gen)).to(device).requires_grad_()
    y = torch.randint(0, m.vocab_size, (n,), generator=gen).to(device)

    def fused():
        LinearCrossEntropy.apply(x, w, y).backward()

    def unfused():
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w), y).backward()

    r = rounds({"fused": fused, "unfused": unfused}, repeats, device)
    return {"tokens": n, "d_model": m.d_model, "vocab": m.vocab_size, "fused_s": r["fused"], "unfused_s": r["unfused"],
            "fused_over_unfused": r["fused"] / r["unfused"]}


def bare_loop(preset: str, steps: int, threads: int) -> float:
    """The bare loop (forward+backward, clip, AdamW step, zero_grad) over the same real batches train.py
    reads, loaded before the clock: the median step time from step 3 on. Run in a fresh process
    (harness_overhead), like train.py: a long-lived process with a warmed-up heap runs the same loop ~5%
    faster here, which would pass for harness overhead."""
    torch.set_num_threads(threads)
    s = Setup(preset, "adamw")
    t, data = s.cfg.train, s.run.data
    batches = []
    for step in range(steps):
        micro = [data.train_batch(step, m, t.micro_batch_size, s.accum) for m in range(s.accum)]
        batches.append([torch.cat([x, y[:, -1:]], 1) for x, y in micro])
    times = []
    for b in batches:
        s.batches = b
        times.append(timed(s.train_step, s.device))
    return statistics.median(times[2:])


def harness_overhead(preset: str, device: torch.device, steps: int, launches: int = 3) -> dict:
    """train.py on the same workload (AdamW, real data, logging every step, no evaluation or checkpoint
    inside the measured steps) against the bare loop over the same batches, each in `launches` fresh
    processes, alternating: the median over launches of each launch's median step (from step 3 on). One
    launch's median varies by up to ~8% from the next here, more than the overhead being measured. CPU only
    (the bare-loop subprocess runs on the CPU)."""
    threads = torch.get_num_threads()
    env = {**os.environ, "WANDB_MODE": "disabled"}
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from scripts.perf import bare_loop; "
            f"print(bare_loop({preset!r}, {steps}, {threads}))")
    bare_cmd = [sys.executable, "-c", code]
    harness, bare = [], []
    for _ in range(launches):
        proc = subprocess.run(bare_cmd, cwd=REPO, capture_output=True, text=True, check=False, env=env)
        if proc.returncode:
            raise RuntimeError(f"bare loop failed: {proc.stderr[-1500:]}")
        bare.append(float(proc.stdout.strip().splitlines()[-1]))
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(REPO / "train.py"), *PRESETS[preset], "optimizer=adamw", "logger=none",
                   f"train.max_steps={steps}", f"train.eval_every={steps}", "train.eval_dense_frac=0",
                   "train.ckpt_every=0", "train.save_final=false", "train.progress=false",
                   f"train.threads={threads}", f"hydra.run.dir={tmp}/run"]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env=env)
            if proc.returncode:
                raise RuntimeError(f"train.py failed: {proc.stderr[-1500:]}")
            clock = [json.loads(line)["train_time_s"] for line in
                     (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if "train_loss" in line]
        harness.append(statistics.median([b - a for a, b in itertools.pairwise(clock)][2:]))  # steps 3..: warm
    h, b = statistics.median(harness), statistics.median(bare)
    return {"train_py_step_s": h, "bare_step_s": b, "train_py_launches_s": harness, "bare_launches_s": bare,
            "harness_overhead": h / b - 1}


def table(res: dict) -> str:
    o = res["optimizers"]
    lines = [f"# Step cost: preset {res['preset']} ({res['device']}, {res['threads']} threads, {res['date']})", "",
             (f"forward+backward: {res['fwd_bwd_s'] * 1e3:.1f} ms for {res['tokens']:,} tokens "
              f"({res['precision']}, {'compiled' if res['compiled'] else 'eager'}; {res['model_tflops']:.3g} "
              f"TFLOP/s, MFU {res['mfu_vs_measured_matmul']:.0%} of the measured matmul rate"
              + (f", {res['mfu_vs_datasheet_bf16']:.0%} of the {res['device_name']} datasheet bf16 peak"
                 if res.get("mfu_vs_datasheet_bf16") else "") + "); "
              f"ours vs transformers: {res['tokens_per_s_over_transformers']:.2f}x tokens/s; harness overhead "
              + (f"{res['harness_overhead']:+.1%}" if "harness_overhead" in res else "not measured (CPU only)")),
             "",
             ("| optimizer | step (ms) | step / fwd+bwd | step / AdamW | training step / AdamW's | state / AdamW "
              "| ortho rate / fp32 matmul rate (/ own dtype's, / same-shape matmuls) | predicted step / fwd+bwd |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, r in o.items():
        ortho_rate = (f"{r['ortho_flops_over_matmul_peak']:.0%} ({r['ortho_flops_over_dtype_peak']:.0%}, "
                      f"{r['ortho_flops_over_shape_rate']:.0%}; {r['ortho']['backend']}, {r['ortho']['dtype']})"
                      if "ortho" in r else "")
        pred = f"{r['predicted_step_over_fwd_bwd']:.3f}" if "predicted_step_over_fwd_bwd" in r else ""
        lines.append(f"| {name} | {r['step_s'] * 1e3:.2f} | {r['step_over_fwd_bwd']:.3f} | {r['step_over_adamw']:.2f} "
                     f"| {r['train_step_over_adamw']:.3f} | {r['state_bytes_over_adamw']:.3f} | {ortho_rate} "
                     f"| {pred} |")
    ref = res["references"]
    lines += ["", "References (same process, interleaved): " + ", ".join(
        f"{k.removesuffix('_s')} {v * 1e3:.2f} ms" for k, v in ref.items() if k.endswith("_s")), ""]
    if "polargrad_step_over_muon" in res:
        muon_dtype = o["muon"].get("ortho", {}).get("dtype", "?")
        fp32 = res.get("polargrad_step_over_muon_fp32")
        lines.append(f"polargrad / muon: {res['polargrad_step_over_muon']:.2f}x step (Muon's NS at its dtype setting, "
                     f"here {muon_dtype})" + (f"; polargrad / muon (fp32 NS): {fp32:.2f}x" if fp32 is not None else ""))
    if "newton_refresh" in res:
        n = res["newton_refresh"]
        lines.append(f"Newton-Muon amortized over k={n['refresh_every']}: {n['amortized_step_s'] * 1e3:.2f} ms/step "
                     f"(refresh step {n['refresh_step_s'] * 1e3:.2f} ms, Grams in the forward "
                     f"{(n['fwd_bwd_hooks_s'] - n['fwd_bwd_s']) * 1e3:.2f} ms)")
    if "large_batch" in res:
        lb = res["large_batch"]
        lines.append(f"Muon at {lb['tokens']:,} tokens/step: step / fwd+bwd = {lb['muon_step_over_fwd_bwd']:.2%}")
    if "pc" in res:
        lines.append(f"PC layers (level 4) per step: {res['pc']['pc4_overhead']:+.1%} over forward+backward")
    if "fused_head" in res:
        h = res["fused_head"]
        lines.append(f"Fused head + loss (forward and backward, {h['tokens']:,} tokens x {h['vocab']:,} words): "
                     f"{h['fused_s'] * 1e3:.1f} ms against {h['unfused_s'] * 1e3:.1f} ms for F.linear + cross-entropy")
    return "\n".join(lines) + "\n"


def run(preset: str, repeats: int, optimizers: list[str], out: Path | None, full: bool = True) -> dict:
    device = compose_run(preset, "adamw").device
    res = {"preset": preset, "device": str(device), "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "overrides": PRESETS[preset],
           "matmul_gflops": matmul_rates(str(device), 512)}
    res.update(measure_optimizers(preset, optimizers, device, repeats))
    if full:
        if "newton_muon" in optimizers:
            res["newton_refresh"] = nr = newton_refresh(preset, device, repeats)
            r = res["optimizers"]["newton_muon"]
            r["amortized_step_over_fwd_bwd"] = nr["amortized_step_s"] / res["fwd_bwd_s"]
        # ours / transformers differ by ~15-20% while single rounds vary by ~10% on a shared CPU: 3x the rounds
        res["references"] = references(preset, device, 3 * repeats)
        res["tokens_per_s_over_transformers"] = res["references"]["tokens_per_s_over_transformers"]
        res["pc"] = pc_overhead(preset, device, repeats)
        res["fused_head"] = fused_head(preset, device, repeats)
        if "muon" in optimizers:
            res["large_batch"] = large_batch_muon(preset, device, 65536, res["optimizers"]["muon"]["step_s"])
        if device.type == "cpu":
            res.update(harness_overhead(preset, device, 30))
        res["environment"] = environment(device)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / f"{preset}.json", res)
        if full:
            atomic_write_text(out / f"{preset}.md", table(res))
    return res


def main() -> None:
    try:
        search.activate()  # the user's optimizers (OPTBENCH_CONFIG_PATH) are measured too
    except ConfigError as e:
        sys.exit(f"error: {e}")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--optimizers", default=",".join(optimizer_names()))
    p.add_argument("--out", default=str(REPO / "results" / "perf"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - set(optimizer_names()))
    if unknown or "adamw" not in names:
        sys.exit(f"error: --optimizers: {', '.join(unknown) or 'adamw is required (the reference)'}")
    res = run(args.preset, args.repeats, names, Path(args.out))
    print(table(res))
    print(f"wrote {args.out}/{args.preset}.json and .md")


if __name__ == "__main__":
    main()
