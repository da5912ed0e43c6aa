from setuptools import find_packages, setup

setup(
    name="dsfm",
    version="0.1.0",
    description="Train decoder-only transformer language models from scratch on DeepSpeed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dsfm", "dsfm.*"]),
    # the bundled training configs and DeepSpeed recipes (`--config smoke`, `--ds zero2`)
    package_data={"dsfm": ["recipes/configs/*.yaml", "recipes/ds_configs/*.json"]},
    install_requires=[
        "torch>=2.4",          # a range, so a user's existing CUDA build is kept
        "deepspeed>=0.16",
        "numpy>=1.24",
        "pyyaml>=6",
        "rich>=13",
        "tokenizers>=0.19",
        "safetensors>=0.4",    # plain checkpoints and Hugging Face export
        "jinja2>=3.1",         # a model's own chat template (torch depends on it already)
        "matplotlib>=3.7",     # dsfm plot dashboards
        "wandb>=0.16",         # the W&B metrics sink (log.sinks: [wandb]); offline mode works
    ],
    extras_require={
        "data": ["pyarrow>=14", "zstandard>=0.22"],  # Parquet and .zst inputs to prepare
        "hf": ["datasets>=2.18"],                    # hf:NAME inputs to prepare
        "tensorboard": ["tensorboard>=2.14"],        # the TensorBoard metrics sink
        "peft": ["peft>=0.13", "transformers>=4.45"],  # loading exported LoRA adapters
        "eval": ["lm-eval>=0.4.5"],                  # dsfm eval --tasks: standard benchmarks
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",
            "transformers>=4.45",
            "peft>=0.13",
            "pyarrow>=14",
            "zstandard>=0.22",
            "datasets>=2.18",
            "tensorboard>=2.14",
            "lm-eval>=0.4.5",
            # kernel tests run under TRITON_INTERPRET=1 on CPU; Linux wheels only
            "triton>=3.0; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": ["dsfm=dsfm.cli:run"]},
)
