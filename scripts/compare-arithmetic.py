#!/usr/bin/env python3
"""Compares mergekit-swift's `--compute mergekit` with Python mergekit in bf16/f16, and the newer
methods in float64.

A developer check, not part of the test suite (it needs torch and mergekit 0.1.5 in a virtual
environment, as scripts/compare-with-mergekit.py describes). On the example models (bf16), for each
configuration it prints how many elements of the output differ by more than one representable
value of the compute dtype, with `--compute mergekit` and with the default exact arithmetic.
Configurations marked `float64` are compared by their largest difference relative to each
tensor's largest value instead (both tools then compute in float64).

torch reduces a half-precision tensor in one float sum per thread and rounds each partial sum to
the tensor's dtype, so mergekit's results depend on its thread count; ours match torch on one
thread (`--torch-threads 1`).

With `--stable`, mergekit runs with its sorts made stable (`torch.argsort`, `torch.sort` and
`torch.topk` keep tied values in index order, as mergekit-swift does), so that top-k selections
agree on tied magnitudes and what remains is arithmetic.

    /tmp/mkvenv/bin/python scripts/compare-arithmetic.py [--stable] [--work DIR] [NAME ...]
"""
import argparse
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIFT = os.environ.get("SWIFT", os.path.join(ROOT, ".build", "release", "mergekit"))

# Runs mergekit-yaml in this interpreter with stable sorting patched in.
STABLE_RUNNER = r"""
import sys, torch
_argsort, _sort = torch.argsort, torch.sort
def argsort(x, *a, **k):
    k["stable"] = True
    return _argsort(x, *a, **k)
def sort(x, *a, **k):
    k["stable"] = True
    return _sort(x, *a, **k)
def topk(x, k, largest=True, **_):
    order = _argsort(x, descending=largest, stable=True)[:k]
    return x[order], order
torch.argsort, torch.sort, torch.topk = argsort, sort, topk
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml"] + sys.argv[1:]
main()
"""


def configurations(e):
    def gta(method, dtype, params, extra=""):
        return (
            f"merge_method: {method}\nbase_model: {e}/base\nmodels:\n"
            f"  - model: {e}/finetune-a\n    parameters: {{{params[0]}}}\n"
            f"  - model: {e}/finetune-b\n    parameters: {{{params[1]}}}\n"
            f"dtype: {dtype}\n{extra}"
        )

    two = f"models:\n  - model: {e}/finetune-a\n    parameters: {{weight: 0.4}}\n  - model: {e}/finetune-b\n    parameters: {{weight: 0.6}}\n"
    configs = {
        "task_arithmetic": gta("task_arithmetic", "bfloat16", ["weight: 0.3", "weight: 0.7"], "parameters: {lambda: 0.9}\n"),
        "task_arithmetic_normalize": gta("task_arithmetic", "bfloat16", ["weight: 0.3", "weight: 0.6"], "parameters: {normalize: true}\n"),
        "ties_density_1": gta("ties", "bfloat16", ["weight: 0.4, density: 1.0", "weight: 0.6, density: 1.0"]),
        "ties": gta("ties", "bfloat16", ["weight: 0.3, density: 0.5", "weight: 0.7, density: 0.4"]),
        "ties_f16": gta("ties", "float16", ["weight: 0.3, density: 0.5", "weight: 0.7, density: 0.4"]),
        "ties_out_f32": gta("ties", "bfloat16", ["weight: 0.3, density: 0.5", "weight: 0.7, density: 0.4"], "out_dtype: float32\n"),
        "breadcrumbs_ties": gta("breadcrumbs_ties", "bfloat16", ["weight: 0.5, density: 0.6, gamma: 0.02"] * 2),
        "linear": f"merge_method: linear\n{two}dtype: bfloat16\n",
        "slerp": f"merge_method: slerp\nbase_model: {e}/base\nmodels:\n  - model: {e}/base\n  - model: {e}/finetune-a\nparameters: {{t: 0.3}}\ndtype: bfloat16\n",
        "model_stock_bf16": gta("model_stock", "bfloat16", ["", ""]),
        "sce_bf16": gta("sce", "bfloat16", ["", ""], "parameters: {select_topk: 0.5}\n"),
        "nuslerp_bf16": f"merge_method: nuslerp\n{two}dtype: bfloat16\n",
        "nuslerp_base_bf16": f"merge_method: nuslerp\nbase_model: {e}/base\n{two}dtype: bfloat16\n",
        "nuslerp_rows_bf16": f"merge_method: nuslerp\n{two}parameters: {{nuslerp_flatten: false}}\ndtype: bfloat16\n",
        "multislerp_bf16": f"merge_method: multislerp\n{two}dtype: bfloat16\n",
        "multislerp_base_bf16": f"merge_method: multislerp\nbase_model: {e}/base\n{two}dtype: bfloat16\n",
        "karcher_bf16": f"merge_method: karcher\nmodels:\n  - model: {e}/finetune-a\n  - model: {e}/finetune-b\n  - model: {e}/base\ndtype: bfloat16\n",
        "ram_bf16": gta("ram", "bfloat16", ["", ""]),
        "ramplus_tl_bf16": gta("ramplus_tl", "bfloat16", ["", ""]),
        "arcee_fusion_bf16": f"merge_method: arcee_fusion\nbase_model: {e}/base\nmodels:\n  - model: {e}/finetune-a\ndtype: bfloat16\n",
        "nearswap": f"merge_method: nearswap\nbase_model: {e}/base\nmodels:\n  - model: {e}/finetune-a\nparameters: {{t: 0.001}}\ndtype: bfloat16\n",
    }
    newer = {
        "model_stock": gta("model_stock", "float64", ["", ""]),
        "sce": gta("sce", "float64", ["", ""], "parameters: {select_topk: 0.5}\n"),
        "nuslerp": f"merge_method: nuslerp\n{two}dtype: float64\n",
        "multislerp": f"merge_method: multislerp\n{two}dtype: float64\n",
        "karcher": f"merge_method: karcher\nmodels:\n  - model: {e}/finetune-a\n  - model: {e}/finetune-b\n  - model: {e}/base\ndtype: float64\n",
        "nearswap_f64": f"merge_method: nearswap\nbase_model: {e}/base\nmodels:\n  - model: {e}/finetune-a\nparameters: {{t: 0.001}}\ndtype: float64\n",
        "arcee_fusion": f"merge_method: arcee_fusion\nbase_model: {e}/base\nmodels:\n  - model: {e}/finetune-a\ndtype: float64\n",
    }
    return configs, newer


