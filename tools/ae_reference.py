#!/usr/bin/env python3
"""PyTorch reference of the kvcodec head_dim autoencoder (include/kvc/ae.h, train/ae.c).

The model is two nn.Sequential halves whose indices name the tensors exactly as ae.h does:
    hidden == 0: enc = [Linear(D, R)],                          dec = [Linear(R, D)]
    hidden  > 0: enc = [Linear(D, H), (BatchNorm1d(H)), act, Linear(H, R)]
                 dec = [Linear(R, H), (BatchNorm1d(H)), act, Linear(H, D)]
act is ReLU, LeakyReLU(slope), GELU(approximate='tanh'), SiLU or Identity. The losses
(MSE, KEY_ATTN, VALUE_ATTN + mse_mix * MSE), AdamW with weight decay on Linear weights only,
clip_grad_norm_ and the warmup+cosine schedule follow ae.h.

Writes tests/fixtures/ae_trajectory.txt (the default --out): for a few small cases, the
config, a data batch, the initial weights (from a fixed torch seed), the per-step learning
rate and training loss of --steps AdamW steps, and the final parameter norms, running
statistics and eval-mode relative error. Lines are "<case>.<key> ..." ('#' = comment);
arrays are "<key> rows cols v..." with %.9g floats (exact float32 round trip).

The benchmark bench/bench_ae_train.py imports build_model / make_optimizer / train_step.

Usage: python3 tools/ae_reference.py [--out tests/fixtures/ae_trajectory.txt] [--steps 20] [--seed 1234]
"""
import argparse
import datetime
import math
import os

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTS = ["none", "relu", "leaky_relu", "gelu", "silu"]


def act_module(act, slope):
    """The nn module for an activation name of ae.h."""
    return {"none": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(slope),
            "gelu": nn.GELU(approximate="tanh"), "silu": nn.SiLU()}[act]


class AE(nn.Module):
    """Encoder and decoder as in ae.h; forward returns the reconstruction."""

    def __init__(self, cfg):
        super().__init__()
        d, h, r = cfg["in_dim"], cfg["hidden"], cfg["latent"]
        self.enc = self._half(d, h, r, cfg)
        self.dec = self._half(r, h, d, cfg)

    @staticmethod
    def _half(n_in, h, n_out, cfg):
        if h == 0:
            return nn.Sequential(nn.Linear(n_in, n_out))
        layers = [nn.Linear(n_in, h)]
        if cfg["norm"] == "batch":
            layers.append(nn.BatchNorm1d(h, eps=cfg["bn_eps"], momentum=cfg["bn_momentum"]))
        layers += [act_module(cfg["act"], cfg["leaky_slope"]), nn.Linear(h, n_out)]
        return nn.Sequential(*layers)

    def forward(self, x):
        return self.dec(self.enc(x))


def default_config(**kw):
    """kvc_ae_config_defaults plus overrides."""
    cfg = dict(in_dim=64, hidden=0, latent=16, act="none", norm="none", leaky_slope=0.01, bn_eps=1e-5,
               bn_momentum=0.1)
    cfg.update(kw)
    return cfg


