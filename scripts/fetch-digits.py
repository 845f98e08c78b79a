#!/usr/bin/env python3
"""Fetches the UCI optical digits set bundled with scikit-learn (1797 8x8 images, 64 features,
10 classes) from its PyPI wheel, with the standard library only, and writes our CSV layout:
features scaled to [0, 1], the label, and the task (0: digits 0-4, 1: digits 5-9). Every fourth
row goes to the test split. Usage: fetch-digits.py OUTDIR"""
import gzip, os, subprocess, sys, tempfile, zipfile

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                    "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", tmp, "scikit-learn==1.9.1"], check=True)
    wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
    rows = gzip.decompress(zipfile.ZipFile(wheel).read("sklearn/datasets/data/digits.csv.gz")).decode().split()
header = ",".join([f"x{i}" for i in range(64)] + ["label", "task"])
splits = {"train": [header], "test": [header]}
for i, row in enumerate(rows):
    values = row.split(",")
    label = int(float(values[-1]))
    line = ",".join(f"{float(v) / 16:g}" for v in values[:-1]) + f",{label},{0 if label < 5 else 1}"
    splits["test" if i % 4 == 0 else "train"].append(line)
for name, lines in splits.items():
    with open(os.path.join(out, f"{name}.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
print(f"{out}: {len(splits['train']) - 1} train and {len(splits['test']) - 1} test rows")
