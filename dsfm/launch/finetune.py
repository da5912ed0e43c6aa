"""Fine-tune (LoRA or full) under any launcher: the same code as `dsfm finetune`.

    deepspeed --module dsfm.launch.finetune --ds zero2 --config sft_lora \
        data.path=data/chat train.init_from=runs/d12
"""

import sys

from dsfm.cli import run

if __name__ == "__main__":
    run(["finetune", *sys.argv[1:]])
