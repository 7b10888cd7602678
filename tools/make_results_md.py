#!/usr/bin/env python3
"""Fills the generated blocks of docs/results.md from sweep results folders and the peer CSVs,
and copies the plots into docs/results/. The prose around the blocks is written by hand; each
block sits between <!-- BEGIN:name --> and <!-- END:name --> and is replaced on every run.

    python3 tools/make_results_md.py [--context out/results/context] [--stream out/results/stream]
        [--passkey out/results/passkey] [--peers docs/peers/kvpress.csv,docs/peers/llamacpp.csv]

Blocks: context (our rows, context-compression protocol), peers (the peer tools, same
protocol), stream (streaming perplexity), passkey (accuracy by method and length), aims (the
issue's two targets, checked against the rows).
"""
import argparse
import csv
import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(r, k):
    try:
        return float(r.get(k, ""))
    except ValueError:
        return float("nan")


def fmt(x, spec):
    return "—" if x != x else format(x, spec)


def spec_of(r):
    """The point as the user would type it: --repr R --keep K."""
    return f"`{r['repr']}` / `{r['keep']}`"


def quality_table(rows, with_spec=True):
    head = ("| method | kept | removed | B/token | × smaller than f16 | ppl | ppl rise | KL mean | KL p99 | top-1 |"
            + (" point (--repr / --keep) |" if with_spec else ""))
    sep = "|---" * (10 + (1 if with_spec else 0)) + "|"
    out = [head, sep]
    for r in rows:
        out.append(
            "| {m} | {k} | {rm} | {b} | {x} | {p} | {rise} | {kl} | {kl99} | {t} |{s}".format(
                m=r["method"], k=fmt(num(r, "kept_frac"), ".3f"), rm=fmt(num(r, "removed_frac"), ".3f"),
                b=fmt(num(r, "bytes_per_token"), ".0f"), x=fmt(num(r, "ratio_vs_f16"), ".2f"),
                p=fmt(num(r, "ppl"), ".3f"), rise=fmt(num(r, "ppl_rise_pct"), "+.2f") + "%",
                kl=fmt(num(r, "kl_mean"), ".4f"), kl99=fmt(num(r, "kl_p99"), ".3f"), t=fmt(num(r, "top1"), ".3f"),
                s=(" " + spec_of(r) + " |") if with_spec else ""))
    return "\n".join(out)


def passkey_table(rows, cells_path):
    cells = read_rows(cells_path)
    by_key = {}
    for c in cells:
        by_key.setdefault(c["key"], []).append(c)
    lengths = sorted({int(c["length"]) for c in cells})
    head = "| method | kept | B/token | accuracy | " + " | ".join(f"{n} tokens" for n in lengths) + " | point |"
    out = [head, "|---" * (5 + len(lengths)) + "|"]
    full_line = None
    for r in rows:
        key = f"{r['protocol']} repr={r['repr']} keep={r['keep']}"
        cs = by_key.get(key, [])
        per_len = []
        for n in lengths:
            sel = [c for c in cs if int(c["length"]) == n and c["skipped"] == "0"]
            ok, tr = sum(int(c["correct"]) for c in sel), sum(int(c["trials"]) for c in sel)
            per_len.append(f"{ok}/{tr}" if tr else "—")
            if full_line is None and sel:
                pass
        out.append(f"| {r['method']} | {fmt(num(r, 'kept_frac'), '.3f')} | {fmt(num(r, 'bytes_per_token'), '.0f')} | "
                   f"{fmt(num(r, 'passkey_acc'), '.3f')} | " + " | ".join(per_len) + f" | {spec_of(r)} |")
    # the full-precision reference's answers (recorded with the first point)
    if cells:
        ref = []
        first = by_key.get(next(iter(by_key)), [])
        for n in lengths:
            sel = [c for c in first if int(c["length"]) == n and c["skipped"] == "0"]
            ok, tr = sum(int(c["correct_full"]) for c in sel), sum(int(c["trials"]) for c in sel)
            ref.append(f"{ok}/{tr}" if tr else "—")
        out.append("| *f32 full reference* | 1 | 46080 | — | " + " | ".join(ref) + " | reference cache |")
    return "\n".join(out)


