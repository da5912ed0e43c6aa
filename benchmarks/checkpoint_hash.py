"""What content hashes cost a checkpoint: a 1 GiB tag written, hashed, verified.

    python benchmarks/checkpoint_hash.py                 # sha256 (dsfm's), 1 GiB in /tmp
    python benchmarks/checkpoint_hash.py --digest blake2b --gib 0.25 --dir /scratch

One process writes a tag of one `torch.save`d file (as DeepSpeed's ZeRO-0 model states),
then times what `dsfm.train.checkpoint` adds on the save side (`write_hash_share` and
`write_manifest` on one rank) and on the load side (`incomplete_reason` by size and by
content, digests not memoised), against `torch.save` and `torch.load` of the same file.
The file was just written, so hashing reads it from the page cache, as at a real save.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dsfm.train import checkpoint


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size")
    ap.add_argument("--digest", default=checkpoint.DIGEST, help="hashlib name")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it")
    args = ap.parse_args()
    checkpoint.DIGEST = args.digest
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        tag = root / checkpoint.step_tag(1)
        tag.mkdir()
        (tag / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1}))
        n = int(args.gib * 2**30 / 4 / 16)
        weights = {f"w{i}": torch.randn(n) for i in range(16)}
        states = tag / "model_states.pt"
        t_save = timed(lambda: torch.save(weights, states))
        mib = sum(p.stat().st_size for p in tag.iterdir()) / 2**20

        def hash_at_save() -> None:
            checkpoint.write_hash_share(tag, 0, 1)
            checkpoint.write_manifest(tag)

        t_hash = timed(hash_at_save)
        checkpoint._digests.clear()  # what a fresh process (generate, eval, resume) pays
        t_size = timed(lambda: checkpoint.incomplete_reason(root, tag.name))
        t_verify = timed(lambda: checkpoint.incomplete_reason(root, tag.name, content=True))
        t_load = timed(lambda: torch.load(states, weights_only=True))
        print(
            f"{args.digest}, {mib:.0f} MiB: torch.save {t_save:.2f} s, hashing at save "
            f"{t_hash:.2f} s ({mib / t_hash:.0f} MiB/s, +{100 * t_hash / t_save:.0f}%); "
            f"check by size {1000 * t_size:.1f} ms, by content {t_verify:.2f} s "
            f"({mib / t_verify:.0f} MiB/s); torch.load {t_load:.2f} s"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
