#!/usr/bin/env python3
# Usage: python scripts/make-decoder-fixtures.py Tests/NetsTests/Fixtures/transformers-decoders
# (needs torch, transformers and safetensors; the fixtures in the repository came from transformers 5.24).
# Tiny decoders with the config fields of issue 21, run by transformers in float64: the
# weights (f32 safetensors), config.json and the logits of two token sequences.
import json, os, sys, torch
from safetensors.torch import save_file
import transformers
torch.manual_seed(0)
out = sys.argv[1]
base = dict(vocab_size=24, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, rms_norm_eps=1e-5, hidden_act="silu")
cases = {
  "llama-biases": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, head_dim=6,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
  "llama-linear": ("LlamaForCausalLM", dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500.0)),
  "llama-dynamic": ("LlamaForCausalLM", dict(max_position_embeddings=8,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0})),
  "llama-yarn": ("LlamaForCausalLM", dict(max_position_embeddings=32, num_attention_heads=1, head_dim=16,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 100.0})),
  "llama3": ("LlamaForCausalLM", dict(num_attention_heads=1, head_dim=8, max_position_embeddings=128,
                    rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16, "rope_theta": 500.0})),
  "mistral-window": ("MistralForCausalLM", dict(sliding_window=3)),
  "qwen2-window": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                    tie_word_embeddings=True)),
  "qwen3": ("Qwen3ForCausalLM", dict(attention_bias=True, head_dim=6, use_sliding_window=True, sliding_window=5,
                    layer_types=["sliding_attention", "full_attention"])),
  "gemma2": ("Gemma2ForCausalLM", dict(head_dim=4, query_pre_attn_scalar=6, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0, sliding_window=3, attention_bias=True,
                    hidden_activation="gelu_pytorch_tanh")),
}
sequences = [[3, 17, 22, 8, 0, 19, 5, 11, 2, 23, 7, 14], [5, 9, 13, 1, 20, 4, 16, 10, 6, 12, 18, 21]]
for name, (arch, extra) in cases.items():
    kwargs = dict(base); kwargs.update(extra)
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2"}[arch]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [arch]
    model = getattr(transformers, arch)(config).to(torch.float64)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in n else 0.5) + (1.0 if "norm" in n else 0.0))
        # f32 weights, as stored; the reference runs them in float64.
        for p in model.parameters(): p.copy_(p.to(torch.float32).to(torch.float64))
        logits = model(torch.tensor(sequences)).logits
    folder = os.path.join(out, name); os.makedirs(folder, exist_ok=True)
    tensors = {k: v.to(torch.float32).contiguous() for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    # The config.json as written by the user (the keys above), not transformers' expansion.
    raw = dict(kwargs); raw["architectures"] = [arch]; raw["model_type"] = model_type
    json.dump(raw, open(os.path.join(folder, "config.json"), "w"), indent=1)
    json.dump({"sequences": sequences, "logits": [[[round(x, 9) for x in row] for row in seq] for seq in logits.tolist()],
               "transformers": transformers.__version__}, open(os.path.join(folder, "reference.json"), "w"))
    print(name, logits.shape, float(logits.abs().max()))
