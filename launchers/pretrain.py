"""Pretrain under any launcher: the same code as `dsfm train`.

    deepspeed launchers/pretrain.py --ds ds_configs/zero2.json --config configs/d12.yaml \
        data.path=data/mycorpus train.max_steps=1000
"""

import argparse
import sys

from dsfm.cli import add_train_args, train_main
from dsfm.config import ConfigError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_args(parser)
    try:
        sys.exit(train_main(parser.parse_args()))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
