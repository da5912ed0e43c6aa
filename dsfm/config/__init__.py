"""The training configuration: schema, loading, checks, the resolve step and the DeepSpeed JSON.

The path of a config: `load.load_config` (YAML + overrides -> `schema.Config`, then the pure
rules of `checks.check`) -> `resolve.resolve` (against the world: datasets, installed
packages, `train.init_from`) -> `deepspeed.fill_ds_config` ("auto" values from it).
"""
