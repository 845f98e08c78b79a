#!/usr/bin/env python3
"""Merges models with different vocabularies through Python mergekit and mergekit-swift and compares.

A developer check, not part of the test suite (it needs torch, transformers and mergekit 0.1.5 in
a virtual environment, as scripts/compare-with-mergekit.py describes). It makes tiny Llama models
with their own BPE tokenizers (one with chat tokens added, one trained on other text, one with
padding rows, one whose tokenizer has more tokens than rows), runs each tokenizer configuration
(union, base, a model, the `tokenizer:` block with `tokens` and `pad_to_multiple_of`, slices) both
ways, and prints per configuration the output rows and the largest difference of any tensor
relative to its largest magnitude, comparing embedding and LM-head rows by token (mergekit orders
the tokens a union adds by Python dict order, which is not ours). It also checks that the two
tokenizers hold the same tokens and that config.json's vocab_size agrees.

    SWIFT=.build/release/mergekit /tmp/mkvenv/bin/python scripts/compare-vocabularies.py [NAME ...]
"""
import os, sys, json, shutil, subprocess
import torch
import numpy as np
from safetensors.torch import load_file as _load
from tokenizers import Tokenizer, models, trainers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM

WORK = os.environ.get("WORK", "/tmp/compare-vocabularies")
M = WORK + "/models"
W = WORK + "/work"
SWIFT = os.environ.get("SWIFT", ".build/release/mergekit")


def load_file(path):
    return {k: v.to(torch.float32).numpy() for k, v in _load(path).items()}


def tokenizer(texts, size):
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_model(tok, seed, name, rows):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    path = os.path.join(M, name)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    tok.save_pretrained(path)


def make_models():
    texts_a = ["the quick brown fox jumps over the lazy dog " * 3, "merging models is fun and useful",
               "alpha beta gamma delta"] * 20
    texts_b = ["lorem ipsum dolor sit amet consectetur", "the cat sat on the mat with a hat",
               "zeta eta theta iota kappa"] * 20
    ta = tokenizer(texts_a, 300)
    tc = tokenizer(texts_a, 300)
    tc.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tb = tokenizer(texts_b, 290)
    save_model(ta, 0, "base", len(ta))
    save_model(ta, 1, "same", len(ta))
    save_model(tc, 2, "chat", len(tc))
    save_model(tb, 3, "other", len(tb))
    save_model(ta, 4, "padded", len(ta) + 12)
    save_model(tc, 5, "short", 300)

configs = {
 "union_ta": f"""
merge_method: task_arithmetic
base_model: {M}/base
models:
  - model: {M}/chat
    parameters: {{weight: 0.6}}
  - model: {M}/other
    parameters: {{weight: 0.4}}
tokenizer_source: union
dtype: float32
""",
 "union_linear": f"""
merge_method: linear
models:
  - model: {M}/chat
    parameters: {{weight: 0.5}}
  - model: {M}/other
    parameters: {{weight: 0.5}}
tokenizer_source: union
dtype: float32
""",
 "base_ties": f"""
merge_method: ties
base_model: {M}/base
models:
  - model: {M}/chat
    parameters: {{weight: 0.5, density: 0.7}}
  - model: {M}/other
    parameters: {{weight: 0.5, density: 0.7}}
tokenizer_source: base
dtype: float32
""",
 "model_src": f"""
merge_method: linear
models:
  - model: {M}/base
    parameters: {{weight: 0.3}}
  - model: {M}/chat
    parameters: {{weight: 0.7}}
tokenizer_source: {M}/chat
dtype: float32
""",
 "tokens": f"""
merge_method: linear
base_model: {M}/base
models:
  - model: {M}/base
    parameters: {{weight: 0.5}}
  - model: {M}/chat
    parameters: {{weight: 0.5}}
tokenizer:
  source: union
  tokens:
    <|im_start|>:
      source:
        kind: model_token
        model: {M}/chat
        token: <s>
    <|im_end|>:
      source: {M}/chat
    the:
      source:
        kind: zero
      force: true
    brandnew:
      source:
        kind: model_token
        model: {M}/base
        token_id: 5
dtype: float32
""",
 "pad": f"""
merge_method: linear
models:
  - model: {M}/chat
    parameters: {{weight: 0.5}}
  - model: {M}/other
    parameters: {{weight: 0.5}}
tokenizer:
  source: union
  pad_to_multiple_of: 64
dtype: float32
""",
 "padded_base": f"""
merge_method: linear
models:
  - model: {M}/padded
    parameters: {{weight: 0.5}}
  - model: {M}/same
    parameters: {{weight: 0.5}}
tokenizer_source: base
dtype: float32
""",
 "short_base": f"""
merge_method: task_arithmetic
base_model: {M}/short
models:
  - model: {M}/chat
    parameters: {{weight: 0.5}}
  - model: {M}/other
    parameters: {{weight: 0.5}}
tokenizer_source: base
dtype: float32
""",
 "short_union": f"""
merge_method: linear
models:
  - model: {M}/short
    parameters: {{weight: 0.5}}
  - model: {M}/other
    parameters: {{weight: 0.5}}
tokenizer_source: union
dtype: bfloat16
""",
 "slices_union": f"""
merge_method: slerp
base_model: {M}/base
slices:
  - sources:
      - model: {M}/base
        layer_range: [0, 2]
      - model: {M}/chat
        layer_range: [0, 2]
parameters:
  t: 0.3
tokenizer_source: union
dtype: float32
""",
}


