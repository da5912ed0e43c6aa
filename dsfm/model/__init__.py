"""The model: its config and presets (`config`), the Llama-style GPT (`gpt`), sizes and FLOPs
without torch (`sizes`), LoRA (`lora`) and the fused ops (`ops`)."""
