"""Data: corpus -> tokenizer -> packed token files (`prepare`) -> samples (`dataset`, `blend`,
`sampler`). `format.py` owns the on-disk layout of a prepared dataset."""
