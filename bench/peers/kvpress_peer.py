#!/usr/bin/env python3
"""NVIDIA kvpress presses on the same GGUF and the same token ids as kvcodec, measured with the
context-compression protocol of DESIGN.md §5 against the full cache in the same tool.

Protocol (per sample of N context + M continuation tokens, consecutive segments from token 0, no
BOS): prefill the N context tokens under the press (kvpress compresses each layer's cache in a
forward hook right after that layer's prefill attention, so the prefill itself is exact), then feed
the M continuation tokens in one call without the press, at their true positions N..N+M-1, and
score the M-1 predictions of continuation tokens 1..M-1 against the full cache's.

Install: pip install --no-deps kvpress==0.5.5 && pip install 'cachetools>=5.5.2,<6' 'fire>=0.6,<0.7' datasets
Usage:   python3 bench/peers/kvpress_peer.py [--presses streaming,snapkv,...] [--budgets 0.5,0.25,0.125]
                                             [--samples 8] [--threads 2] [--out out/peers] [--self-check]
"""
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

KVPRESS_VERSION = "0.5.5"

# name -> (kvpress class name, extra constructor arguments, needs eager attention)
PRESSES = {
    "streaming": ("StreamingLLMPress", {}, False),
    "snapkv": ("SnapKVPress", {}, False),
    "knorm": ("KnormPress", {}, False),
    "expected": ("ExpectedAttentionPress", {}, False),
    "tova": ("TOVAPress", {}, False),
    "random": ("RandomPress", {"seed": 0}, False),
    "observed": ("ObservedAttentionPress", {}, True),
    "keydiff": ("KeyDiffPress", {}, False),
    "lagkv": ("LagKVPress", {}, False),
    "pyramidkv": ("PyramidKVPress", {}, False),
}
DEFAULT_PRESSES = "streaming,snapkv,knorm,expected,tova,random,observed"


def import_peer():
    """Imports torch, transformers and kvpress; returns the three modules, or None after printing
    one line saying what to install."""
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"torch/transformers not installed ({e.name}): pip install torch transformers gguf; skipped")
        return None
    try:
        import kvpress
    except ImportError as e:
        print(f"kvpress not installed ({e.name}): pip install --no-deps kvpress=={KVPRESS_VERSION} "
              f"&& pip install 'cachetools>=5.5.2,<6' 'fire>=0.6,<0.7' datasets; skipped")
        return None
    return torch, transformers, kvpress