def ordered(t, dtype):
    bits = t.to(dtype).view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -32768 - bits, bits)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/mergekit-arithmetic")
    parser.add_argument("--stable", action="store_true")
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch's thread count for mergekit (its half-precision reductions round each thread's partial sum)")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    examples = f"{work}/examples"
    subprocess.run([SWIFT, "example", examples], check=True, stdout=subprocess.DEVNULL)
    configs, newer = configurations(examples)
    for name, text in {**configs, **newer}.items():
        if args.names and name not in args.names:
            continue
        path = f"{work}/{name}.yml"
        open(path, "w").write(text)
        theirs = f"{work}/{name}-python"
        if args.stable:
            command = [sys.executable, "-c", STABLE_RUNNER, path, theirs]
        else:
            command = [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), path, theirs]
        environment = dict(os.environ)
        if args.torch_threads:
            environment["OMP_NUM_THREADS"] = str(args.torch_threads)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
        a = load_file(f"{theirs}/model.safetensors")
        if name in newer:
            subprocess.run([SWIFT, "run", path, f"{work}/{name}-swift", "-q"], check=True)
            b = load_file(f"{work}/{name}-swift/model.safetensors")
            worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-300)).item() for k in a)
            print(f"{name:26} float64: largest difference {worst:.2e} of the tensor's largest value")
            continue
        counts = []
        dtype = torch.float16 if "dtype: float16" in text else torch.bfloat16
        for mode in ("mergekit", "exact"):
            ours = f"{work}/{name}-swift-{mode}"
            subprocess.run([SWIFT, "run", path, ours, "-q", "--compute", mode], check=True)
            b = load_file(f"{ours}/model.safetensors")
            counts.append(sum(int(((ordered(a[k], dtype) - ordered(b[k], dtype)).abs() > 1).sum()) for k in a))
        total = sum(t.numel() for t in a.values())
        print(f"{name:26} of {total}: {counts[0]} differ by more than 1 ulp with --compute mergekit, {counts[1]} exact")


if __name__ == "__main__":
    main()