def build_model(cfg, seed):
    """The reference model with PyTorch's default init from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return AE(cfg)


def named_tensors(model):
    """(name, tensor) in ae.h order: parameters of enc then dec, then running statistics."""
    out = [(f"{h}.{n}", p) for h in ("enc", "dec") for n, p in getattr(model, h).named_parameters()]
    out += [(f"{h}.{n}", b) for h in ("enc", "dec") for n, b in getattr(model, h).named_buffers()
            if n.endswith("running_mean") or n.endswith("running_var")]
    return out


def make_optimizer(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4):
    """AdamW with decoupled weight decay on Linear weights only (kvc_ae_adam_step)."""
    decay, rest = [], []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            decay.append(mod.weight)
            rest.append(mod.bias)
        elif isinstance(mod, nn.BatchNorm1d):
            rest += [mod.weight, mod.bias]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def loss_fn(kind, y, x, w=None, a=None, mse_mix=0.0):
    """The three losses of ae.h on reconstruction y and data x (N, D)."""
    e = y - x
    n, d = x.shape
    mse = (e * e).sum() / (n * d)
    if kind == "mse":
        return mse
    if kind == "key_attn":
        return ((e @ w) * e).sum() / (n * d) + mse_mix * mse
    s = a @ e
    return (s * s).sum() / (a.shape[0] * d) + mse_mix * mse


def lr_schedule(t, total, warmup, base, min_lr):
    """kvc_ae_lr_schedule: linear warmup from 0, then cosine from base to min_lr at total."""
    if warmup > 0 and t < warmup:
        return base * t / warmup
    if t >= total:
        return min_lr
    p = (t - warmup) / (total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def bn_cancelled_biases(model):
    """Biases whose gradient BatchNorm makes exactly 0: the Linear bias before each BatchNorm
    and the latent bias (it shifts every column of the decoder's BatchNorm input alike).
    autograd returns rounding noise for them, which Adam's normalisation turns into lr-sized
    random steps; train/ae.c writes exact zeros, and so does train_step."""
    if not any(isinstance(mod, nn.BatchNorm1d) for mod in model.modules()):
        return []
    return [model.enc[0].bias, model.enc[-1].bias, model.dec[0].bias]


def train_step(model, opt, x, kind="mse", w=None, a=None, mse_mix=0.0, clip=1.0):
    """One training step (forward, loss, backward, clip, AdamW); returns (loss, grad norm)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(kind, model(x), x, w, a, mse_mix)
    loss.backward()
    for b in bn_cancelled_biases(model):
        b.grad.zero_()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip > 0 else torch.tensor(0.0)
    opt.step()
    return loss.item(), norm.item()


def fmt(t):
    """Row-major values of a tensor as %.9g."""
    return " ".join("%.9g" % v for v in t.detach().reshape(-1).tolist())


def arr_line(key, t):
    """'key rows cols v...' for a vector or matrix."""
    rows, cols = (t.shape[0], t.shape[1]) if t.dim() == 2 else (t.shape[0], 1)
    return f"{key} {rows} {cols} {fmt(t)}"


def key_weight(d, n_q, gen):
    """W = Q^T Q / n_q for n_q random queries with a few dominant channels (like real queries)."""
    q = torch.randn(n_q, d, generator=gen) * (0.5 + 2.0 * torch.rand(d, generator=gen))
    return q.T @ q / n_q


def data_batch(n, d, gen):
    """Rows with per-channel scales and offsets (as real keys/values have)."""
    scale = 0.3 + 1.7 * torch.rand(d, generator=gen)
    return torch.randn(n, d, generator=gen) * scale + 0.5 * torch.randn(d, generator=gen)


CASES = [
    # name, config, loss kind, mse_mix, rows, clip (chosen so that the first few steps are clipped)
    ("kvcar", default_config(in_dim=64, hidden=32, latent=16, act="leaky_relu", norm="batch"), "mse", 0.0, 32, 0.5),
    ("linear_key", default_config(in_dim=32, hidden=0, latent=8), "key_attn", 0.1, 32, 4.0),
    ("gelu_value", default_config(in_dim=32, hidden=16, latent=8, act="gelu"), "value_attn", 0.25, 32, 0.2),
]
HYPER = dict(lr=1e-2, min_lr=1e-3, warmup=3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)


def write_case(lines, name, cfg, kind, mix, n, clip, steps, seed):
    """Runs one case and appends its fixture lines."""
    gen = torch.Generator().manual_seed(seed)
    x = data_batch(n, cfg["in_dim"], gen)
    w = key_weight(cfg["in_dim"], 12, gen) if kind == "key_attn" else None
    a = torch.softmax(2.0 * torch.randn(8, n, generator=gen), dim=1) if kind == "value_attn" else None
    model = build_model(cfg, seed)
    model.train()
    h = dict(HYPER, clip=clip)
    opt = make_optimizer(model, h["lr"], (h["beta1"], h["beta2"]), h["eps"], h["weight_decay"])
    p = f"{name}."
    lines.append(f"{p}config {cfg['in_dim']} {cfg['hidden']} {cfg['latent']} {cfg['act']} {cfg['norm']} "
                 f"{cfg['leaky_slope']:.9g} {cfg['bn_eps']:.9g} {cfg['bn_momentum']:.9g}")
    lines.append(f"{p}loss {kind} {mix:.9g}")
    lines.append(f"{p}adam {h['lr']:.9g} {h['min_lr']:.9g} {h['warmup']} {steps} {h['beta1']:.9g} "
                 f"{h['beta2']:.9g} {h['eps']:.9g} {h['weight_decay']:.9g} {h['clip']:.9g}")
    lines.append(arr_line(p + "x", x))
    if w is not None:
        lines.append(arr_line(p + "w", w))
    if a is not None:
        lines.append(arr_line(p + "a", a))
    for tname, t in named_tensors(model):
        lines.append(arr_line(f"{p}init {tname}", t))
    lrs, losses, norms = [], [], []
    for t in range(steps):
        lr = lr_schedule(t, steps, h["warmup"], h["lr"], h["min_lr"])
        for g in opt.param_groups:
            g["lr"] = lr
        loss, norm = train_step(model, opt, x, kind, w, a, mix, h["clip"])
        lrs.append(lr)
        losses.append(loss)
        norms.append(norm)
    lines.append(f"{p}lr {steps} 1 " + " ".join("%.9g" % v for v in lrs))
    lines.append(f"{p}losses {steps} 1 " + " ".join("%.9g" % v for v in losses))
    lines.append(f"{p}grad_norms {steps} 1 " + " ".join("%.9g" % v for v in norms))
    for tname, t in named_tensors(model):
        if "running" in tname:
            lines.append(arr_line(f"{p}final {tname}", t))
        else:
            lines.append(f"{p}final_norm {tname} {t.detach().double().norm().item():.9g}")
    model.eval()
    with torch.no_grad():
        y = model(x).double()
        rel = ((y - x.double()).pow(2).sum() / x.double().pow(2).sum()).sqrt().item()
    lines.append(f"{p}rel_error {rel:.9g}")
    clipped = sum(1 for v in norms if v > h["clip"])
    print(f"{name}: loss {losses[0]:.5f} -> {losses[-1]:.5f}, clipped {clipped}/{steps} steps, eval rel err {rel:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "ae_trajectory.txt"),
                    help="fixture path, relative to the repo root")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["# ae_trajectory.txt - AdamW training trajectories of the head_dim autoencoder in PyTorch,",
             f"# written by tools/ae_reference.py (torch {torch.__version__}, float32, CPU, seed {args.seed}) "
             f"on {datetime.date.today().isoformat()}.",
             "# Per case: config D H R act norm slope eps momentum; loss kind mse_mix; adam lr min_lr warmup steps",
             "# beta1 beta2 eps wd clip; x/w/a data; init <tensor> (ae.h names); per-step lr, losses (before the",
             "# step), grad_norms (pre-clip); final_norm <tensor> |p|_2; final running stats; eval rel_error.",
             "cases " + " ".join(c[0] for c in CASES)]
    for i, (name, cfg, kind, mix, n, clip) in enumerate(CASES):
        write_case(lines, name, cfg, kind, mix, n, clip, args.steps, args.seed + i)
    path = os.path.join(ROOT, args.out)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
