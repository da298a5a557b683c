"""Stage 4 of the experiment: the report of a run from the compared samples.

    ``write_report``   samples.npz, report.json, report.md and figures/ (``figures``)
    ``_grid_summary``  per-seed metrics, their summary and per-step agreement of one start
    ``_markdown``      report.md from the report dict
"""

from __future__ import annotations

import os
import time

import numpy as np

from els_jax.experiment import metrics
from els_jax.experiment.compare import align_steps
from els_jax.experiment.figures import report_figures
from els_jax.experiment.files import atomic_json, atomic_npz, atomic_write_text

__all__ = ["write_report"]


def _grid_summary(cfg, results) -> tuple[dict, dict, dict]:
    """Per-seed metrics, their summary, and the per-step agreements of one start t_max."""
    net = results["network"]
    names = [n for n in cfg.family_names() if n in results]      # a side start: a subset
    per_seed = {name: metrics.compare_images(net["x0"], results[name]["x0"])
                for name in names}
    summary = metrics.summarize(per_seed, reference="is", challenger="els", seed=cfg.seed)
    # Where along the trajectory the machines and the network diverge: r² of x̂_0 per step.
    t_machine = results["els"]["times"]
    align = align_steps(net["times"], t_machine)
    steps = {"times": np.asarray(t_machine[:-1]).tolist(),
             "trajectory_x0_r2": {name: [float(np.median(metrics.r_squared(
                 net["x0_hat"][j], results[name]["x0_hat"][i]))) for i, j in enumerate(align)]
                 for name in names},
             # docs/theory.md §7's single-step metric: the network applied to the machine's own x_t.
             "single_step_R2": {name: np.median(results[name]["single_step_R2"], axis=1).tolist()
                                for name in names},
             "single_step_mse": {name: np.median(results[name]["single_step_mse"],
                                                 axis=1).tolist() for name in names}}
    return per_seed, summary, steps


def write_report(cfg, tcfg, out, by_start, scales, timer, t_start, network_source):
    """report.json, report.md, samples.npz and figures; ``by_start``: {t_max: results}."""
    start = cfg.start
    results = by_start[start]
    net = results["network"]
    per_seed, summary, steps = _grid_summary(cfg, results)
    names = cfg.family_names()
    atomic_npz(os.path.join(out, "samples.npz"), network=net["x0"],
                **{name: results[name]["x0"] for name in names},
                x_T=net["x_T"], seeds=net["seeds"], labels=net["labels"],
                times_machine=results["els"]["times"], times_network=net["times"],
                **{f"{m}_{name}": v for name in names
                   for m, v in per_seed[name].items()})
    report = dict(summary)
    by_t_max = {}
    for t, res in by_start.items():
        _, s_t, _ = (per_seed, summary, steps) if t == start else _grid_summary(cfg, res)
        by_t_max[f"{t:g}"] = {k: s_t[k] for k in ("median_r", "median_r2", "median_R2",
                                                  "ci_r2", "frac_els_beats_is")}
    report.update({
        "families": list(names),
        "scales": {n: scales[n]["scales"] for n in ("els", "ls") if n in scales},
        "els_soft": scales.get("els_soft"),
        "n_seeds": cfg.n_seeds, "calib_seeds": cfg.calib_seeds, "solver": cfg.solver,
        "machine_steps": cfg.machine_steps, "network_steps": cfg.network_steps,
        "t_max": start, "t_max_protocol": "given" if cfg.t_max is not None else
        "authors' effective start (n − 1)/n (docs/theory.md §8)",
        "by_t_max": by_t_max,
        # What was actually compared: the trained network's own settings (a reused
        # checkpoint overrides the dataset/arch/padding options of the run).
        "network": network_source,
        "dataset": tcfg.dataset, "arch": tcfg.arch, "boundary": tcfg.padding,
        "conditional": bool(tcfg.conditional), "image_shape": list(tcfg.image_shape or []),
        "agreement_x0_r2": {"times": steps["times"], **steps["trajectory_x0_r2"]},
        "single_step": {"times": steps["times"], "R2": steps["single_step_R2"],
                        "mse": steps["single_step_mse"]},
        # docs/theory.md §7.3: input pixels per output pixel of the PCA-locality masks.
        "pca_locality_mask_median": None if "mask_median" not in results.get(
            "pca_locality", {}) else {"times": steps["times"],
                                      "median": results["pca_locality"]["mask_median"].tolist()},
        "per_seed": {name: {m: v.tolist() for m, v in per_seed[name].items()}
                     for name in names},
        "timings_s": timer.times,
    })
    report["elapsed_s"] = round(timer.total + (time.perf_counter() - t_start), 3)
    figs = report_figures(out, net, results, per_seed, scales, report)
    report["figures"] = figs
    atomic_json(os.path.join(out, "report.json"), report)
    atomic_write_text(os.path.join(out, "report.md"), _markdown(report, figs))
    return report


