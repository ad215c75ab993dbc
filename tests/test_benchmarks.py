"""Smoke tests of the benchmarks/ suite: every benchmark end to end at tiny scale,
the harness CLI (``python -m benchmarks`` and ``kquant bench``), the strategy seam.

Not timed: the numbers are checked for being finite and sane, and for the
relations that must hold whatever the speed of the machine.
"""

import json
import os
import math
import pathlib
import sys
import types

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import kquant.benchmarks as benchmarks
from kquant.benchmarks import common
from kquant.benchmarks.__main__ import main as bench_main

ROOT = pathlib.Path(__file__).resolve().parents[1]

BACKEND = keras.backend.backend()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- every benchmark at tiny scale -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run each benchmark once per module at tiny scale; skip those whose plugin is missing."""
    cache = {}

    def run(name):
        if name not in cache:
            cfg = common.BenchConfig(tiny=True, batch_size=64, seed=0,
                                     out_dir=str(tmp_path_factory.mktemp("bench")))
            try:
                cache[name] = (cfg, *benchmarks.run_benchmark(
                    name, cfg, command=f"python -m benchmarks {name} --tiny --batch-size 64"))
            except NotImplementedError as e:  # e.g. MetaQuant on torch: refused by design
                cache[name] = e
            except Exception as e:
                if benchmarks.is_missing_plugin(e):
                    cache[name] = e
                else:
                    raise
        if isinstance(cache[name], NotImplementedError):
            pytest.skip(f"{name}: not supported on the {BACKEND} backend ({cache[name]})")
        if isinstance(cache[name], Exception):
            pytest.skip(f"{name}: a plugin it needs is not installed ({cache[name]})")
        return cache[name]

    return run


@pytest.mark.slow  # on JAX, the data_parallel run of every benchmark covers this
@pytest.mark.parametrize("name", benchmarks.names())
def test_benchmark_runs_end_to_end_at_tiny_scale(name, tiny_run):
    cfg, result, folder = tiny_run(name)
    assert folder == pathlib.Path(cfg.out_dir) / result.name
    saved = json.loads((folder / "results.json").read_text())
    assert saved["name"] == result.name
    assert saved["rows"], "a benchmark must produce rows"
    assert common.sanity_problems(saved["rows"]) == []
    assert saved["meta"]["config"]["tiny"] is True
    assert saved["meta"]["environment"]["backend"] == BACKEND
    markdown = (folder / "results.md").read_text()
    assert f"python -m benchmarks {name} --tiny" in markdown
    assert markdown.count("\n|") >= len(saved["rows"]) + 1  # header, separator, one line a row
    if result.plot is not None:
        assert (folder / "plot.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow  # on JAX, the data_parallel run of every benchmark covers this
def test_estimators_trains_every_chosen_estimator_from_the_same_start(tiny_run):
    _, result, _ = tiny_run("estimators")
    rows = {r["estimator"]: r for r in result.rows}
    assert list(rows)[0] == "float"
    assert "ste" in rows
    from kquant import estimators

    packages = {p.package if p.package != "?" else p.cls.__module__.split(".")[0]
                for p in estimators.registry.info()}
    # tiny scale: STE plus one estimator of every installed plugin package
    assert {r["package"] for r in result.rows} >= packages - {"?"}
    for name, row in rows.items():
        if BACKEND == "torch" and row["package"] == "kquant-metaquant":
            assert row["status"].startswith("unsupported"), row["status"]  # TF/JAX only, by design
            continue
        assert row["status"] == "ok", f"{name}: {row['status']}"
        for key in ("test_acc", "test_loss", "train_loss", "loss_before", "step_ms", "time_vs_float"):
            assert math.isfinite(row[key]), (name, key)
    # the float twin and the STE net learn (loss on the test set goes down)
    for name in ("float", "ste"):
        assert rows[name]["test_loss"] < rows[name]["loss_before"], name
    # same initial weights, same forward quantizer: identical loss before training
    quantized = [r for r in result.rows if r["estimator"] != "float" and r["status"] == "ok"]
    for row in quantized:
        assert row["loss_before"] == pytest.approx(rows["ste"]["loss_before"], rel=1e-5), row["estimator"]
    assert rows["ste"]["time_vs_ste"] == 1.0 and rows["float"]["time_vs_float"] == 1.0
    for row in [rows["float"], *quantized]:
        assert row["time_vs_float"] == pytest.approx(row["step_ms"] / rows["float"]["step_ms"])


@pytest.mark.slow  # on JAX, the data_parallel run of every benchmark covers this
def test_overhead_times_every_variant_against_its_float_layer(tiny_run):
    _, result, _ = tiny_run("overhead")
    from kquant.benchmarks import overhead

    groups = {}
    for row in result.rows:
        groups.setdefault((row["layer"], row["size"]), {})[row["variant"]] = row
    assert {layer for layer, _ in groups} == {"dense", "conv2d"}
    for (layer, size), variants in groups.items():
        assert set(overhead.TINY_VARIANTS) | {"float_inner"} <= set(variants), (layer, size)
        float_row = variants["float"]
        assert float_row["time_vs_float"] == 1.0 == variants["float_inner"]["time_vs_float"]
        for name, row in variants.items():
            assert row["step_ms"] > 0 and row["twin"] == overhead.twin(name)
            reference = variants[row["twin"]]["step_ms"]
            assert row["time_vs_float"] == pytest.approx(row["step_ms"] / reference)
            if name.startswith("sign"):  # binary layers keep exactly the float layer's weights
                assert row["params"] == float_row["params"]
    if not overhead.larq_available():
        assert "not importable" in result.meta["larq"]
        assert not any(r["variant"].startswith("larq") for r in result.rows)


def test_overhead_variants_build_the_quantizers_they_name():
    """Each row's model is the configuration its label says: quantizer classes, bits,
    estimators, and the trainable input scale exactly for the rows timed as an inner layer."""
    from kquant import quantizers
    from kquant.benchmarks import overhead
    from kquant.benchmarks._floors import CostFloor
    from kquant.estimators.htge import HTGE
    from kquant.estimators.ste import STE, ClippedSTE

    expected = {  # variant: (kernel quantizer, input quantizer), as (class, bits, estimator)
        "float": (None, None), "float_inner": (None, None), "float_control": (None, None),
        "sign_w": ((quantizers.Sign, 1, ClippedSTE), None),
        "sign_wa": ((quantizers.Sign, 1, ClippedSTE),) * 2,
        "dorefa2_w": ((quantizers.DoReFa, 2, STE), None),
        "uniform2_w_htge": ((quantizers.Uniform, 2, HTGE), None),
        "bwn_w": ((quantizers.BWN, 1, ClippedSTE), None),
        "twn_w": ((quantizers.TWN, 2, STE), None),
        "bitnet_w": ((quantizers.BitNet, 2, STE), None),
        "stochastic_sign_w": ((quantizers.StochasticSign, 1, STE), None),
        "pact4_a": (None, (quantizers.PACT, 4, ClippedSTE)),
        "floor_pass_w": ((CostFloor, 32, STE), None),
        "floor_tanh_w": ((CostFloor, 32, STE), None),
    }
    assert set(overhead.VARIANTS) == set(expected)
    for kind, size in (("dense", (8, 4)), ("conv2d", (6, 3))):
        for name, (kernel, inputs) in expected.items():
            model = overhead._model(kind, size, overhead.VARIANTS[name], False, False,
                                    inner=name in overhead.INNER)
            scales = [layer for layer in model.layers if isinstance(layer, overhead.InputScale)]
            assert len(scales) == (name in overhead.INNER), name
            layer = model.layers[-1]
            for spec, attr in ((kernel, "kernel_quantizer"), (inputs, "input_quantizer")):
                q = getattr(layer, attr, None)
                if spec is None:
                    assert q is None, (name, attr)
                    continue
                cls, bits, estimator = spec
                assert type(q) is cls and q.precision == bits, (name, attr, q)
                assert type(q.estimator) is estimator, (name, attr, q.estimator)
            if name == "uniform2_w_htge":
                assert layer.kernel_quantizer.step is None  # learned step
            if name.startswith("floor_"):
                assert layer.kernel_quantizer.kind == name.split("_")[1], name
    assert overhead.twin("pact4_a") == "float_inner" and overhead.twin("twn_w") == "float"
    assert overhead.twin("float_control") == "float" and "float_control" not in overhead.INNER


def _alq_plan(s):
    """``[(round, phase, lr)]`` per epoch, written out from the settings alone: per round
    ``prune_epochs`` of pruning (at the coordinates lr), then the bases and coordinates
    epochs, each at its lr for the first half (rounded up) and at ``lr·decay`` after."""
    plan = []
    for r in range(1, s["rounds"] + 1):
        plan += [(r, "prune", s["coordinates_lr"])] * s["prune_epochs"]
        for phase in ("bases", "coordinates"):
            count, lr = s[f"{phase}_epochs"], s[f"{phase}_lr"]
            plan += [(r, phase, lr if e < -(-count // 2) else lr * s["decay"])
                     for e in range(count)]
    return plan


def _alq_bits(stage):
    """The I_max a timing row names (``"timing bases I_max=6 (sorted) XLA"`` → 6)."""
    return int(stage.split("I_max=")[1].split()[0])


def check_alq_rows(meta, rows):
    """The ALQ result is the configuration its settings and labels name: the float
    baseline's epochs (and, beyond one epoch, its convergence: the last quarter of its
    epochs gained less than a point of validation accuracy), every pipeline epoch's
    phase and lr as read back from the optimizer, the rounds the schedule needs, each
    round row's bits (the log's, on the 0.6× schedule down to the target) and the timed
    I_max."""
    from kquant.alq import ALQSchedule

    s = meta["settings"]
    stages = {r["stage"]: r for r in rows}
    if not meta.get("timing_only"):
        assert meta["float_epochs_trained"] == s["float_epochs"]
        accuracy = meta["float_history"]["val_accuracy"]
        assert len(accuracy) == s["float_epochs"]
        if len(accuracy) >= 8:
            settled = len(accuracy) - len(accuracy) // 4
            assert max(accuracy) - max(accuracy[:settled]) < 0.01, "float baseline not converged"
        start = stages["sketch init"]["average_bits"]
        if s["target_bits"] is not None:
            assert s["rounds"] == ALQSchedule.rounds_needed(start, s["target_bits"], s["ratio"])
        log = meta["phase_log"]
        assert [(e["round"], e["phase"]) for e in log] == [(r, p) for r, p, _ in _alq_plan(s)]
        for entry, (_, _, lr) in zip(log, _alq_plan(s)):
            assert entry["lr"] == pytest.approx(lr, rel=1e-6), entry
        for r in range(1, s["rounds"] + 1):
            bits = [e["average_bits"] for e in log if e["round"] == r][-1]
            assert stages[f"round {r}"]["average_bits"] == pytest.approx(bits)
            if s["target_bits"] is not None:
                target = max(start * s["ratio"] ** r, s["target_bits"])
                assert bits == pytest.approx(target, rel=0.02), (r, bits, target)
        if s["target_bits"] is not None:
            assert stages[f"round {s['rounds']}"]["average_bits"] <= s["target_bits"] + 1e-6
    timed = [r["stage"] for r in rows if r["stage"].startswith("timing")]
    bases = {_alq_bits(t) for t in timed if "bases" in t}
    assert bases == set(s["timing_bits"])
    coordinates = {t for t in timed if "coordinates" in t}
    assert all(f"I_max={min(6, max(s['timing_bits']))}" in t for t in coordinates) and coordinates
    for row in rows:   # memory O(n·I): no [G, n, 2^I] distance tensor (where measured, I ≥ 4)
        if row.get("distance_tensor_mib") and _alq_bits(row["stage"]) >= 4:
            assert row["peak_minus_adam_mib"] < row["distance_tensor_mib"] / 2, row


@pytest.mark.slow  # on JAX, the data_parallel run of every benchmark covers this
def test_alq_rows_train_their_labelled_schedule(tiny_run):
    _, result, _ = tiny_run("alq")
    check_alq_rows(result.meta, result.rows)


def test_committed_alq_results_are_what_their_rows_say():
    """The committed quick results (and the GPU and JAX-CPU timing runs) pass the same checks: the
    float baseline converged, every round ran its labelled phases and lrs, and the bits
    followed the schedule to the target."""
    folders = [ROOT / "benchmarks" / "results" / sub / "alq" for sub in (".", "h100", "jax_cpu")]
    for folder in folders:
        saved = json.loads((folder / "results.json").read_text())
        check_alq_rows(saved["meta"], saved["rows"])


@pytest.mark.parametrize("name", benchmarks.names())
def test_every_benchmark_declares_exactly_the_options_it_reads(name):
    """``OPTIONS`` lists each ``-o`` key the module reads (``cfg.option("k")``,
    ``option_names(cfg, "k")``, ``timing_steps(cfg)``) and nothing else, so the CLI
    refuses exactly the keys that would be ignored."""
    import inspect
    import re

    module = benchmarks.load(name)
    source = inspect.getsource(module)
    read = set(re.findall(r'cfg\.option\(\s*"(\w+)"', source))
    read |= set(re.findall(r'option_names\(\s*cfg,\s*"(\w+)"', source))
    if re.search(r"\btiming_steps\(cfg\)", source):
        read.add("timing_steps")
    assert set(module.OPTIONS) == read, name
    assert set(benchmarks.options(name)) == read | set(benchmarks.COMMON_OPTIONS)


# -- harness CLI ----------------------------------------------------------------
def _fake_benchmark(name, run, options=None):
    module = types.ModuleType(f"kquant.benchmarks.{name}")
    module.run = run
    module.OPTIONS = options or {}
    return module


@pytest.fixture
def fake_suite(monkeypatch):
    """Cheap stand-in benchmarks, so the CLI is tested without training anything."""

    def echo(cfg):
        return common.Result("echo", [{
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "quick": cfg.quick, "tiny": cfg.tiny, "strategy": cfg.strategy,
            "dataset": cfg.dataset, "bits": cfg.option("bits"), "tag": cfg.option("tag"),
        }])

    def missing(cfg):
        common.require("surely_not_an_estimator")

    def broken(cfg):
        raise RuntimeError("boom")

    fakes = {"echo": echo, "missing": missing, "broken": broken}
    for name, fn in fakes.items():
        options = {"bits": "bits", "tag": "a tag"} if name == "echo" else {}
        monkeypatch.setitem(sys.modules, f"kquant.benchmarks.{name}",
                            _fake_benchmark(name, fn, options))
    monkeypatch.setattr(benchmarks, "names", lambda: sorted(fakes))
    return fakes


def test_cli_forwards_every_option_to_the_benchmark(fake_suite, tmp_path):
    out = CliRunner().invoke(bench_main, [
        "echo", "--tiny", "--epochs", "3", "--batch-size", "16", "--seed", "7", "--full",
        "-o", "bits=2", "-o", "tag=abc", "--out-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "echo" / "results.json").read_text())
    assert saved["rows"] == [{"epochs": 3, "batch_size": 16, "seed": 7, "quick": False, "tiny": True,
                              "strategy": "default", "dataset": "digits", "bits": 2, "tag": "abc"}]
    command = saved["meta"]["command"]
    backend = keras.backend.backend()
    prefix = "" if backend == "tensorflow" else f"KERAS_BACKEND={backend} "
    assert command.startswith(prefix + "python -m benchmarks echo --tiny")
    assert "--epochs 3" in command and "-o bits=2" in command and str(tmp_path) not in command
    assert command in (tmp_path / "echo" / "results.md").read_text()


def test_cli_all_reports_skips_and_failures_without_stopping(fake_suite, tmp_path):
    out = CliRunner().invoke(bench_main, ["all", "--tiny", "--out-dir", str(tmp_path)])
    assert out.exit_code == 1  # one benchmark failed
    assert "broken: FAILED: RuntimeError: boom" in out.output
    assert "missing: skipped:" in out.output and "surely_not_an_estimator" in out.output
    assert "echo: ok" in out.output
    assert (tmp_path / "echo" / "results.json").is_file()
    assert not (tmp_path / "broken").exists()


def test_cli_rejects_bad_input_naming_the_argument(fake_suite, tmp_path):
    runner = CliRunner()
    out = runner.invoke(bench_main, ["nonesuch", "--out-dir", str(tmp_path)])
    assert out.exit_code == 2 and "NAME" in out.output and "unknown benchmark" in out.output
    out = runner.invoke(bench_main, ["echo", "-o", "novalue", "--out-dir", str(tmp_path)])
    assert out.exit_code == 2 and "--option" in out.output and "KEY=VALUE" in out.output
    out = runner.invoke(bench_main, ["echo", "-o", "bitz=2", "--out-dir", str(tmp_path)])
    assert out.exit_code == 2 and "--option" in out.output and "'bitz'" in out.output
    assert "bits (bits)" in out.output and not (tmp_path / "echo").exists()  # refused up front
    out = runner.invoke(bench_main, ["all", "-o", "bits=2", "--out-dir", str(tmp_path)])
    assert out.exit_code == 1 and "echo: ok" in out.output   # known to one of `all`: taken
    out = runner.invoke(bench_main, ["echo", "--strategy", "bogus"])
    assert out.exit_code == 2 and "--strategy" in out.output
    wrong = "data_parallel" if BACKEND == "tensorflow" else "mirrored"
    out = runner.invoke(bench_main, ["echo", "--strategy", wrong, "--out-dir", str(tmp_path)])
    assert out.exit_code == 2 and "--strategy" in out.output and BACKEND in out.output
    out = runner.invoke(bench_main, [])
    assert out.exit_code == 2 and "Missing argument NAME" in out.output
    out = runner.invoke(bench_main, ["--list"])
    assert out.exit_code == 0 and out.output.split() == ["broken", "echo", "missing"]


def test_option_check_skips_a_module_that_cannot_load(fake_suite, monkeypatch):
    """A benchmark that fails to import is reported when run, not by the option check."""
    real = benchmarks.load

    def load(name):
        if name == "broken":
            raise ImportError("no such thing")
        return real(name)

    monkeypatch.setattr(benchmarks, "load", load)
    benchmarks.check_options(["echo", "broken"], {"bits": 2, "tpu": "local"})
    with pytest.raises(ValueError, match="'nope'"):
        benchmarks.check_options(["echo", "broken"], {"nope": 1})


def test_kquant_bench_forwards_from_any_folder(fake_suite, tmp_path, monkeypatch):
    from kquant.bench import bench_command

    monkeypatch.chdir(tmp_path)  # the suite ships in the package: no checkout needed
    out = CliRunner().invoke(bench_command, ["echo", "--tiny", "-o", "bits=4", "--out-dir", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "r" / "echo" / "results.json").read_text())
    assert saved["rows"][0]["bits"] == 4 and saved["rows"][0]["tiny"] is True
    help_text = CliRunner().invoke(bench_command, ["--help"]).output
    assert "kquant bench" in help_text and "--strategy" in help_text


def test_python_m_benchmarks_from_the_repository_root_is_the_packaged_suite():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == benchmarks.names()


def test_every_benchmark_module_exposes_run():
    names = benchmarks.names()
    assert {"estimators", "overhead"} <= set(names)
    assert "common" not in names
    for name in names:
        assert callable(benchmarks.load(name).run)
    with pytest.raises(ValueError, match="Unknown benchmark 'nope'"):
        benchmarks.load("nope")


# -- strategy seam ---------------------------------------------------------------
def test_check_strategy_names_the_argument_and_the_backend():
    with pytest.raises(ValueError, match="`strategy`.*bogus"):
        common.check_strategy("bogus")
    wrong, hint = (("data_parallel", "mirrored") if BACKEND == "tensorflow"
                   else ("mirrored", "data_parallel"))
    with pytest.raises(ValueError, match=f"not available on the {BACKEND} backend.*{hint}"):
        common.check_strategy(wrong)
    assert common.check_strategy("default") == "default"


def _fit_tiny_classifier():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    common.compile_classifier(model, keras.optimizers.SGD(0.5))
    before = model.evaluate(x, y, verbose=0)[0]
    model.fit(x, y, batch_size=16, epochs=5, verbose=0)
    return model, before, model.evaluate(x, y, verbose=0)[0]


@pytest.mark.tf_only
def test_mirrored_strategy_builds_and_trains_models_in_its_scope():
    import tensorflow as tf

    with common.strategy_scope("mirrored") as strategy:
        assert isinstance(strategy, tf.distribute.MirroredStrategy)
        assert not common.jit_compile_allowed()
        model, before, after = _fit_tiny_classifier()
        assert common.environment()["strategy"] == "mirrored"
    assert model.distribute_strategy is strategy
    assert model.jit_compile is False  # XLA is not supported under MirroredStrategy
    assert after < before
    assert common.jit_compile_allowed()


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel is the JAX seam")
def test_data_parallel_distribution_on_jax():
    with common.strategy_scope("data_parallel") as dist:
        assert isinstance(dist, keras.distribution.DataParallel)
        assert keras.distribution.distribution() is dist
        _, before, after = _fit_tiny_classifier()
        assert common.environment()["replicas"] == len(keras.distribution.list_devices())
    assert keras.distribution.distribution() is None
    assert after < before


# -- helpers ---------------------------------------------------------------------
def test_sanity_problems_flags_non_finite_and_implausible_numbers():
    good = [{"name": "a", "test_acc": 0.9, "loss": 0.1, "step_ms": 2.0, "time_vs_float": 1.2,
             "acc_vs_ste": -0.05, "status": "ok", "missing": None}]
    assert common.sanity_problems(good) == []
    assert common.sanity_problems([]) == ["no rows"]
    bad = [{"test_acc": float("nan")}, {"val_acc": 101.0}, {"train_loss": -1.0},
           {"step_ms": 0.0}, {"time_vs_ste": float("inf")}]
    problems = common.sanity_problems(bad)
    assert len(problems) == 5
    assert "not finite" in problems[0] and "accuracy" in problems[1] and "loss" in problems[2]


def test_compare_step_times_gives_a_positive_median_per_model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3)).astype("float32")
    y = rng.standard_normal((16, 2)).astype("float32")
    models = {}
    for name in ("a", "b"):
        models[name] = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        models[name].compile(optimizer="sgd", loss="mse")
    times = common.compare_step_times(models, x, y, batch_size=8, steps=4, warmup=1, rounds=2)
    assert set(times) == {"a", "b"}
    assert all(math.isfinite(t) and t > 0 for t in times.values())
    assert len(common.timed_fit_steps(models["a"], x, y, 8, 3)) == 3


def test_compare_step_times_times_only_the_settled_steps_of_each_turn(monkeypatch):
    """Each turn runs ``settle`` untimed steps first (slow here: 1 s) and times the rest
    (1 ms); the first model of a round rotates."""
    calls = []

    def fake(model, x, y, batch_size, steps):
        calls.append((model, steps))
        return [1.0] * min(steps, common.SETTLE_STEPS) + [1e-3] * (steps - common.SETTLE_STEPS)

    monkeypatch.setattr(common, "timed_fit_steps", fake)
    times = common.compare_step_times({"a": "A", "b": "B"}, None, None, 8, steps=4, warmup=2,
                                      rounds=2)
    assert times == {"a": 1e-3, "b": 1e-3}
    assert calls[:2] == [("A", 2), ("B", 2)]   # warm-up: compilation, not timed
    turn = common.SETTLE_STEPS + 2
    assert calls[2:] == [("A", turn), ("B", turn), ("B", turn), ("A", turn)]


def test_require_names_the_missing_plugin_and_its_package():
    common.require("ste", "uniform")
    with pytest.raises(common.MissingPlugin, match="'no_such_thing' is not installed"):
        common.require("no_such_thing")
    with pytest.raises(common.MissingPlugin, match="module 'no_such_module_xyz'"):
        common.require(modules=["no_such_module_xyz"])
    assert benchmarks.is_missing_plugin(common.MissingPlugin("x"))
    assert not benchmarks.is_missing_plugin(RuntimeError("x"))


def test_option_names_parses_lists_and_rejects_unknown_names():
    cfg = common.BenchConfig(tiny=True, options={"variants": "float,sign_w"})
    assert common.option_names(cfg, "variants", ["float"], ["float", "sign_w"], "overhead") == [
        "float", "sign_w"]
    assert common.option_names(cfg, "other", ["float"], ["float"], "overhead") == ["float"]
    with pytest.raises(ValueError, match=r"overhead: option `variants` names unknown \['sign_w'\]"):
        common.option_names(cfg, "variants", [], ["float"], "overhead")


# -- the suite as a user of a plain `pip install` gets it ----------------------
def test_cli_benchmark_times_help_without_heavy_imports(tiny_run):
    _, result, _ = tiny_run("cli")
    rows = {r["command"]: r for r in result.rows}
    assert {"kquant --help", "import kquant"} <= set(rows)
    assert all(0 < r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows.values())
    assert result.meta["heavy_modules_imported_by_help"] == []
    # the row named `kquant --help` runs the console script (or its `python -m` form)
    from kquant.benchmarks import cli

    assert rows["kquant --help"]["argv"] in ("kquant --help", f"{pathlib.Path(sys.executable).name}"
                                                             " -m kquant.cli --help")
    assert cli.COMMANDS["kquant --help"][-1] == "--help"
    assert all(r["runs"] == 1 for r in rows.values())   # tiny: one start-up each, a smoke test


def test_cli_benchmark_refuses_fewer_than_one_run():
    from kquant.benchmarks import cli

    with pytest.raises(ValueError, match=r"cli: option `runs` must be at least 1, got 0"):
        cli.run(common.BenchConfig(tiny=True, options={"runs": "0"}))


def test_out_dir_is_checked_before_any_benchmark_runs(fake_suite, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(benchmarks, "run_benchmark", lambda *a, **k: ran.append(a))
    (tmp_path / "afile").write_text("x")
    out = CliRunner().invoke(bench_main, ["echo", "--out-dir", str(tmp_path / "afile")])
    assert out.exit_code == 2 and "--out-dir" in out.output and "is a file" in out.output
    out = CliRunner().invoke(bench_main, ["echo", "--out-dir", str(tmp_path / "afile" / "sub")])
    assert out.exit_code == 2 and "--out-dir" in out.output and "cannot be created" in out.output
    assert ran == []


@pytest.mark.slow
@pytest.mark.tf_only
def test_kquant_bench_from_an_installed_wheel_in_a_temporary_folder(tmp_path):
    """Build a (non-editable) wheel, install it without dependencies into a folder of its
    own and run `kquant bench estimators --tiny` from an unrelated folder."""
    import shutil
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kquant", src / "kquant",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("kquant-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "kquant" / "benchmarks" / "estimators.py").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, kquant; assert kquant.__file__.startswith(sys.argv[1]), kquant.__file__; "
            "from kquant.cli import main; sys.argv = ['kquant'] + sys.argv[2:]; main()")
    out = subprocess.run(
        [sys.executable, "-c", code, str(site), "bench", "estimators", "--tiny",
         "-o", 'estimators=["ste"]', "--out-dir", "my-results"],
        cwd=elsewhere, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((elsewhere / "my-results" / "estimators" / "results.json").read_text())
    assert {r["estimator"] for r in saved["rows"]} >= {"float", "ste"}
    assert all(r["status"] == "ok" for r in saved["rows"])


@pytest.mark.core
def test_results_are_written_and_the_missing_plot_is_named_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    result = common.Result("plotted", [{"acc": 0.5}], plot=lambda path: pytest.fail("drew"))
    with pytest.warns(UserWarning, match=r"plot.png not drawn: matplotlib .*kquant\[plots\]"):
        folder = common.write_result(result, common.BenchConfig(tiny=True, out_dir=str(tmp_path)))
    assert json.loads((folder / "results.json").read_text())["rows"] == [{"acc": 0.5}]
    assert "plot.png not drawn" in (folder / "results.md").read_text()
    assert not (folder / "plot.png").exists()
    from kquant.cli import main as kquant_main

    out = CliRunner().invoke(kquant_main, ["plot", "estimators", "-o", str(tmp_path / "figs")])
    assert out.exit_code == 1 and "pip install 'kquant[plots]'" in out.output


@pytest.mark.core
def test_recorded_command_names_a_non_default_backend(monkeypatch):
    import keras

    from kquant.benchmarks.common import format_command

    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    assert format_command(["overhead", "--quick"]) == "python -m benchmarks overhead --quick"
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert format_command(["overhead", "-o", "timing_steps=60"]) == (
        "KERAS_BACKEND=jax python -m benchmarks overhead -o timing_steps=60")


@pytest.mark.core
def test_recorded_command_names_a_repository_output_folder(tmp_path):
    """A results folder of the repository (``--out-dir benchmarks/results/jax_cpu``) is part
    of the command that reproduces it; the default folder and a machine's absolute path
    are not written."""
    from kquant.benchmarks.__main__ import _rebuild_argv
    from kquant.benchmarks.common import BenchConfig

    def argv(out_dir):
        return _rebuild_argv("overhead", BenchConfig(out_dir=out_dir), ["timing_steps=60"])

    assert argv("benchmarks/results/jax_cpu") == [
        "overhead", "--quick", "--out-dir", "benchmarks/results/jax_cpu", "-o", "timing_steps=60"]
    assert argv("benchmarks/results") == ["overhead", "--quick", "-o", "timing_steps=60"]
    assert "--out-dir" not in argv(str(tmp_path))
