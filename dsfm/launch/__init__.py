"""Entry points for launchers that start a Python module on every rank, from an installed
package: `deepspeed --module dsfm.launch.pretrain`, `torchrun -m dsfm.launch.finetune`.
Like `dsfm.cli`, nothing inside dsfm imports them."""