def load_model(torch, transformers, path):
    """Loads the GGUF with transformers, de-quantised to f32 on the CPU, in eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), dtype=torch.float32)
    model.eval()
    return model


def run_sample(torch, transformers, model, ctx, cont, press=None):
    """Prefills ctx (under press when given), then feeds cont at positions N..N+M-1 with the
    press off. Returns ((M-1, V) float64 log-probs predicting cont[1:], the mean kept fraction of
    the context over layers, seconds spent in the forward passes)."""
    n, m = len(ctx), len(cont)
    cache = transformers.DynamicCache()
    t0 = time.perf_counter()
    with torch.no_grad():
        ids = torch.tensor([ctx])
        # kvpress 0.5.5 reads kwargs["cache_position"] in its hook to tell prefill from decoding;
        # transformers >= 5.3 no longer passes it to the attention layers, so we hand it down
        # ourselves (it rides **kwargs to the hook; the attention functions ignore it).
        cpos = torch.arange(n)
        if press is None:
            model.model(input_ids=ids, past_key_values=cache, cache_position=cpos)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache, cache_position=cpos)
        kept = float(np.mean([cache.get_seq_length(li) for li in range(len(cache))])) / n
        pos = torch.arange(n, n + m).unsqueeze(0)
        out = model(input_ids=torch.tensor([cont]), past_key_values=cache, position_ids=pos)
    secs = time.perf_counter() - t0
    return pc.log_softmax64(out.logits[0, :m - 1].float().numpy()), kept, secs


def set_attn(model, eager):
    """Switches the model between eager attention (which hands attention weights to the hooks, as
    ObservedAttentionPress needs) and SDPA. Changes the model."""
    want = "eager" if eager else "sdpa"
    if model.config._attn_implementation != want:
        model.set_attn_implementation(want)


def self_check(torch, transformers, kvpress, model, ctx, cont):
    """Checks the harness on one sample: (1) prefill-then-continuation equals one forward over
    N+M tokens (max |log-prob| difference on the scored rows); (2) a press removing nothing keeps
    every token and gives KL 0; (3) the continuation over a compressed cache stays causal: changing
    its last token leaves the scored rows unchanged (the mask follows the compressed length, the
    positions the true ones). Prints the numbers; returns True when all three hold."""
    lp_full, _, _ = run_sample(torch, transformers, model, ctx, cont)
    with torch.no_grad():
        whole = model(input_ids=torch.tensor([ctx + cont])).logits[0]
    n, m = len(ctx), len(cont)
    lp_whole = pc.log_softmax64(whole[n:n + m - 1].float().numpy())
    d1 = float(np.abs(lp_whole - lp_full).max())
    s = pc.Scores()
    lp0, kept0, _ = run_sample(torch, transformers, model, ctx, cont, kvpress.KnormPress(compression_ratio=0.0))
    s.add(lp0, lp_full, cont[1:])
    kl0 = s.summary()["kl_mean"]
    press = kvpress.StreamingLLMPress(compression_ratio=0.5)
    lpa, kepta, _ = run_sample(torch, transformers, model, ctx, cont, press)
    lpb, _, _ = run_sample(torch, transformers, model, ctx, cont[:-1] + [(cont[-1] + 1) % 49152], press)
    d3 = float(np.abs(lpa - lpb).max())
    print(f"self-check: (1) split vs whole forward max |dlogp| = {d1:.2e} (< 1e-3); (2) knorm ratio 0: "
          f"kept {kept0:.3f}, KL {kl0:.2e} (< 1e-9); (3) streaming keep {kepta:.3f}: scored rows move by "
          f"{d3:.2e} when the last continuation token changes (< 1e-6)")
    return d1 < 1e-3 and kl0 < 1e-9 and kept0 == 1.0 and d3 < 1e-6


def main():
    """Runs the reference and every press x budget on each sample; writes OUT/kvpress.{csv,json}."""
    p = pc.parser(__doc__, "0.5,0.25,0.125")
    p.add_argument("--presses", default=DEFAULT_PRESSES,
                   help=f"comma-separated, from: {','.join(PRESSES)} [{DEFAULT_PRESSES}]")
    p.add_argument("--self-check", action="store_true", help="check the harness on one sample first")
    args = p.parse_args()
    budgets = pc.parse_budgets(args.budgets)
    names = [x.strip() for x in args.presses.split(",") if x.strip()]
    for nm in names:
        if nm not in PRESSES:
            sys.exit(f"--presses: unknown press '{nm}' (known: {', '.join(PRESSES)})")
    mods = import_peer()
    if mods is None:
        return 0
    torch, transformers, kvpress = mods
    transformers.logging.set_verbosity_error()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    ids = pc.token_ids(args)
    samples = pc.make_samples(ids, args.context_len, args.continuation, args.samples)
    t_load = time.perf_counter()
    model = load_model(torch, transformers, args.model)
    print(f"model loaded in {time.perf_counter() - t_load:.1f} s (f32, {args.threads} threads); "
          f"{len(samples)} samples of {args.context_len}+{args.continuation} tokens; "
          f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else KVPRESS_VERSION}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    if args.self_check and not self_check(torch, transformers, kvpress, model, *samples[0]):
        sys.exit("self-check failed")

    configs = [("full", 1.0)] + [(nm, b) for nm in names for b in budgets]
    acc = {c: dict(scores=pc.Scores(), kept=[], secs=0.0, failed=None) for c in configs}
    for si, (ctx, cont) in enumerate(samples):
        set_attn(model, False)
        lp_full, _, secs = run_sample(torch, transformers, model, ctx, cont)
        full = acc[("full", 1.0)]
        full["scores"].add(lp_full, lp_full, cont[1:])
        full["kept"].append(1.0)
        full["secs"] += secs
        for c in configs[1:]:
            a = acc[c]
            if a["failed"]:
                continue
            cls, extra, eager = PRESSES[c[0]]
            try:
                press = getattr(kvpress, cls)(compression_ratio=1.0 - c[1], **extra)
                set_attn(model, eager)
                lp, kept, secs = run_sample(torch, transformers, model, ctx, cont, press)
            except Exception as e:  # a press that does not apply to this model: say so, go on
                a["failed"] = f"{type(e).__name__}: {e}"
                print(f"press {c[0]} at keep {c[1]} failed: {a['failed']}; skipped", flush=True)
                continue
            a["scores"].add(lp, lp_full, cont[1:])
            a["kept"].append(kept)
            a["secs"] += secs
        print(f"sample {si + 1}/{len(samples)} done", flush=True)

    rows = []
    for (nm, b), a in acc.items():
        if a["failed"] or not a["kept"]:
            continue
        row = pc.base_row(args, "kvpress", len(samples))
        kept = float(np.mean(a["kept"]))
        bpt = kept * pc.F16_BYTES_PER_TOKEN  # an f16 cache of the kept tokens (the run itself is f32)
        row.update(method=f"kvpress-{nm}", repr="f32", keep=nm, budget=b, kept_frac=kept,
                   removed_frac=1.0 - kept, bytes_per_token=bpt, ratio_vs_f16=pc.F16_BYTES_PER_TOKEN / bpt,
                   tokens_per_s=len(a["kept"]) * (args.context_len + args.continuation) / a["secs"],
                   seconds=a["secs"])
        row.update(a["scores"].summary())
        rows.append(row)
    path = pc.write_rows(rows, args.out, "kvpress")
    pc.print_table(rows)
    print(f"wrote {path} and {path[:-4]}.json (kvpress compression_ratio = removed_frac)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
