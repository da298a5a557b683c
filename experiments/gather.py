"""Gathers report.json files into one table beside the paper's numbers (docs/theory.md §4).

    python experiments/gather.py runs/paper [more dirs …] [--json]

Prints a Markdown table: one row per run (data set, architecture, padding, conditional),
median r² of ELS / LS / IS against the network with bootstrap intervals, the fraction of seeds
where ELS beats IS, and the paper's median r² for the same setting where it reports one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The paper's median r² (100 seeds; network 150 steps, machines 20), docs/theory.md §4:
# (dataset, arch, padding, attention) → (ELS, IS or None).
PAPER = {
    ("mnist", "resnet", "zeros", False): (0.94, 0.61),
    ("fashion_mnist", "resnet", "zeros", False): (0.94, 0.68),
    ("cifar10", "resnet", "zeros", False): (0.95, 0.42),
    ("celeb_a", "resnet", "zeros", False): (0.96, 0.47),
    ("mnist", "unet", "zeros", False): (0.89, None),
    ("fashion_mnist", "unet", "zeros", False): (0.93, None),
    ("cifar10", "unet", "zeros", False): (0.90, None),
    ("celeb_a", "unet", "zeros", False): (0.85, None),
    ("mnist", "resnet", "circular", False): (0.77, None),
    ("cifar10", "resnet", "circular", False): (0.94, None),
    ("cifar10", "unet", "zeros", True): (0.77, None),
}


def find_reports(roots):
    for root in roots:
        if os.path.isfile(root):
            yield root
            continue
        for dirpath, _, files in os.walk(root):
            if "report.json" in files:
                yield os.path.join(dirpath, "report.json")


def _attention(report_path):
    """Whether the compared network used self-attention (from its saved training config)."""
    run = os.path.dirname(report_path)
    with open(os.path.join(run, "config.json")) as f:
        ckpt = json.load(f).get("checkpoint") or os.path.join(run, "network")
    try:
        with open(os.path.join(ckpt, "config.json")) as f:
            return bool(json.load(f).get("attention_resolutions"))
    except FileNotFoundError:
        return False


def rows(paths):
    out = []
    for path in sorted(paths):
        with open(path) as f:
            r = json.load(f)
        attn = _attention(path)
        paper = PAPER.get((r["dataset"], r.get("arch", "?"), r["boundary"], attn))
        out.append({
            "run": os.path.dirname(path), "dataset": r["dataset"], "arch": r.get("arch", "?")
            + ("+attn" if attn else ""), "padding": r["boundary"],
            "conditional": r.get("conditional", False), "n_seeds": r["n_seeds"],
            **{f"r2_{m}": r["median_r2"][m] for m in ("els", "ls", "is")},
            **{f"ci_{m}": r["ci_r2"][m] for m in ("els", "ls", "is")},
            "frac_els_beats_is": r["frac_els_beats_is"],
            "paper_els": None if paper is None else paper[0],
            "paper_is": None if paper is None else paper[1],
        })
    return out


def markdown(table) -> str:
    head = ("| run | data | net | padding | seeds | ELS r² | LS r² | IS r² | ELS>IS | "
            "paper ELS | paper IS |\n|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    lines = [head]
    for t in table:
        lo, hi = t["ci_els"]
        lines.append(f"| {t['run']} | {t['dataset']}{' (cond.)' if t['conditional'] else ''} | "
                     f"{t['arch']} | {t['padding']} | {t['n_seeds']} | {t['r2_els']:.3f} "
                     f"[{lo:.2f}, {hi:.2f}] | {t['r2_ls']:.3f} | {t['r2_is']:.3f} | "
                     f"{100 * t['frac_els_beats_is']:.0f}% | {fmt(t['paper_els'])} | "
                     f"{fmt(t['paper_is'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", help="run folders (searched recursively) or report.json")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of Markdown")
    args = p.parse_args(argv)
    table = rows(find_reports(args.roots))
    if not table:
        print(f"no report.json under {args.roots}", file=sys.stderr)
        return 1
    print(json.dumps(table, indent=1) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
