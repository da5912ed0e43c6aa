"""Fine-tune (LoRA or full) under any launcher: the same code as `dsfm finetune`.

    deepspeed launchers/finetune.py --ds ds_configs/zero2.json --config configs/sft_lora.yaml \
        data.path=data/chat train.init_from=runs/d12
"""

import argparse
import sys

from dsfm.cli import add_train_args, finetune_main
from dsfm.config import ConfigError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_args(parser)
    parser.set_defaults(config="configs/sft_lora.yaml")
    try:
        sys.exit(finetune_main(parser.parse_args()))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
