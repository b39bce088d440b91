"""Hugging Face interchange: `engine export --format hf` and `engine import`.

    convert.py   Megatron GPTModel ↔ HF Llama / Qwen2 / Qwen3 / Mistral: one mapping per family (config keys,
                 tensor names, fused QKV and SwiGLU layouts) and what is refused
    session.py   Megatron-Core in one CPU process (TP1/PP1) through the workers' own model and checkpoint code
    to_hf.py     a stage's checkpoint → model.safetensors, config.json, tokenizer and chat template
    from_hf.py   a local HF folder → an engine checkpoint directory with meta.json, for `init_from`; streams tensors

Nothing here is imported by the compiler; torch loads only when a command runs.
"""
