"""`deepspeed launchers/finetune.py ...` from a checkout: `dsfm.launch.finetune` (which an
installed package runs as `deepspeed --module dsfm.launch.finetune`), the same code as
`dsfm finetune`.

    deepspeed launchers/finetune.py --ds zero2 --config sft_lora \
        data.path=data/chat train.init_from=runs/d12
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("dsfm.launch.finetune", run_name="__main__", alter_sys=True)
