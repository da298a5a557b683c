"""The ``els-jax`` command, run in-process (``cli.main``): a bad input is one line
``els-jax: error: ...`` on stderr and exit status 2, ``--debug`` shows the traceback, a bug
always does; ``sample`` runs end to end and offers every machine of the library."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax import cli


def _user_error(capsys, argv) -> str:
    """Runs ``els-jax argv``, expecting a user error: exit status 2, one line on stderr (apart
    from third-party log lines such as tfds's "WARNING:absl:..."), no traceback."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING:")]
    assert len(lines) == 1 and lines[0].startswith("els-jax: error: "), err
    return lines[0]


def test_unknown_data_set(capsys, tmp_path):
    line = _user_error(capsys, ["sample", "--dataset", "cifar100", "--out", str(tmp_path)])
    assert "unknown data set 'cifar100'" in line and "digits" in line and ".npz" in line
    line = _user_error(capsys, ["sample", "--dataset", str(tmp_path / "none.npz")])
    assert "no such .npz file" in line


def test_data_not_prepared_offline(capsys, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    empty = str(tmp_path / "tfds")
    os.makedirs(empty)
    for argv in (["sample", "--dataset", "cifar10", "--data-dir", empty],
                 ["reproduce", "--dataset", "cifar10", "--data-dir", empty,
                  "--out", str(tmp_path / "run"), "--no-progress"]):
        line = _user_error(capsys, argv)
        assert "'cifar10'" in line and "not prepared" in line
        assert "tfds build cifar10" in line and "--data-dir" in line    # what to do
    assert not (tmp_path / "run").exists()                # nothing written before the check


def test_even_patch_size_and_flags_of_other_machines(capsys, tmp_path):
    line = _user_error(capsys, ["sample", "--machine", "els", "--k", "4", "--steps", "2",
                                "--num", "2", "--out", str(tmp_path)])
    assert "odd" in line and "got 4" in line
    line = _user_error(capsys, ["sample", "--machine", "gaussian", "--k", "3"])
    assert "--k" in line and "local / els" in line and "gaussian" in line
    line = _user_error(capsys, ["sample", "--machine", "els", "--sigma", "1"])
    assert "--sigma" in line and "els_soft" in line
    line = _user_error(capsys, ["sample", "--label", "12"])
    assert "--label 12" in line
    assert not os.listdir(tmp_path)                       # nothing written


def test_missing_checkpoint_and_config_file(capsys, tmp_path):
    run = tmp_path / "run"
    line = _user_error(capsys, ["reproduce", "--checkpoint", str(tmp_path / "nonexistent"),
                                "--out", str(run)])
    assert "--checkpoint" in line and "no such directory" in line and "els-jax train" in line
    assert not run.exists()                               # checked before the run is made
    line = _user_error(capsys, ["reproduce", "--checkpoint", str(tmp_path), "--out", str(run),
                                "--no-progress"])
    assert "no config.json" in line and "els-jax train --workdir" in line
    line = _user_error(capsys, ["train", "--config", str(tmp_path / "nope.py"),
                                "--workdir", str(tmp_path / "w")])
    assert "no such config file" in line
    line = _user_error(capsys, ["mosaic", "--run", str(tmp_path)])
    assert "--run" in line and "els-jax reproduce" in line


def test_debug_shows_the_traceback(capsys):
    argv = ["sample", "--machine", "els", "--k", "4", "--steps", "2", "--num", "2"]
    for debug_argv in (["--debug"] + argv, argv + ["--debug"]):
        with pytest.raises(ValueError, match="odd"):
            cli.main(debug_argv)
    assert cli.build_parser().parse_args(argv).debug is False


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """ValueError / FileNotFoundError count as user errors only when raised on purpose by
    els_jax's own code; the same types from elsewhere (here numpy) are bugs."""
    import els_jax as ej

    def broken(*args, **kwargs):
        return np.zeros(3).reshape(2)                     # ValueError raised inside numpy
    monkeypatch.setattr(ej, "load_dataset", broken)
    with pytest.raises(ValueError, match="reshape"):
        cli.main(["sample", "--out", str(tmp_path)])

    def missing(*args, **kwargs):
        raise KeyError("not a user error")
    monkeypatch.setattr(ej, "load_dataset", missing)
    with pytest.raises(KeyError):
        cli.main(["sample", "--out", str(tmp_path)])


def test_sample_offers_every_machine_of_the_library():
    from els_jax.machines.factory import MACHINES
    assert set(MACHINES) >= {"ideal", "equivariant", "local", "els", "gaussian", "nearest",
                             "pca_locality", "els_soft"}
    for kind in MACHINES:
        assert cli.build_parser().parse_args(["sample", "--machine", kind]).machine == kind
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sample", "--machine", "wiener"])
    for kind, argv, expected in (
            ("els", [], {"scales": cli.DEFAULT_K}),
            ("local", ["--k", "5"], {"scales": 5}),
            ("gaussian", ["--rank", "8"], {"rank": 8}),
            ("pca_locality", ["--tau", "0.1"], {"tau": 0.1}),
            ("nearest", [], {}), ("ideal", [], {}),
            ("els_soft", ["--sigma", "1,2", "--k-max", "7"], {"sigmas": (1.0, 2.0), "k_max": 7}),
            ("scfdm", ["--temperature", "0.5", "--perturbations", "4", "--noise-scale", "0.2",
                       "--top-k", "50"],
             {"temperature": 0.5, "num_perturb": 4, "noise_scale": 0.2, "top_k": 50})):
        args = cli.build_parser().parse_args(["sample", "--machine", kind] + argv)
        assert cli._machine_options(args) == expected, kind
    args = cli.build_parser().parse_args(["sample", "--machine", "els_soft"])
    assert set(cli._machine_options(args)) == {"sigmas", "k_max"}
    args = cli.build_parser().parse_args(["sample", "--machine", "ideal", "--top-k", "3"])
    with pytest.raises(ValueError, match="--top-k is an option of --machine scfdm"):
        cli._machine_options(args)


def test_sample_takes_one_patch_size_per_step(tmp_path, capsys):
    """--k 5,3 (index 0 = the last step) samples two steps with the ELS machine of those
    sizes; a list of another length than --steps, or an even size, is a clear error."""
    args = cli.build_parser().parse_args(["sample", "--machine", "els", "--k", "5,3"])
    options = cli._machine_options(args)
    assert options == {"scales": (5, 3)} and cli._sample_steps(None, options) == 2
    assert cli._sample_steps(None, {"scales": 5}) == 20
    assert cli._sample_steps(7, {"sigmas": 1.0}) == 7
    with pytest.raises(ValueError, match="--k gives 2 per-step values but --steps is 3"):
        cli._sample_steps(3, options)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sample", "--machine", "els", "--k", "3,x"])
    capsys.readouterr()                                   # argparse's usage message
    line = _user_error(capsys, ["sample", "--machine", "els", "--k", "3,4"])
    assert "odd" in line and "4" in line
    out = tmp_path / "els"
    assert cli.main(["sample", "--machine", "els", "--boundary", "zeros", "--k", "5,3",
                     "--num", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["scales"] == [5, 3]
    with np.load(out / "samples.npz") as f:
        samples, x_T, times = f["samples"], f["x_T"], f["times"]
    np.testing.assert_allclose(times, np.asarray(ej.uniform_times(2)))
    images, _ = ej.load_dataset("digits")
    machine = ej.make_machine("els", images, scales=[5, 3], boundary="zeros")
    want = ej.sample(machine, jnp.asarray(x_T), ej.uniform_times(2))
    np.testing.assert_allclose(samples, np.asarray(want), atol=1e-5)


def test_sample_scfdm_under_heun_on_a_karras_grid(tmp_path, capsys):
    """The family and the solver of issue 21 from the command line: the machine gets its key
    from --seed, the run is deterministic, and the grid written is Karras's."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli.main(["sample", "--machine", "scfdm", "--solver", "heun", "--grid", "karras",
                         "--steps", "3", "--num", "2", "--out", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["solver"] == "heun" and summary["grid"] == "karras"
        with np.load(out / "samples.npz") as f:
            runs.append((f["samples"], f["times"]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_allclose(runs[0][1], np.asarray(ej.karras_times(3)))
    assert np.all(np.isfinite(runs[0][0])) and np.abs(runs[0][0]).max() < 2.0


@pytest.mark.parametrize("machine", ["gaussian", "nearest"])
def test_sample_end_to_end(machine, tmp_path, capsys):
    out = tmp_path / machine
    assert cli.main(["sample", "--machine", machine, "--steps", "2", "--num", "4",
                     "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["machine"] == machine and summary["out"] == str(out)
    with np.load(out / "samples.npz") as f:
        samples, x_T, nearest = f["samples"], f["x_T"], f["nearest_dist"]
    # The PNG is the samples' grid: 2×2 images of 8×8, 1-pixel white borders, each pixel
    # repeated ×8 (short side 17 → 136, at most ×8); grey = (x + 1)/2 in 8 bits.
    from PIL import Image
    with Image.open(out / "samples.png") as png:
        assert png.mode == "L" and png.info["Title"].startswith(f"{machine} machine")
        grid = np.asarray(png)[::8, ::8].astype(np.float64) / 255.0
    assert grid.shape == (19, 19) and np.all(grid[0] == 1.0) and np.all(grid[:, 9] == 1.0)
    for idx in range(4):
        r, c = divmod(idx, 2)
        want = np.clip((samples[idx, ..., 0] + 1.0) / 2.0, 0.0, 1.0)
        np.testing.assert_allclose(grid[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c], want,
                                   atol=0.5 / 255 + 1e-6)
    assert samples.shape == x_T.shape == (4, 8, 8, 1)
    assert np.all(np.isfinite(samples)) and np.abs(samples - x_T).max() > 0.5
    assert np.abs(samples).max() < 2.0                    # images, not noise
    if machine == "nearest":                              # it returns training images
        assert nearest.max() < 1e-3


def test_the_cli_keeps_compiled_programs_across_processes(tmp_path):
    """enable_compilation_cache (what every els-jax command calls first) points JAX's
    persistent cache at $ELS_JAX_CACHE/xla, and a program compiled in one process is written
    there; ELS_JAX_COMPILE_CACHE=0 leaves it off. In subprocesses: it changes global config."""
    import subprocess
    import sys
    code = ("import jax, jax.numpy as jnp\n"
            "from els_jax import cli\n"
            "d = cli.enable_compilation_cache()\n"
            "print(d, jax.config.jax_compilation_cache_dir)\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
            "f = jax.jit(lambda x: jnp.sin(x) @ x.T)\n"
            "f(jnp.ones((64, 64))).block_until_ready()\n")
    env = dict(os.environ, ELS_JAX_CACHE=str(tmp_path), ELS_JAX_COMPILE_CACHE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == out[1] == str(tmp_path / "xla")
    assert any((tmp_path / "xla").iterdir()), "nothing was written to the cache"
    env["ELS_JAX_COMPILE_CACHE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "None"


def test_sampling_machines_does_not_import_the_networks():
    """``import els_jax``, the CLI's parser, the sample grid writer and a machine import
    neither Flax, optax nor orbax (~0.35 s of every ``els-jax sample``); the networks and the
    experiment load on first use of their names."""
    import subprocess
    import sys
    code = ("import sys, els_jax as ej\n"
            "from els_jax import cli\n"
            "cli.build_parser()\n"
            "from els_jax.experiment.figures import save_image_grid\n"
            "import numpy as np\n"
            "ej.make_machine('gaussian', np.zeros((3, 4, 4, 1), np.float32))\n"
            "heavy = [m for m in ('flax', 'optax', 'orbax') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert ej.UNet.__module__ == 'els_jax.nets.networks' and 'flax' in sys.modules\n"
            "assert callable(ej.reproduce)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