def _markdown(report, figs) -> str:
    starts = list(report["by_t_max"])
    primary = f"{report['t_max']:g}"
    lines = [f"# ELS vs network: {report['dataset']}, {report['arch']}, {report['boundary']} "
             f"padding{', conditional' if report['conditional'] else ''}"
             f"{', ' + report['solver'] + ' solver' if report.get('solver', 'ddim') != 'ddim' else ''}",
             "",
             f"Network: {report['network']}. {report['n_seeds']} seeds; machines "
             f"{report['machine_steps']} DDIM steps, network {report['network_steps']}, both "
             f"from t_max = {primary} ({report['t_max_protocol']}); calibration on "
             f"{report['calib_seeds']} other seeds. Total time {report['elapsed_s']:.0f} s.", "",
             "| " + " | ".join(["family", "median r", "median r² (95% CI)", "median R²"]
                               + [f"r² from t_max = {t}" for t in starts if t != primary]
                               + ["single-step R² (mean over steps)"])
             + " |",
             "|---|---|---|---|" + "---|" * len(starts)]
    for name in report["families"]:
        lo, hi = report["ci_r2"][name]
        cells = [name.upper(), f"{report['median_r'][name]:.3f}",
                 f"{report['median_r2'][name]:.3f} ({lo:.3f}–{hi:.3f})",
                 f"{report['median_R2'][name]:.3f}"]
        cells += [f"{report['by_t_max'][t]['median_r2'][name]:.3f}"
                  if name in report['by_t_max'][t]['median_r2'] else "–"
                  for t in starts if t != primary]
        cells.append(f"{np.mean(report['single_step']['R2'][name]):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"ELS beats IS (higher r²) on {100 * report['frac_els_beats_is']:.0f}% of "
              "the seeds" + "".join(f"; from t_max = {t}: "
                                    f"{100 * report['by_t_max'][t]['frac_els_beats_is']:.0f}%"
                                    for t in starts if t != primary) + ".", "",
              f"Calibrated ELS scales (index 0 = last step): {report['scales']['els']}", ""]
    if report.get("pca_locality_mask_median"):
        sizes = report["pca_locality_mask_median"]["median"]
        lines += [f"PCA-locality median mask size (input pixels per output pixel) from the "
                  f"first to the last step: {[round(v, 1) for v in sizes]}", ""]
    if report.get("els_soft"):
        soft = report["els_soft"]
        lines += [f"els_soft window widths σ on a {soft['k_max']}×{soft['k_max']} support "
                  f"(index 0 = last step): {[round(v, 2) for v in soft['sigmas']]}", ""]
    lines += [f"![samples]({figs['grid']})", "", f"![scatter]({figs['scatter']})", "",
              f"![scales]({figs['scales']})", "", f"![agreement]({figs['agreement']})", ""]
    return "\n".join(lines)
