"""Shared pieces of the peer benchmarks (kvpress, llama.cpp): the context-compression protocol's
samples, the quality metrics against the full cache, and the CSV/JSON rows with the columns
kvcodec's own measurements use, so peers and kvcodec land in one table.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# SmolLM2-135M: layers, KV heads, head dim; an f16 full cache is 2 (K and V) * L * K * D * 2 bytes.
N_LAYERS, N_KV_HEADS, HEAD_DIM = 30, 3, 64
F16_BYTES_PER_TOKEN = 2 * N_LAYERS * N_KV_HEADS * HEAD_DIM * 2

COLUMNS = ("tool,method,repr,keep,budget,latent,protocol,model,corpus,ctx,context_len,continuation,"
           "samples,n_scored,nll,ppl,ppl_full,ppl_rise_pct,kl_mean,kl_p99,top1,kept_frac,removed_frac,"
           "bytes_per_token,ratio_vs_f16,passkey_acc,tokens_per_s,seconds,rise_lo,rise_hi,kl_lo,kl_hi").split(",")


def add_common_args(p, budgets_default):
    """Adds the options both peers share to an argparse parser; returns the parser."""
    p.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--text", default=os.path.join(ROOT, "data", "corpora", "eval-debian-handbook.txt"))
    p.add_argument("--context-len", type=int, default=512, help="N context tokens per sample")
    p.add_argument("--continuation", type=int, default=64, help="M continuation tokens per sample")
    p.add_argument("--samples", type=int, default=8, help="S samples (consecutive segments of N+M tokens)")
    p.add_argument("--budgets", default=budgets_default, help="kept fractions of the context, comma-separated")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "peers"), help="folder for the CSV and JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kvcodec", default=os.path.join(ROOT, "build", "kvcodec"),
                   help="kvcodec binary whose tokenizer gives the token ids")
    return p


def parse_budgets(s):
    """Parses '0.5,0.25' into floats in (0, 1]; exits with a message on a bad value."""
    out = []
    for tok in s.split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            b = float(tok)
        except ValueError:
            sys.exit(f"--budgets: '{tok}' is not a number")
        if not 0 < b <= 1:
            sys.exit(f"--budgets: {b} is not a kept fraction in (0, 1]")
        out.append(b)
    return out


def token_ids(args):
    """Token ids of --text from kvcodec's own tokenizer (no BOS), so every tool sees the same ids.

    Returns a list of ints; exits with a message when the binary is missing or fails.
    """
    if not os.path.exists(args.kvcodec):
        sys.exit(f"{args.kvcodec} not found: run `bash scripts/setup.sh` once (it builds kvcodec)")
    cmd = [args.kvcodec, "tokenize", "--model", args.model, "--text", args.text]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kvcodec tokenize failed: {r.stderr.strip()}")
    return [int(x) for x in r.stdout.split()]


def make_samples(ids, n, m, s):
    """Cuts ids into at most s consecutive non-overlapping (context, continuation) pairs of n and m
    tokens, starting at token 0. Returns a list of (list, list); exits if not even one fits."""
    out = []
    for i in range(s):
        a = i * (n + m)
        if a + n + m > len(ids):
            break
        out.append((ids[a:a + n], ids[a + n:a + n + m]))
    if not out:
        sys.exit(f"the text has {len(ids)} tokens: too few for one sample of {n}+{m}")
    return out


def log_softmax64(logits):
    """Row-wise log-softmax in float64 of a (T, V) array; returns (T, V) float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


