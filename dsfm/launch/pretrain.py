"""Pretrain under any launcher: the same code as `dsfm train`.

    deepspeed --module dsfm.launch.pretrain --ds zero2 --config d12 \
        data.path=data/mycorpus train.max_steps=1000

`--data corpus.txt` prepares raw text into RUN/data/ first; with no data at all it trains on
the embedded corpus (prepared once into $DSFM_CACHE, default ~/.cache/dsfm).
"""

import sys

from dsfm.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
