#!/usr/bin/env python3
"""Autoencoder training throughput: kvcodec's CPU trainer (train/ae.c via bench_ae) against the
same PyTorch model (tools/ae_reference.py) on the same data.

Both train the KV-CAR autoencoder (default D=64, H=64, R=32, BatchNorm, LeakyReLU) with the MSE
loss, AdamW (lr 1e-3, wd 1e-4 on Linear weights) and gradient clipping at 1.0, on consecutive
batches of --batch rows of one raw float32 file of normal data (written once from a fixed
seed, read by both). Throughput is rows (samples of D floats) per second over --steps steps
after --warmup steps. The two run alternately, --rounds times, with --threads threads each
(torch.set_num_threads; OMP_NUM_THREADS/openblas_set_num_threads in bench_ae); the report
gives medians and the ratio kvcodec / PyTorch. bench_ae is run with OPENBLAS_CORETYPE=Haswell
when the CPU has AVX2+FMA and the variable is unset (it would otherwise re-exec itself to
set it).

Needs: a bench_ae binary (--bin, default build/bench_ae; or compile it by hand:
  gcc -O3 -march=native -fopenmp -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude \\
      -I/usr/include/x86_64-linux-gnu/openblas-pthread bench/bench_ae.c train/ae.c model/common.c \\
      -lopenblas -lm -o /tmp/bench_ae)
Usage: python3 bench/bench_ae_train.py [--bin build/bench_ae] [--threads 2] [--batch 1024]
                                       [--steps 200] [--rounds 7] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import ae_reference  # noqa: E402  (after the path tweak)


def write_data(path, rows, dim, seed):
    """Normal rows with per-channel scales and offsets, float32, written once."""
    if os.path.exists(path) and os.path.getsize(path) == rows * dim * 4:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim), dtype=np.float32) * rng.uniform(0.3, 2.0, dim).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x.astype(np.float32).tofile(path)


def torch_round(args, x):
    """Trains a fresh PyTorch model for warmup + steps steps; returns samples/s of the timed steps."""
    import torch
    cfg = ae_reference.default_config(in_dim=args.dim, hidden=args.hidden, latent=args.latent, act=args.act,
                                      norm=args.norm)
    model = ae_reference.build_model(cfg, 1)
    model.train()
    opt = ae_reference.make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    n_batches = x.shape[0] // args.batch
    b = 0
    t0 = None
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            t0 = time.perf_counter()
        ae_reference.train_step(model, opt, x[b * args.batch:(b + 1) * args.batch], "mse", clip=1.0)
        b = (b + 1) % n_batches
    return args.steps * args.batch / (time.perf_counter() - t0)


def ours_round(args):
    """One run of bench_ae; returns its JSON report."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    if "OPENBLAS_CORETYPE" not in env and has_avx2_fma():
        env["OPENBLAS_CORETYPE"] = "Haswell"
    cmd = [args.bin, "--data", args.data, "--dim", str(args.dim), "--hidden", str(args.hidden), "--latent",
           str(args.latent), "--act", args.act, "--norm", args.norm, "--batch", str(args.batch), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
    return json.loads(out)


def has_avx2_fma():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bench_ae"))
    ap.add_argument("--data", default=os.path.join(ROOT, "out", "bench_ae_data.f32"))
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--act", default="leaky_relu", choices=ae_reference.ACTS)
    ap.add_argument("--norm", default="batch", choices=["batch", "none"])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    write_data(args.data, args.rows, args.dim, 20240601)
    x = torch.from_numpy(np.fromfile(args.data, dtype=np.float32).reshape(-1, args.dim))
    ours, theirs, first = [], [], None
    for r in range(args.rounds):
        order = [("ours", None), ("torch", None)] if r % 2 == 0 else [("torch", None), ("ours", None)]
        for who, _ in order:
            if who == "ours":
                rep = ours_round(args)
                first = first or rep
                ours.append(rep["samples_per_s"])
            else:
                theirs.append(torch_round(args, x))
        print(f"round {r + 1}/{args.rounds}: kvcodec {ours[-1]:,.0f}  torch {theirs[-1]:,.0f} samples/s", flush=True)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    res = {
        "config": {k: getattr(args, k) for k in ("dim", "hidden", "latent", "act", "norm", "batch", "steps", "warmup",
                                                 "threads", "rounds", "rows")},
        "kvcodec_samples_per_s": ours, "torch_samples_per_s": theirs,
        "kvcodec_median": mo, "torch_median": mt, "ratio": mo / mt,
        "torch_version": torch.__version__, "blas_core": first["blas_core"], "cpu": platform.processor(),
    }
    print(f"median: kvcodec {mo:,.0f} samples/s, PyTorch {mt:,.0f} samples/s, ratio {mo / mt:.2f}x "
          f"(D={args.dim} H={args.hidden} R={args.latent} {args.norm} {args.act}, batch {args.batch}, "
          f"{args.threads} threads, OpenBLAS core {first['blas_core']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
