"""Copies a finished training run into the repository's shipped form (issue 14).

    python experiments/ship_checkpoint.py runs/train/mnist5k_resnet_zeros \
        experiments/checkpoints/mnist5k_resnet_zeros

Keeps what ``els_jax.load_trained`` and a reader need: ``config.json``, ``metrics.jsonl`` and
the latest Orbax checkpoint (``checkpoints/<step>/``), nothing older. Refuses an unfinished
run (latest checkpoint < config steps) unless ``--partial``. The copy is assembled in a
temporary directory beside the destination and renamed into place, so an interrupted copy
never leaves a half-written checkpoint behind; then it is loaded back as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("dest")
    p.add_argument("--partial", action="store_true", help="ship an unfinished run too")
    args = p.parse_args(argv)

    with open(os.path.join(args.workdir, "config.json")) as f:
        config = json.load(f)
    ckpt_root = os.path.join(args.workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_root) if d.isdigit())
    if not steps:
        sys.exit(f"no finished checkpoint in {ckpt_root}")
    last = steps[-1]
    if config.get("steps") and last < config["steps"] and not args.partial:
        sys.exit(f"{args.workdir} is at step {last} of {config['steps']}: not finished "
                 "(resume the training, or pass --partial)")

    parent = os.path.dirname(os.path.abspath(args.dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ship-", dir=parent)
    try:
        for name in ("config.json", "metrics.jsonl"):
            shutil.copy2(os.path.join(args.workdir, name), os.path.join(tmp, name))
        shutil.copytree(os.path.join(ckpt_root, str(last)),
                        os.path.join(tmp, "checkpoints", str(last)))
        old = None
        if os.path.exists(args.dest):
            old = args.dest.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(args.dest, old)
        os.replace(tmp, args.dest)
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import els_jax as ej     # check that what we ship loads

    model, params, loaded = ej.load_trained(args.dest)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.dest) for f in fs)
    print(f"shipped step {last} of {type(model).__name__} ({loaded.padding}) to {args.dest}: "
          f"{size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
