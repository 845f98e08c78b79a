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
relative to the tensor's largest magnitude and the count of elements that differ by more than 4 ulps
of the largest value in play, then either both
tools' errors against a float64 computation of the same merge, or (TIES, breadcrumbs) how many of
the differing elements are not explained by ties at the top-k threshold, which mergekit leaves to
torch.topk's arbitrary order. DARE draws random numbers differently in each tool and is left out.
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
    inputs = [tensors(base)] + [tensors(m) for m in models]
    print(f"{'method':16} {'max |diff| / max |value|':>26} {'differing beyond rounding':>26}   notes")
    for method in METHODS:
        cfg = config(method, base, models, work)
        theirs, ours = f"{work}/out-{method}-mergekit", f"{work}/out-{method}-swift"
        subprocess.run([mergekit_yaml, cfg, theirs], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([SWIFT, "run", cfg, "-o", ours, "-q", "--overwrite"], check=True)
        a, b = tensors(theirs), tensors(ours)
        if set(a) != set(b):
            print(f"{method:16} tensor sets differ: {sorted(set(a) ^ set(b))[:5]}")
            continue
        worst, off, total, unexplained = 0.0, 0, 0, 0
        errors = {"mergekit": 0.0, "swift": 0.0}
        for name in a:
            x, y = a[name].astype(np.float64), b[name].astype(np.float64)
            scale = max(np.abs(x).max(), 1e-30)
            worst = max(worst, np.abs(x - y).max() / scale)
            # Beyond f32 rounding: more than 4 ulps of the largest value in play at that element
            # (either output or any input, since sums of inputs can cancel).
            magnitude = np.maximum.reduce([np.abs(x), np.abs(y)] + [np.abs(t[name].astype(np.float64)) for t in inputs])
            differs = np.abs(x - y) > 4 * np.spacing(magnitude.astype(np.float32)).astype(np.float64)
            off += int(differs.sum())
            total += x.size
            reference = float64_reference(method, [t[name] for t in inputs])
            if reference is not None:
                for tool, values in (("mergekit", x), ("swift", y)):
                    errors[tool] = max(errors[tool], np.abs(values - reference).max() / max(np.abs(reference).max(), 1e-30))
            elif method in ("ties", "breadcrumbs"):
                unexplained += int((differs & ~threshold_ties(method, [t[name] for t in inputs])).sum())
        if method in ("ties", "breadcrumbs"):
            note = f"{unexplained} of them where no task vector ties its top-k threshold"
        else:
            note = f"vs float64: mergekit {errors['mergekit']:.2g}, swift {errors['swift']:.2g}"
        print(f"{method:16} {worst:26.3g} {off:>17} of {total}   {note}")


def float64_reference(method, tensors):
    """The float64 merge of one tensor (base first), for the methods without top-k selection."""
    _, _, per_model, glob = METHODS[method]
    base, models = tensors[0].astype(np.float64), [t.astype(np.float64) for t in tensors[1:]]
    if method == "linear":
        w = per_model["weight"]
        return sum(wi * m for wi, m in zip(w, models)) / sum(w)
    if method == "task_arithmetic":
        return base + glob["lambda"] * sum(wi * (m - base) for wi, m in zip(per_model["weight"], models))
    if method == "model_stock":
        deltas = [(m - base).ravel() for m in models]
        cos = np.dot(deltas[0], deltas[1]) / (np.linalg.norm(deltas[0]) * np.linalg.norm(deltas[1]) + 1e-300)
        t = 2 * cos / (1 + cos)
        return t * (models[0] + models[1]) / 2 + (1 - t) * base
    if method == "slerp":
        v0, v1, t = base.ravel(), models[0].ravel(), glob["t"]
        n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
        cos = np.dot(v0, v1) / ((n0 if n0 > 1e-8 else 1) * (n1 if n1 > 1e-8 else 1))
        if abs(cos) > 0.9995:
            return ((1 - t) * v0 + t * v1).reshape(base.shape)
        theta = np.arccos(np.clip(cos, -1, 1))
        return ((np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)).reshape(base.shape)
    return None


def threshold_ties(method, tensors):
    """Elements where some model's |task vector| equals one of its top-k cut values: there the
    kept set depends on how ties are broken, which mergekit leaves to torch.topk."""
    _, _, per_model, _ = METHODS[method]
    base = tensors[0].astype(np.float32)
    tied = np.zeros(base.shape, dtype=bool)
    for i, model in enumerate(tensors[1:]):
        magnitude = np.abs(model.astype(np.float32) - base).ravel()
        n = magnitude.size
        kept = int(per_model["density"][i] * n)
        cuts = [kept]
        if method == "breadcrumbs":
            top = int(per_model["gamma"][i] * n)
            cuts = [top, top + kept]
        ordered = np.sort(magnitude)[::-1]
        for cut in cuts:
            for position in (cut - 1, cut):
                if 0 <= position < n:
                    tied |= (magnitude == ordered[position]).reshape(base.shape)
    return tied


if __name__ == "__main__":
    main()