def aims(ctx_rows, pk_rows, stream_rows):
    lines = []
    ok = [r for r in ctx_rows if num(r, "ratio_vs_f16") >= 4.0 and num(r, "ppl_rise_pct") <= 2.0]
    best = sorted([r for r in ctx_rows if num(r, "ratio_vs_f16") >= 4.0], key=lambda r: num(r, "ppl_rise_pct"))
    if ok:
        r = min(ok, key=lambda r: num(r, "ppl_rise_pct"))
        lines.append(f"- **≥ 4× smaller for ≤ 2% perplexity rise (context protocol): met** by {r['method']} at kept "
                     f"{num(r, 'kept_frac'):.3f}: {num(r, 'ratio_vs_f16'):.2f}× smaller, {num(r, 'ppl_rise_pct'):+.2f}% "
                     f"perplexity, KL {num(r, 'kl_mean'):.4f} ({len(ok)} point(s) qualify).")
    elif best:
        r = best[0]
        lines.append(f"- **≥ 4× smaller for ≤ 2% perplexity rise (context protocol): missed.** The best point at ≥ 4× "
                     f"is {r['method']} (kept {num(r, 'kept_frac'):.3f}): {num(r, 'ratio_vs_f16'):.2f}×, "
                     f"{num(r, 'ppl_rise_pct'):+.2f}%.")
    def at(rows, keep):
        for r in rows:
            if r["repr"] == "f16" and r["keep"] == keep:
                return r
        return None
    lsh_default = "lsh:budget=0.25,sinks=4,window=10,bits=16,probe=query,score=sum"
    for name, rows, col, better in (("context perplexity", ctx_rows, "ppl_rise_pct", min),
                                    ("stream perplexity", stream_rows, "ppl_rise_pct", min),
                                    ("passkey accuracy", pk_rows, "passkey_acc", max)):
        l = at(rows, lsh_default)
        s = at(rows, "streaming:budget=0.25,sinks=4,window=10")
        rd = at(rows, "random:budget=0.25,sinks=4,window=10,seed=1")
        if not (l and s and rd):
            continue
        vals = {"LSH-E": num(l, col), "StreamingLLM": num(s, col), "random": num(rd, col)}
        best_other = better(vals["StreamingLLM"], vals["random"])
        ahead = vals["LSH-E"] < best_other if better is min else vals["LSH-E"] > best_other
        unit = "%" if col == "ppl_rise_pct" else ""
        txt = ", ".join(f"{k} {v:+.2f}{unit}" if unit else f"{k} {v:.3f}" for k, v in vals.items())
        lines.append(f"- LSH-E (16 bits, the defaults) at a 25% budget, {name}: {txt} — "
                     + ("**ahead of both**." if ahead else "**not ahead of both**."))
    return "\n".join(lines)


# The curves of the focused plots: (label, predicate on a row), ours solid, peers dashed.
FOCUS = [
    ("f16 + StreamingLLM", lambda r: r["repr"] == "f16" and r["keep"].startswith("streaming:")),
    ("f16 + H2O", lambda r: r["repr"] == "f16" and r["keep"].startswith("h2o:")),
    ("f16 + L2-norm", lambda r: r["repr"] == "f16" and r["keep"].startswith("l2:")),
    ("f16 + random", lambda r: r["repr"] == "f16" and r["keep"].startswith("random:")),
    ("f16 + LSH-E (16 bits, sum)", lambda r: r["repr"] == "f16" and r["keep"].endswith("bits=16,probe=query,score=sum")),
    ("f16 + LSH-E (16 bits, current)", lambda r: r["repr"] == "f16" and r["keep"].endswith("bits=16,probe=query,score=current")),
    ("KIVI int8 / int4 / int4 g64", lambda r: r["keep"] == "full" and r["repr"].startswith("int")),
    ("int4 g64 + H2O / LSH-E 75%", lambda r: r["repr"].startswith("int4:group=64") and r["keep"] != "full"
     and "score=current" not in r["keep"]),
    ("codec ae32/ae16 int8 (+ int4 values)", lambda r: r["repr"].startswith("ae:") and r["keep"] == "full" and "int8" in r["repr"]),
]
PEER_FOCUS = ["kvpress-streaming", "kvpress-snapkv", "kvpress-observed", "kvpress-knorm", "kvpress-tova",
              "kvpress-expected", "llama.cpp-f16", "llama.cpp-q8_0", "llama.cpp-q4_0"]


