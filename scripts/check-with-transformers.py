#!/usr/bin/env python3
"""Loads mergekit-swift's outputs with transformers and PEFT, as a user would, and compares logits.

A developer check, not part of the test suite (it needs torch, transformers, peft and mergekit 0.1.5
in a virtual environment, as scripts/compare-with-mergekit.py describes). On the example models it
writes, for each output: whether it loads with no missing or unexpected keys, its tokenizer's
size against the embedding rows, and the largest logit difference from a reference:

- a TIES merge, a passthrough slices config and a union-tokenizer merge: against Python mergekit's
  output of the same YAML (TIES in bf16 differs where magnitudes tie at its top-k threshold);
- `convert` through a lone `.mkz`: against the original folder;
- `pela --format dense`: loads (its logits are the factored model's, checked by the test suite);
- `pela` factored and `mkv`: must be refused by transformers;
- `extract-lora` at full rank, on the Llama example and on a tiny GPT-2 (Conv1D): with
  AutoPeftModelForCausalLM, against the fine-tune;
- a `.bin` PyTorch checkpoint: converted, against its source.

    SWIFT=.build/release/mergekit /tmp/mkvenv/bin/python scripts/check-with-transformers.py
"""
import os
import shutil
import subprocess
import sys

import torch
import transformers

transformers.logging.set_verbosity_error()
SWIFT = os.environ.get("SWIFT", ".build/release/mergekit")
WORK = os.environ.get("WORK", "/tmp/check-with-transformers")
IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 2047]])


def run(*args):
    subprocess.run([SWIFT, *args], check=True, stdout=subprocess.DEVNULL)


def load(folder, peft_adapter=False):
    if peft_adapter:
        import peft

        return peft.AutoPeftModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32), []
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, output_loading_info=True)
    return model, list(info["missing_keys"]) + list(info["unexpected_keys"])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def report(name, folder, reference=None, peft_adapter=False, ids=IDS):
    try:
        model, problems = load(folder, peft_adapter)
    except Exception as error:  # noqa: BLE001 - a refusal is what some checks expect
        print(f"{name:28} refused: {str(error).splitlines()[0][:110]}")
        return
    line = f"{name:28} loads, {len(problems)} missing/unexpected keys"
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        line += f", tokenizer {len(tokenizer)} for {model.get_input_embeddings().weight.shape[0]} rows"
    if reference is not None:
        ref, _ = load(reference)
        a, b = logits(model, ids), logits(ref, ids)
        line += f", logits differ by {(a - b).abs().max().item():.2e} (largest {b.abs().max().item():.2f})"
    print(line)


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    ex = f"{WORK}/ex"
    run("example", ex)
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    configs = {
        "ties": f"models:\n  - model: {ex}/finetune-a\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {ex}/finetune-b\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"merge_method: ties\nbase_model: {ex}/base\ndtype: bfloat16\n",
        "passthrough": f"slices:\n  - sources: [{{model: {ex}/finetune-a, layer_range: [0, 3]}}]\n"
        f"  - sources: [{{model: {ex}/finetune-b, layer_range: [1, 4]}}]\nmerge_method: passthrough\ndtype: bfloat16\n",
        "union-tokenizer": f"models:\n  - model: {ex}/finetune-a\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {ex}/finetune-chat\n    parameters: {{weight: 0.5}}\n"
        f"merge_method: linear\ntokenizer_source: union\ndtype: float32\n",
    }
    for name, text in configs.items():
        path = f"{WORK}/{name}.yml"
        open(path, "w").write(text)
        subprocess.run([mergekit_yaml, path, f"{WORK}/{name}-python"], check=True, capture_output=True)
        run("run", path, f"{WORK}/{name}", "-q")
        report(f"merge {name}", f"{WORK}/{name}", reference=f"{WORK}/{name}-python")

    run("convert", f"{ex}/finetune-a", f"{WORK}/ft.mkz", "-q")
    run("convert", f"{WORK}/ft.mkz", f"{WORK}/ft-back", "-q")
    report("convert via a lone .mkz", f"{WORK}/ft-back", reference=f"{ex}/finetune-a")

    run("pela", f"{ex}/base", "--keep", "0.5", "--format", "dense", "-o", f"{WORK}/pela-dense", "-q")
    report("pela dense", f"{WORK}/pela-dense")
    run("pela", f"{ex}/base", "--keep", "0.5", "-o", f"{WORK}/pela-factored", "-q")
    report("pela factored", f"{WORK}/pela-factored")

    run("extract-lora", f"{ex}/finetune-a", "--base", f"{ex}/base", "--rank", "256", "--save-modules",
        "-o", f"{WORK}/lora", "-q")
    report("extract-lora (Llama)", f"{WORK}/lora", reference=f"{ex}/finetune-a", peft_adapter=True)

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=2048, n_positions=64)
    base = transformers.GPT2LMHeadModel(config)
    base.save_pretrained(f"{WORK}/gpt2-base")
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if parameter.dim() == 2 and ".h." in f".{name}":
                parameter += 0.01 * torch.randn(parameter.shape[0], 2) @ torch.randn(2, parameter.shape[1])
    base.save_pretrained(f"{WORK}/gpt2-ft")
    run("extract-lora", f"{WORK}/gpt2-ft", "--base", f"{WORK}/gpt2-base", "--rank", "2", "-o", f"{WORK}/gpt2-lora",
        "-q")
    report("extract-lora (GPT-2 Conv1D)", f"{WORK}/gpt2-lora", reference=f"{WORK}/gpt2-ft", peft_adapter=True)

    os.makedirs(f"{WORK}/bin")
    from safetensors.torch import load_file

    torch.save(load_file(f"{ex}/finetune-b/model.safetensors"), f"{WORK}/bin/pytorch_model.bin")
    shutil.copy(f"{ex}/finetune-b/config.json", f"{WORK}/bin/config.json")
    run("convert", f"{WORK}/bin", f"{WORK}/bin-converted", "-q")
    report("pytorch_model.bin converted", f"{WORK}/bin-converted", reference=f"{ex}/finetune-b")


if __name__ == "__main__":
    main()
