"""Peak-memory estimates of ``autosteer fit`` by :func:`autosteer.method.fit.fit_memory_estimate`, with
the weights counted on the meta device (nothing is allocated, no weights are needed): the default
model, and Llama-3.1-8B / Llama-3.1-70B shapes (their published configs, written out here), each fitted on
the shipped fit data (its row count read from ``fit_data_of(FitConfig())``).

    python benchmarks/fit_memory.py            # prints the markdown table of docs/fit_at_scale.md
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig

from autosteer.method.fit import FitConfig, fit_data_of, fit_memory_estimate

SHAPES = {
    "SmolLM2-135M-Instruct (default), fp32, bf16 matmuls": (
        LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), torch.float32, "bf16-matmul"),
    "Llama-3.1-8B-Instruct, bf16": (
        LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), torch.bfloat16, None),
    "Llama-3.1-70B-Instruct, bf16": (
        LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), torch.bfloat16, None),
}


def main() -> None:
    gib = 2 ** 30
    data = fit_data_of(FitConfig())
    n = len(data.harmful) + len(data.benign)
    print(f"Fit on the shipped data: {n:,} prompt rows ({len(data.harmful):,} harmful, {len(data.benign):,} benign).\n")
    print("| model | parameters | weights | compute copy | states kept | extraction batch | Refusal Head | total |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (cfg, dtype, compute) in SHAPES.items():
        e = fit_memory_estimate(cfg, n_prompts=n, n_full_depth=600, cfg=FitConfig(), model_dtype=dtype,
                                compute_dtype=compute)
        print(f"| {name} | {e['parameters'] / 1e9:.2f} B | {e['weights'] / gib:.1f} GiB | {e['compute_copy'] / gib:.2f} GiB | "
              f"{e['states'] / gib:.2f} GiB | {e['extraction'] / gib:.2f} GiB | {e['refusal_head'] / gib:.2f} GiB | "
              f"**{e['total'] / gib:.1f} GiB** |")


if __name__ == "__main__":
    main()
