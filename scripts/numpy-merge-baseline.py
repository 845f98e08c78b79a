#!/usr/bin/env python3
"""The numpy column of docs/performance.md: the benchmark's merges written in plain numpy.

What a careful user would write without mergekit or torch: every input memory-mapped, one
tensor at a time decoded from bf16 to float32, merged with whole-array numpy operations, rounded
back to bf16 (to nearest even) and streamed into one safetensors file. It is a timing reference,
not a second implementation to test against (the tests compare with closed forms and float64
references); its outputs agree with `mergekit merge` to bf16 rounding for linear, task arithmetic,
TIES and SLERP (DARE draws its own random masks).

Usage (numpy only, e.g. in the venv of docs/performance.md):
  python3 scripts/numpy-merge-baseline.py METHOD OUT.safetensors --base DIR MODEL_DIR...
METHOD: linear, task-arithmetic, ties, dare-ties or slerp (t = 0.5, base and the first model);
density 0.5 for ties and dare-ties, as `make bench-merge`. Prints the wall time.
"""
import argparse
import glob
import json
import os
import struct
import time

import numpy as np


def tensors_of(folder):
    """name -> (memory map, first byte, end byte, dtype, shape) over a model folder's shards."""
    entries = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            entries[name] = (mapped, 8 + length + start, 8 + length + end, info["dtype"], info["shape"])
    return entries


def load(entry):
    mapped, start, end, dtype, shape = entry
    raw = mapped[start:end]
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return np.array(raw.view(np.float32))
    raise SystemExit(f"unsupported dtype {dtype}")


def to_bf16(values):
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


def ties(base, models, density, rng=None):
    deltas = []
    for model in models:
        delta = model - base
        n = delta.size
        if rng is None:
            # Exactly k entries: all above the k-th largest magnitude, then its ties in index order.
            k = max(int(density * n), 1)
            magnitude = np.abs(delta)
            threshold = np.partition(magnitude, n - k)[n - k]
            kept = magnitude > threshold
            kept[np.flatnonzero(magnitude == threshold)[: k - int(kept.sum())]] = True
            delta[~kept] = 0
        else:
            before = np.abs(delta).sum(dtype=np.float64)
            delta[rng.random(n, dtype=np.float32) >= density] = 0
            after = np.abs(delta).sum(dtype=np.float64)
            if before >= 1e-7 and after >= 1e-7:
                delta *= np.float32(before / after)
        deltas.append(delta)
    stacked = np.stack(deltas)
    sign = np.where(stacked.sum(axis=0) >= 0, np.float32(1), np.float32(-1))
    agree = np.sign(stacked) == sign
    mixed = np.where(agree, stacked, 0).sum(axis=0)
    if rng is None:
        mixed /= np.maximum(agree.sum(axis=0), 1)
    return base + mixed


def slerp(v0, v1, t):
    n0, n1 = np.linalg.norm(v0.astype(np.float64)), np.linalg.norm(v1.astype(np.float64))
    cosine = float(np.dot(v0.astype(np.float64), v1.astype(np.float64)) / (n0 or 1) / (n1 or 1))
    if abs(cosine) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(np.clip(cosine, -1, 1))
    s0, s1 = np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    return np.float32(s0) * v0 + np.float32(s1) * v1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["linear", "task-arithmetic", "ties", "dare-ties", "slerp"])
    parser.add_argument("output")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--base", required=True)
    arguments = parser.parse_args()
    start = time.time()
    base = tensors_of(arguments.base)
    models = [tensors_of(folder) for folder in arguments.models]
    if arguments.method == "slerp":
        models = models[:1]
    names = sorted(base)
    header, offset = {}, 0
    for name in names:
        size = 2 * int(np.prod(base[name][4]))
        header[name] = {"dtype": "BF16", "shape": base[name][4], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(0)
    with open(arguments.output, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            b = load(base[name])
            values = [load(model[name]) for model in models]
            if arguments.method == "linear":
                merged = sum(values) / np.float32(len(values))
            elif arguments.method == "task-arithmetic":
                merged = b + sum(v - b for v in values)
            elif arguments.method == "ties":
                merged = ties(b, values, 0.5)
            elif arguments.method == "dare-ties":
                merged = ties(b, values, 0.5, rng)
            else:
                merged = slerp(b, values[0], 0.5)
            out.write(to_bf16(merged).tobytes())
    print(f"{arguments.method}: {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()
