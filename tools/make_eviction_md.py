#!/usr/bin/env python3
"""make_eviction_md.py - the tables and plots of docs/eviction.md from the CSVs that
`kvcodec eval --keep 'A;B;...' --csv FILE` wrote (copied into docs/eviction/).

Tables go between <!-- BEGIN:name --> and <!-- END:name --> markers of docs/eviction.md;
plots (gnuplot, PNG) into docs/eviction/. Standard library only.

    python3 tools/make_eviction_md.py            # rewrite the tables and plots
"""
import csv
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = os.path.join(ROOT, "docs", "eviction")
DOC = os.path.join(ROOT, "docs", "eviction.md")
F16 = 23040.0  # bytes per token of an f16 full cache (SmolLM2-135M)


def rows(name):
    """Rows of docs/eviction/NAME.csv (several files when NAME has a glob), in file order."""
    out = []
    for path in sorted(glob.glob(os.path.join(DIR, name + ".csv"))):
        with open(path, newline="") as f:
            out.extend(csv.DictReader(f))
    return out


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def short(keep):
    """The keep spec without the defaults that every row shares."""
    k = re.sub(r",?(rbits=32|rstore=int4|rprobe=mean|probe=query|score=sum|floor=0)(?=,|$)", "", keep)
    return k.replace(":,", ":").rstrip(",")


def ci(lo, hi, fmt):
    lo, hi = num(lo), num(hi)
    return "" if lo != lo else "[" + fmt % lo + ", " + fmt % hi + "]"


# The sections of docs/eviction.md that split one context run: (block, file, which keeps).
SECTIONS = [
    ("context-8", "context-8", lambda k: "retrieve=" not in k and "share=" not in k and not k.startswith("lsh")),
    ("shared-8", "context-8", lambda k: "share=" in k and not k.startswith("lsh")),
    ("lsh-8", "context-8", lambda k: k.startswith("lsh") and "retrieve=" not in k),
    ("retrieval-8", "context-8", lambda k: "retrieve=" in k),
    ("context-66", "context-66", lambda k: True),
]


