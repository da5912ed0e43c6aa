"""`deepspeed launchers/pretrain.py ...` from a checkout: `dsfm.launch.pretrain` (which an
installed package runs as `deepspeed --module dsfm.launch.pretrain`), the same code as
`dsfm train`.

    deepspeed launchers/pretrain.py --ds zero2 --config d12 data.path=data/mycorpus
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("dsfm.launch.pretrain", run_name="__main__", alter_sys=True)
