"""Golden outputs of the authors' own PyTorch machines, for tests/test_authors_golden.py.

Runs Kamb & Ganguli's modules (github.com/Kambm/convolutional_diffusion, utils/idealscore.py)
in float64 on tiny synthetic training sets and writes their x̂_0, with every input, to
tests/data/authors_golden.npz; and two whole samples of their sampler
(``ScheduledScoreMachine``, 20 patch sizes, both ELS boundaries) from fixed noise. The test then runs our machines on the same inputs: the one
check in the suite that does not go through our reading of docs/theory.md, so a boundary
rule read differently from the authors' code (which candidates an edge or corner pixel sees,
what the query window holds at a border) shows up as a mismatch.

Modules and the machine each one is (docs/theory.md §2):
  IdealScoreModule              → IS
  LocalScoreModule              → LS (the pixels outside the image do not count)
  LocalEquivScoreModule         → ELS, boundary "circular", wrap_patches=False
  LocalEquivBordersScoreModule  → ELS, boundary "zeros" (for k ≥ H their code returns LS,
                                  as docs/theory.md §2 defines it)

Their conventions, and what this script does about them:
  - forward(t, x, label) returns the score s in NCHW; β(t) = b² from their "legacy" cosine
    schedule, 1 − cos²(t/1.008·π/2): ours, "cosine". The test compares x̂_0 = (x + b²·s)/a.
  - Their circular ELS, LS and IS accumulate the MEAN over each DataLoader batch, which equals
    the sum only when every batch has the same size (docs/benchmarks.md: with N = 1000 and
    batch 64 the last images weigh 1.6×): the batch size here exceeds N, one batch.
  - Their per-pixel max subtraction is shared over the query batch in some modules (harmless
    in exact arithmetic); each query is run alone (B = 1).
  - float64 throughout (torch.set_default_dtype): their ‖x‖² − 2a·x·c + a²‖c‖² expansion
    cancels in float32 at small t; in float64 it is exact to ~1e-12 here.

Run it in a virtualenv with torch (CPU), numpy and matplotlib (their module imports pyplot),
on a checkout of their repository:

    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy matplotlib
    git clone https://github.com/Kambm/convolutional_diffusion /tmp/authors
    /tmp/torchvenv/bin/python experiments/authors_golden.py --repo /tmp/authors \
        --out tests/data/authors_golden.npz

It does not import jax or els_jax. The output is deterministic (numpy seed 0).
"""

import argparse
import json
import os
import subprocess
import sys
import types

os.environ.setdefault("MPLBACKEND", "Agg")


def _import_theirs(repo):
    """Their utils/idealscore.py as a module. Its top imports torchvision, which their machines
    never use: a stub stands in when it is not installed."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stub.datasets = types.ModuleType("torchvision.datasets")
        stub.models = types.ModuleType("torchvision.models")
        sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms,
                            "torchvision.datasets": stub.datasets,
                            "torchvision.models": stub.models})
    sys.path.insert(0, repo)
    from utils import idealscore
    return idealscore


def _training_sets(np):
    """Tiny training sets [N, H, W, C] in [−1, 1] with labels: grey 9×9 (odd side: a centre
    pixel, interior, edges and corners all present for k = 3, 5, 7), colour 8×8 (even side),
    grey 12×12 (k = 11: edges 5 pixels deep around a 2×2 interior). Square only: their
    zero-padded module sizes every edge by H and fails on H ≠ W. Smooth images plus noise, so
    that windows are neither all alike nor independent."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (n, h, w, c) in {"grey9": (6, 9, 9, 1), "rgb8": (5, 8, 8, 3),
                               "grey12": (5, 12, 12, 1)}.items():
        yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        imgs = []
        for _ in range(n):
            f = rng.uniform(0.5, 2.5, (2, c))
            p = rng.uniform(0, 2 * np.pi, (2, c))
            img = (np.sin(f[0] * 3 * yy[..., None] + p[0]) * np.cos(f[1] * 3 * xx[..., None] + p[1])
                   + 0.35 * rng.normal(size=(h, w, c)))
            imgs.append(np.clip(img, -1, 1))
        labels = rng.integers(0, 2, n)
        labels[:2] = (0, 1)                       # both classes present
        out[name] = (np.asarray(imgs, np.float64), labels.astype(np.int64))
    return out