def vocab(path):
    return Tokenizer.from_file(path + "/tokenizer.json").get_vocab(with_added_tokens=True)


def compare(name, text):
    cfg = f"{W}/{name}.yml"
    open(cfg, "w").write(text)
    py, sw = f"{W}/{name}-py", f"{W}/{name}-sw"
    for d in (py, sw):
        shutil.rmtree(d, ignore_errors=True)
    r = subprocess.run([os.path.dirname(sys.executable) + "/mergekit-yaml", cfg, py], capture_output=True, text=True)
    if r.returncode:
        return print(name, "mergekit failed:", r.stderr[-800:])
    r = subprocess.run([SWIFT, "run", cfg, sw, "-q"], capture_output=True, text=True)
    if r.returncode:
        return print(name, "mergekit-swift failed:", r.stderr[-800:])
    a, b = load_file(py + "/model.safetensors"), load_file(sw + "/model.safetensors")
    va, vb = vocab(py), vocab(sw)
    problems = []
    if set(va) != set(vb):
        problems.append(f"tokens differ: {sorted(set(va) ^ set(vb))[:5]}")
    if set(a) != set(b):
        problems.append(f"tensor names differ: {sorted(set(a) ^ set(b))}")
    worst = 0.0
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape:
            problems.append(f"{k}: shape {x.shape} vs {y.shape}")
            continue
        scale = np.abs(x).max() + 1e-30
        if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight"):
            for tok, i in va.items():
                if tok in vb and i < x.shape[0]:
                    worst = max(worst, np.abs(x[i] - y[vb[tok]]).max() / scale)
            if x.shape[0] > len(va):
                worst = max(worst, np.abs(x[len(va):] - y[len(va):]).max() / scale)
        else:
            worst = max(worst, np.abs(x - y).max() / scale)
    ca, cb = json.load(open(py + "/config.json")), json.load(open(sw + "/config.json"))
    if ca.get("vocab_size") != cb.get("vocab_size"):
        problems.append(f"vocab_size {ca.get('vocab_size')} vs {cb.get('vocab_size')}")
    rows = next(v.shape[0] for k, v in a.items() if k.endswith("embed_tokens.weight"))
    print(f"{name}: {rows} rows, largest difference {worst:.2e} of the largest magnitude; "
          + ("; ".join(problems) if problems else "same tokens, names, shapes and vocab_size"))


if __name__ == "__main__":
    os.makedirs(W, exist_ok=True)
    make_models()
    for name, text in configs.items():
        if len(sys.argv) == 1 or name in sys.argv[1:]:
            compare(name, text)
