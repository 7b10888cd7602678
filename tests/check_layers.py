#!/usr/bin/env python3
"""check_layers.py - the layer rule of docs/architecture.md, checked on the source tree:
every folder may include headers of its own layer and the layers below it, never above;
train/ and eval/ sit side by side and include neither each other nor cli/. Public headers
(include/kvc/*.h) and private ones (internal/*.h) are assigned to the layer that implements
them. Exits 1 and lists every upward include it finds."""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = {"base": 0, "kernels": 1, "model": 2, "codec": 3, "data": 4, "train": 5, "eval": 5, "cli": 6}
HEADER = {
    "common.h": "base", "kernels.h": "kernels", "ops.h": "kernels", "quant.h": "kernels", "kvquant.h": "kernels",
    "lsh.h": "kernels", "backend.h": "kernels", "ops_cuda.h": "kernels",
    "gguf.h": "model", "tokenizer.h": "model", "model.h": "model", "cache.h": "model", "sampler.h": "model",
    "kvcache.h": "codec", "checkpoint.h": "codec", "tc.h": "codec", "aenet.h": "codec", "reuse.h": "codec", "codec.h": "codec", "sidestore.h": "codec",
    "dataset.h": "data",
    "ae.h": "train", "ae_cuda.h": "train", "reuse_fit.h": "train", "trainer.h": "train",
    "eval.h": "eval", "sweep.h": "eval",
    "internal/h5util.h": "base", "internal/cuda_check.h": "kernels",
}
INC = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def header_layer(inc):
    if inc.startswith("kvc/"):
        return HEADER.get(inc[4:])
    if inc.startswith("internal/"):
        return HEADER.get(inc)
    return None  # a header of the same folder


def main():
    bad, unknown, files = [], [], 0
    sources = []
    for folder in LAYER:
        for dp, _, fs in os.walk(os.path.join(ROOT, folder)):
            sources += [(folder, os.path.join(dp, f)) for f in fs if f.endswith((".c", ".h", ".cu"))]
    for f in sorted(os.listdir(os.path.join(ROOT, "include", "kvc"))):
        if f not in HEADER:
            unknown.append("include/kvc/" + f)
        else:
            sources.append((HEADER[f], os.path.join(ROOT, "include", "kvc", f)))
    for f in sorted(os.listdir(os.path.join(ROOT, "internal"))):
        sources.append((HEADER.get("internal/" + f, "base"), os.path.join(ROOT, "internal", f)))
    for folder, path in sources:
        files += 1
        text = open(path, encoding="utf-8").read()
        for inc in INC.findall(text):
            owner = header_layer(inc)
            if owner is None:
                if inc.startswith(("kvc/", "internal/")):
                    unknown.append("%s includes %s" % (os.path.relpath(path, ROOT), inc))
                elif "/" in inc:
                    bad.append("%s includes %s across folders by path" % (os.path.relpath(path, ROOT), inc))
                continue
            up = LAYER[owner] > LAYER[folder]
            side = {owner, folder} == {"train", "eval"}
            if up or side:
                bad.append("%s (%s) includes %s (%s)" % (os.path.relpath(path, ROOT), folder, inc, owner))
    for line in unknown:
        print("no layer assigned: " + line)
    for line in bad:
        print("upward include: " + line)
    print("check_layers: %d files, %d upward includes, %d unassigned" % (files, len(bad), len(unknown)))
    return 1 if bad or unknown else 0


if __name__ == "__main__":
    sys.exit(main())