def context_table(name, keep=lambda k: True):
    r = [x for x in rows(name) if keep(x["keep"])]
    if not r:
        return "(not measured yet)"
    out = ["| point (`--keep`) | kept | B/token | × smaller than f16 | side store B/token (RAM + disk) | ppl rise % [95% CI] | "
           "KL mean [95% CI] | KL p99 | top-1 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for x in r:
        side = ""
        if num(x["side_ram_bpt"]) > 0:
            side = "%.0f + %.0f" % (num(x["side_ram_bpt"]), num(x["side_disk_bpt"]))
        out.append("| `%s` | %.3f | %.0f | %.2f | %s | %+.2f %s | %.4f %s | %.3f | %.3f |" % (
            short(x["keep"]), num(x["kept_frac"]), num(x["bytes_per_token"]), num(x["ratio_vs_f16"]), side,
            num(x["rise_pct"]), ci(x["rise_lo"], x["rise_hi"], "%+.2f"), num(x["kl_mean"]),
            ci(x["kl_lo"], x["kl_hi"], "%.4f"), num(x["kl_p99"]), num(x["top1"])))
    n = r[0]
    out.append("")
    out.append("%s samples, %s scored tokens; N %s, M %s, prefill chunk %s." % (
        n["samples"], n["n_scored"], n["context_len"], n["continuation"], n["chunk"]))
    return "\n".join(out)


def by_length(field):
    """{length: (correct, trials)} from "1024:3/5;2048:1/5"."""
    d = {}
    for part in filter(None, (field or "").split(";")):
        length, frac = part.split(":")
        ok, tr = frac.split("/")
        d[int(length)] = (int(ok), int(tr))
    return d


def prompts_table(name, task):
    """Accuracy by length, one row per point; columns merged over the files of NAME."""
    r = rows(name)
    if not r:
        return "(not measured yet)", {}
    acc, full, lens = {}, {}, set()
    for x in r:
        k = short(x["keep"])
        for length, v in by_length(x[task + "_by_length"]).items():
            acc.setdefault(k, {})[length] = v
            lens.add(length)
        for length, v in by_length(x[task + "_full_by_length"]).items():
            full[length] = v
    lens = sorted(lens)
    out = ["| point (`--keep`) | " + " | ".join("%d tokens" % n for n in lens) + " |",
           "|---|" + "---|" * len(lens),
           "| *full cache (reference)* | " + " | ".join("%d/%d" % full[n] if n in full else "" for n in lens) + " |"]
    for k, d in acc.items():
        out.append("| `%s` | " % k + " | ".join("%d/%d" % d[n] if n in d else "" for n in lens) + " |")
    return "\n".join(out), {"lens": lens, "acc": acc, "full": full}


def gnuplot(script):
    try:
        subprocess.run(["gnuplot"], input=script.encode(), check=True, cwd=DIR)
        return True
    except (OSError, subprocess.CalledProcessError) as e:
        print("make_eviction_md: gnuplot failed: %s" % e, file=sys.stderr)
        return False


def plot_kl(name, title, ref=None):
    r = rows(name)
    if not r:
        return
    with open(os.path.join(DIR, name + "-kl.dat"), "w") as f:
        for i, x in enumerate(r):
            label = short(x["keep"]).replace("budget=0.25,", "").replace('"', "").replace("_", "\\_")
            f.write('%d %g %g %g "%s"\n' % (i, num(x["kl_mean"]), num(x["kl_lo"]), num(x["kl_hi"]), label))
    plot = "'%s-kl.dat' using 2:1:3:4:ytic(5) with xerrorbars pt 7 title 'point'" % name
    if ref is not None:
        plot += ", %g, t with lines dt 2 lw 2 title 'kvpress ObservedAttention, 8 samples (%g)'" % (ref, ref)
    gnuplot("""set terminal pngcairo size 1100,%d font ',9'
set output '%s-kl.png'
set title '%s'
set xlabel 'KL(P_full || P_cache) in nats: mean over scored tokens, 95%% bootstrap interval over samples'
set yrange [-1:%d]
set parametric
set trange [-1:%d]
set grid x
set key bottom right
plot %s
""" % (160 + 22 * len(r), name, title, len(r), len(r), plot))


def plot_prompts(name, data, title):
    if not data:
        return
    lens = data["lens"]
    dat = os.path.join(DIR, name + "-acc.dat")
    series = [("full cache", data["full"])] + list(data["acc"].items())
    with open(dat, "w") as f:
        for i, (label, d) in enumerate(series):
            f.write('# "%s"\n' % label)
            for n in lens:
                if n in d and d[n][1]:
                    f.write("%d %g\n" % (n, d[n][0] / d[n][1]))
            f.write("\n\n")
    plots = ", ".join("'%s-acc.dat' index %d using 1:2 with linespoints lw 2 title '%s'" % (
        name, i, label.replace("budget=0.25,", "").replace("_", "\\_")) for i, (label, _) in enumerate(series))
    gnuplot("""set terminal pngcairo size 1000,560 font ',9'
set output '%s-acc.png'
set title '%s'
set logscale x 2
set xlabel 'prompt length (tokens)'
set ylabel 'accuracy'
set yrange [-0.05:1.05]
set grid
set key outside right
plot %s
""" % (name, title, plots))


def replace_block(doc, name, body):
    pat = re.compile(r"(<!-- BEGIN:%s -->\n).*?(<!-- END:%s -->)" % (name, name), re.S)
    if not pat.search(doc):
        print("make_eviction_md: no %s block in docs/eviction.md" % name, file=sys.stderr)
        return doc
    return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), doc)


def main():
    with open(DOC) as f:
        doc = f.read()
    for block, name, keep in SECTIONS:
        doc = replace_block(doc, block, context_table(name, keep))
    t, pk = prompts_table("passkey-*", "passkey")
    doc = replace_block(doc, "passkey", t)
    t, fa = prompts_table("facts-*", "facts")
    doc = replace_block(doc, "facts", t)
    tmp = DOC + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, DOC)
    plot_kl("context-8", "Context protocol, 8 samples, chunk 32, 25% budget", 0.0299)
    plot_kl("context-66", "Context protocol, 66 samples, prefill in one chunk, 25% budget")
    plot_prompts("passkey", pk, "Passkey at 25% budget: 5 depths x 4 trials per length")
    plot_prompts("facts", fa, "Several facts (4 doors, one asked) at 25% budget")


if __name__ == "__main__":
    main()
