#!/usr/bin/env python3
"""Writes tests/fixtures/codec_kv_l4l5_32tok.f32: the real pre-RoPE keys and values of layers
4 and 5 of the default model over the first 32 tokens of the eval corpus, as raw little-endian
f32 in the order [L4 K, L4 V, L5 K, L5 V], each (32 tokens, 3 kv heads, 64). The codec
library test (tests/test_codec_lib.c) encodes and decodes them through include/kvc/codec.h
only. Layer 5 head 0's keys are reused from layer 4 in the committed ae32 codec, so the
fixture also exercises decoding from the layer below. Needs build/kvcodec, the model and h5py.

    python3 tools/make_codec_fixture.py [--bin build/kvcodec]
"""
import argparse
import os
import subprocess
import tempfile

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "kvcodec"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "codec_kv_l4l5_32tok.f32"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        h5 = os.path.join(td, "kv.h5")
        subprocess.run([a.bin, "capture", "--text", os.path.join(ROOT, "data/corpora/eval-debian-handbook.txt"),
                        "--tokens", "32", "--layers", "4,5", "--dtype", "f32", "--out", h5], check=True)
        parts = []
        with h5py.File(h5, "r") as f:
            for layer in (4, 5):
                for kind in ("k", "v"):
                    x = np.asarray(f[f"layer_{layer:02d}/{kind}"][:], dtype="<f4").reshape(32, 3, 64)
                    parts.append(x)
    np.concatenate([p.ravel() for p in parts]).astype("<f4").tofile(a.out)
    print(f"wrote {a.out}: {sum(p.size for p in parts)} floats")


if __name__ == "__main__":
    main()
