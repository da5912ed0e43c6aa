"""Pretrain under any launcher: the same code as `dsfm train`.

    deepspeed launchers/pretrain.py --ds ds_configs/zero2.json --config configs/d12.yaml \
        data.path=data/mycorpus train.max_steps=1000
"""

import sys

from dsfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
