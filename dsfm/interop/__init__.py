"""Weights in and out: plain checkpoints and any checkpoint's weights (`weights`), Hugging
Face Llama export and import (`hf`), LoRA merging (`merge`)."""