class Scores:
    """Per-token quality of one method against the full cache, accumulated over samples."""

    def __init__(self):
        self.nll, self.nll_full, self.kl, self.agree = [], [], [], []
        self.units = []  # scored predictions of each add() call (one sample), for the bootstrap

    def add(self, lp, lp_full, targets):
        """Adds T scored predictions: lp and lp_full are (T, V) log-probs of the measured and full
        runs at the same positions, targets the (T,) next tokens. Changes the running lists."""
        t = np.asarray(targets)
        r = np.arange(len(t))
        self.nll.extend((-lp[r, t]).tolist())
        self.nll_full.extend((-lp_full[r, t]).tolist())
        kl = (np.exp(lp_full) * (lp_full - lp)).sum(axis=1)
        self.kl.extend(np.maximum(kl, 0.0).tolist())  # rounding can give -1e-17
        self.agree.extend((lp.argmax(axis=1) == lp_full.argmax(axis=1)).tolist())
        self.units.append(len(t))

    def bootstrap(self, resamples=2000, seed=0x5eedb007):
        """95% percentile intervals of the perplexity rise (%) and the mean KL over samples, as
        kvcodec's eval computes them (resampling whole samples with replacement, fixed seed).
        Returns (rise_lo, rise_hi, kl_lo, kl_hi), or empty strings with fewer than 2 samples."""
        u = len(self.units)
        if u < 2:
            return "", "", "", ""
        edges = np.cumsum([0] + self.units)
        d = np.asarray(self.nll) - np.asarray(self.nll_full)
        kl = np.asarray(self.kl)
        sd = np.array([d[edges[i]:edges[i + 1]].sum() for i in range(u)])
        sk = np.array([kl[edges[i]:edges[i + 1]].sum() for i in range(u)])
        n = np.asarray(self.units, dtype=float)
        pick = np.random.default_rng(seed).integers(0, u, size=(resamples, u))
        nn = n[pick].sum(axis=1)
        rise = 100.0 * (np.exp(sd[pick].sum(axis=1) / nn) - 1.0)
        klm = sk[pick].sum(axis=1) / nn
        return (float(np.percentile(rise, 2.5)), float(np.percentile(rise, 97.5)),
                float(np.percentile(klm, 2.5)), float(np.percentile(klm, 97.5)))

    def summary(self):
        """Returns a dict of n_scored, nll, ppl, ppl_full, ppl_rise_pct, kl_mean, kl_p99 (linear
        interpolation between order statistics, as kvcodec's eval does) and top1."""
        nll, nll_full = float(np.mean(self.nll)), float(np.mean(self.nll_full))
        ppl, ppl_full = math.exp(nll), math.exp(nll_full)
        rise_lo, rise_hi, kl_lo, kl_hi = self.bootstrap()
        return dict(n_scored=len(self.nll), nll=nll, ppl=ppl, ppl_full=ppl_full,
                    ppl_rise_pct=100.0 * (ppl / ppl_full - 1.0), kl_mean=float(np.mean(self.kl)),
                    kl_p99=float(np.percentile(self.kl, 99)), top1=float(np.mean(self.agree)),
                    rise_lo=rise_lo, rise_hi=rise_hi, kl_lo=kl_lo, kl_hi=kl_hi)


def base_row(args, tool, n_samples):
    """A row with the settings columns filled and every measured column empty."""
    row = {c: "" for c in COLUMNS}
    row.update(tool=tool, protocol="context", model=os.path.basename(args.model),
               corpus=os.path.basename(args.text), context_len=args.context_len,
               continuation=args.continuation, samples=n_samples)
    return row


def fmt(v):
    """Formats a cell: floats with 6 significant digits, everything else as str."""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_rows(rows, out_dir, stem):
    """Writes rows to OUT/stem.csv and OUT/stem.json (a list of objects, empty cells as null);
    returns the CSV path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([fmt(r[c]) for c in COLUMNS])
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump([{c: (None if r[c] == "" else r[c]) for c in COLUMNS} for r in rows], f, indent=1)
        f.write("\n")
    return path


def print_table(rows):
    """Prints the rows as an aligned table on stdout."""
    print(f"{'method':28} {'keep':>6} {'removed':>7} {'ppl':>8} {'ppl_full':>8} {'rise%':>7} "
          f"{'KL':>8} {'KLp99':>7} {'top1':>6} {'B/tok':>8} {'x f16':>6} {'s':>6}")
    for r in rows:
        print(f"{r['method']:28} {r['kept_frac']:6.3f} {r['removed_frac']:7.3f} {r['ppl']:8.3f} "
              f"{r['ppl_full']:8.3f} {r['ppl_rise_pct']:7.2f} {r['kl_mean']:8.4f} {r['kl_p99']:7.3f} "
              f"{r['top1']:6.3f} {r['bytes_per_token']:8.1f} {r['ratio_vs_f16']:6.2f} {r['seconds']:6.1f}")


def parser(description, budgets_default):
    """An argparse parser with the shared options and the given description."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_common_args(p, budgets_default)