def focus_plot(ctx, peers, col, ylabel, yrange, out_png, title):
    """A gnuplot of col against bytes per token for the focused curves; returns 0 or 1."""
    if not shutil.which("gnuplot") or not ctx:
        return 1
    d = os.path.dirname(out_png)
    series = []
    for label, pred in FOCUS:
        pts = sorted((num(r, "bytes_per_token"), num(r, col)) for r in ctx if pred(r))
        if pts:
            series.append((label, pts, False))
    for name in PEER_FOCUS:
        pts = sorted((num(r, "bytes_per_token"), num(r, col)) for r in peers if r["method"] == name)
        if pts:
            series.append((name, pts, True))
    dat = out_png[:-4] + ".dat"
    with open(dat, "w") as f:
        for label, pts, _ in series:
            f.write(f"# {label}\n")
            for x, y in pts:
                f.write(f"{x} {y}\n")
            f.write("\n\n")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#7f7f7f", "#ff7f0e", "#9467bd", "#000000", "#17becf", "#8c564b",
               "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
    plots = []
    for i, (label, _, dashed) in enumerate(series):
        style = f"lp dt {2 if dashed else 1} pt {6 if dashed else 7} ps 1.1 lw 2 lc rgb '{colours[i % len(colours)]}'"
        plots.append(f"'{os.path.basename(dat)}' index {i} using 1:2 with {style} title '{label}'")
    gp = out_png[:-4] + ".gp"
    with open(gp, "w") as f:
        f.write("set terminal pngcairo size 1100,700 font ',10' noenhanced\n")
        f.write(f"set output '{os.path.basename(out_png)}'\n")
        f.write(f"set title '{title}'\nset logscale x 2\nset xrange [2000:30000]\nset yrange [{yrange}]\n")
        f.write("set xlabel 'KV bytes per token (log scale; f16 full cache = 23040)'\n")
        f.write(f"set ylabel '{ylabel}'\nset grid\nset key outside right top\n")
        f.write("plot " + ", \\\n     ".join(plots) + "\n")
    return os.system(f"cd '{d}' && gnuplot '{os.path.basename(gp)}'")


def replace_block(text, name, body):
    pat = re.compile(rf"(<!-- BEGIN:{name} -->\n).*?(<!-- END:{name} -->)", re.S)
    if not pat.search(text):
        raise SystemExit(f"docs/results.md has no block {name}")
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default=os.path.join(ROOT, "out/results/context"))
    ap.add_argument("--stream", default=os.path.join(ROOT, "out/results/stream"))
    ap.add_argument("--passkey", default=os.path.join(ROOT, "out/results/passkey"))
    ap.add_argument("--peers", default="docs/peers/kvpress.csv,docs/peers/llamacpp.csv")
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs/results.md"))
    a = ap.parse_args()
    ctx = read_rows(os.path.join(a.context, "results.csv"))
    stream = read_rows(os.path.join(a.stream, "results.csv"))
    pk = read_rows(os.path.join(a.passkey, "results.csv"))
    peers = []
    for p in a.peers.split(","):
        peers += read_rows(os.path.join(ROOT, p) if not os.path.isabs(p) else p)
    text = open(a.doc).read()
    text = replace_block(text, "context", quality_table(ctx))
    text = replace_block(text, "peers", quality_table(peers, with_spec=False))
    text = replace_block(text, "stream", quality_table(stream))
    text = replace_block(text, "passkey", passkey_table(pk, os.path.join(a.passkey, "passkey.csv")))
    text = replace_block(text, "aims", aims(ctx, pk, stream))
    with open(a.doc + ".tmp", "w") as f:
        f.write(text)
    os.replace(a.doc + ".tmp", a.doc)
    out = os.path.join(ROOT, "docs/results")
    os.makedirs(out, exist_ok=True)
    for src, dst in ((os.path.join(a.context, "pareto.png"), "pareto-context.png"),
                     (os.path.join(a.stream, "pareto.png"), "pareto-stream.png")):
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, dst))
    focus_plot(ctx, peers, "ppl_rise_pct", "perplexity rise vs the full cache (%)", "-2:30",
               os.path.join(out, "focus-context-ppl.png"), "Context compression: perplexity rise against KV bytes")
    focus_plot(ctx, peers, "kl_mean", "KL(P_full || P_cache), nats, mean", "0:0.3",
               os.path.join(out, "focus-context-kl.png"), "Context compression: KL to the full cache against KV bytes")
    for f in sorted(os.listdir(a.passkey)) if os.path.isdir(a.passkey) else []:
        if f.startswith("passkey_") and f.endswith(".png"):
            shutil.copyfile(os.path.join(a.passkey, f), os.path.join(out, f))
    for d, name in ((a.context, "context"), (a.stream, "stream"), (a.passkey, "passkey")):
        for f in ("results.csv", "results.json", "passkey.csv", "config.txt"):
            if os.path.exists(os.path.join(d, f)):
                shutil.copyfile(os.path.join(d, f), os.path.join(out, f"{name}-{f}"))
    print(f"updated {a.doc} and {out}/")


if __name__ == "__main__":
    main()