def _cases():
    """(set, machine, boundary, k, t, label, query kind). Query kinds: "near" = a·(a training
    image) + b·noise (the weights concentrate), "far" = pure noise scaled by 3 (far from
    every candidate: large logits, the max subtraction matters)."""
    cases = []
    for t in (0.3, 0.7):
        for q in ("near", "far"):
            cases += [("grey9", "els", "zeros", k, t, None, q) for k in (3, 5, 7, 9)]
            cases += [("grey9", "els", "circular", k, t, None, q) for k in (3, 5, 9)]
            cases += [("grey9", "local", None, k, t, None, q) for k in (3, 5)]
            cases += [("grey9", "ideal", None, 0, t, None, q)]
            cases += [("rgb8", "els", b, k, t, None, q) for b in ("zeros", "circular")
                      for k in (3, 5)]
            cases += [("grey12", "els", "zeros", k, t, None, q) for k in (7, 11)]
    cases += [("grey9", "els", b, 3, 0.5, 1, "near") for b in ("zeros", "circular")]
    cases += [("rgb8", "els", "zeros", 5, 0.5, 0, "near"), ("grey9", "local", None, 3, 0.5, 1,
                                                            "near")]
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, help="checkout of Kambm/convolutional_diffusion")
    ap.add_argument("--out", default="tests/data/authors_golden.npz")
    args = ap.parse_args()
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset
    torch.set_default_dtype(torch.float64)
    theirs = _import_theirs(os.path.abspath(args.repo))
    schedule = theirs.cosine_noise_schedule            # β(t), their "legacy" cosine
    sets = _training_sets(np)
    rng = np.random.default_rng(1)
    arrays, meta = {}, []
    for name, (imgs, labels) in sets.items():
        arrays[f"{name}_images"] = imgs.astype(np.float32)
        arrays[f"{name}_labels"] = labels
    for i, (name, machine, boundary, k, t, label, kind) in enumerate(_cases()):
        imgs, labels = sets[name]
        n, h, w, c = imgs.shape
        # Their loaders read float64 NCHW tensors; one batch (size > N: see the docstring).
        data = TensorDataset(torch.tensor(imgs.transpose(0, 3, 1, 2)), torch.tensor(labels))
        kw = dict(batch_size=4 * n, image_size=h, channels=c, schedule=schedule)
        if machine == "ideal":
            module = theirs.IdealScoreModule(data, **kw)
        elif machine == "local":
            module = theirs.LocalScoreModule(data, kernel_size=k, **kw)
        elif boundary == "circular":
            module = theirs.LocalEquivScoreModule(data, kernel_size=k, **kw)
        else:
            module = theirs.LocalEquivBordersScoreModule(data, kernel_size=k, **kw)
        b2 = float(schedule(torch.tensor(t)))
        a = (1 - b2) ** 0.5
        if kind == "near":
            x = a * imgs[rng.integers(n)] + b2 ** 0.5 * rng.normal(size=(h, w, c))
        else:
            x = 3.0 * rng.normal(size=(h, w, c))
        x = x.astype(np.float32).astype(np.float64)     # the test feeds float32
        xt = torch.tensor(x.transpose(2, 0, 1)[None])
        with torch.no_grad():
            s = module(torch.tensor([t]), xt, label=label, device=torch.device("cpu"), k=k)
        s = s.numpy()[0].transpose(1, 2, 0)
        x0 = (x + b2 * s) / a
        if not np.all(np.isfinite(x0)):
            raise RuntimeError(f"case {i}: their output is not finite")
        arrays[f"case{i}_x"] = x.astype(np.float32)
        arrays[f"case{i}_x0"] = x0                     # float64
        meta.append({"set": name, "machine": machine, "boundary": boundary, "k": k, "t": t,
                     "label": label, "query": kind})
    # Whole samples: their ScheduledScoreMachine (DDIM on t = i/n, i = n−1 … 1, step i with
    # scales[i], the last step to t = 0) from fixed noise, scales[0] unused by their loop.
    samples = []
    imgs, labels = sets["grey9"]
    n, h, w, c = imgs.shape
    scales = [3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 9, 9, 9, 9, 9, 9, 9]
    data = TensorDataset(torch.tensor(imgs.transpose(0, 3, 1, 2)), torch.tensor(labels))
    x_T = rng.normal(size=(2, h, w, c)).astype(np.float32)
    for boundary in ("zeros", "circular"):
        cls = (theirs.LocalEquivBordersScoreModule if boundary == "zeros"
               else theirs.LocalEquivScoreModule)
        module = cls(data, kernel_size=3, batch_size=4 * n, image_size=h, channels=c,
                     schedule=schedule)
        sampler = theirs.ScheduledScoreMachine(module, in_channels=c, imsize=h,
                                               noise_schedule=schedule, score_backbone=True,
                                               scales=scales)
        with torch.no_grad():       # one noise image per call: their LS broadcasts a_t
            out = torch.cat([sampler(torch.tensor(x_T[i:i + 1].transpose(0, 3, 1, 2)
                                                  .astype(np.float64)),
                                     device=torch.device("cpu")) for i in range(len(x_T))])
        j = len(samples)
        arrays[f"sample{j}_x_T"] = x_T
        arrays[f"sample{j}_x0"] = out.numpy().transpose(0, 2, 3, 1)
        samples.append({"set": "grey9", "machine": "els", "boundary": boundary,
                        "scales": scales})
    try:
        commit = subprocess.run(["git", "-C", args.repo, "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    arrays["meta"] = np.asarray(json.dumps({"cases": meta, "samples": samples, "repo": "Kambm/convolutional_diffusion",
                                            "commit": commit, "torch": torch.__version__,
                                            "dtype": "float64"}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(json.dumps({"cases": len(meta), "samples": len(samples), "out": args.out, "commit": commit,
                      "bytes": os.path.getsize(args.out)}))


if __name__ == "__main__":
    main()
