#!/usr/bin/env python3
"""Runs the same merge configurations through Python mergekit and mergekit-swift and compares.

A developer check, not part of the test suite (mergekit pulls torch, several GB). Set up once:

    python3 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple torch
    /tmp/mkvenv/bin/pip install mergekit

then, after `swift build -c release`:

    /tmp/mkvenv/bin/python scripts/compare-with-mergekit.py [--work DIR]

It writes the example models in float32 (so that the comparison is not hidden by bf16 rounding),
runs each method both ways on one mergekit YAML, and prints per method the largest difference
relative to the tensor's largest magnitude and the count of elements that differ by more than
f32 rounding. DARE draws random numbers differently in each tool and is left out.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIFT = os.path.join(ROOT, ".build", "release", "mergekit")

METHODS = {
    "linear": ("linear", False, {"weight": [0.6, 0.4]}, {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", True, {"weight": [1.0, 0.7]}, {"lambda": 0.8}),
    "ties": ("ties", True, {"weight": [0.5, 0.5], "density": [0.5, 0.5]}, {"normalize": True}),
    "breadcrumbs": ("breadcrumbs", True, {"weight": [1.0, 0.8], "density": [0.6, 0.6], "gamma": [0.05, 0.05]}, {}),
    "slerp": ("slerp", True, {}, {"t": 0.3}),
    "model_stock": ("model_stock", True, {}, {}),
}


def config(method, base, models, work):
    name, uses_base, per_model, glob = METHODS[method]
    lines = []
    if method == "slerp":
        lines += ["models:", f"  - model: {base}", f"  - model: {models[0]}"]
    else:
        lines.append("models:")
        for i, m in enumerate(models):
            lines.append(f"  - model: {m}")
            if per_model:
                lines.append("    parameters:")
                for k, values in per_model.items():
                    lines.append(f"      {k}: {values[i]}")
    lines.append(f"merge_method: {name}")
    if uses_base:
        lines.append(f"base_model: {base}")
    if glob:
        lines.append("parameters:")
        for k, v in glob.items():
            lines.append(f"  {k}: {str(v).lower() if isinstance(v, bool) else v}")
    lines.append("dtype: float32")
    path = os.path.join(work, f"{method}.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/mergekit-compare")
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    subprocess.run([SWIFT, "example", f"{work}/bf16"], check=True, stdout=subprocess.DEVNULL)
    for model in ["base", "finetune-a", "finetune-b"]:
        subprocess.run([SWIFT, "convert", f"{work}/bf16/{model}", f"{work}/{model}", "--dtype", "f32", "-q"], check=True)
    base, models = f"{work}/base", [f"{work}/finetune-a", f"{work}/finetune-b"]
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    print(f"{'method':16} {'max |diff| / max |value|':>26} {'elements off by > 2 ulp':>26}")
    for method in METHODS:
        cfg = config(method, base, models, work)
        theirs, ours = f"{work}/out-{method}-mergekit", f"{work}/out-{method}-swift"
        subprocess.run([mergekit_yaml, cfg, theirs], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([SWIFT, "run", cfg, "-o", ours, "-q", "--overwrite"], check=True)
        a, b = tensors(theirs), tensors(ours)
        if set(a) != set(b):
            print(f"{method:16} tensor sets differ: {sorted(set(a) ^ set(b))[:5]}")
            continue
        worst, off, total = 0.0, 0, 0
        for name in a:
            x, y = a[name].astype(np.float64), b[name].astype(np.float64)
            scale = max(np.abs(x).max(), 1e-30)
            worst = max(worst, np.abs(x - y).max() / scale)
            ulp = np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)
            off += int((np.abs(x - y) > 2 * ulp).sum())
            total += x.size
        print(f"{method:16} {worst:26.3g} {off:>17} of {total}")


if __name__ == "__main__":
    main()
