"""Evaluation: loss, perplexity and bits per byte (`loss`), sampling (`generate`)."""
