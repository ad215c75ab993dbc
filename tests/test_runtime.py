"""Backend process settings made by kquant's entry points (kquant.runtime)."""

import os
import subprocess
import sys

import pytest

from kquant import runtime


@pytest.mark.core
def test_configure_sets_defaults_keeps_user_values_and_waits_for_no_backend(monkeypatch):
    environ = {}
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    assert runtime.configure(environ) == runtime.DEFAULTS == environ
    mine = {"TF_CPU_ALLOCATOR_USE_BFC": "false"}
    assert runtime.configure(mine) == {"TF_CPU_ALLOCATOR_USE_BFC": "false"}
    monkeypatch.setitem(sys.modules, "tensorflow", object())   # loaded: too late to matter
    untouched = {}
    assert runtime.configure(untouched) == {} and untouched == {}


def _allocator_setting(orig_argv, argv0="-c"):
    """TF_CPU_ALLOCATOR_USE_BFC after ``import kquant`` in a fresh process started as
    ``orig_argv`` / ``sys.argv[0]`` (the variable itself removed from its environment)."""
    code = ("import sys; sys.orig_argv = {!r}; sys.argv[0] = {!r}; import kquant, os; "
            "print(os.environ.get('TF_CPU_ALLOCATOR_USE_BFC'))").format(orig_argv, argv0)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.tf_only   # a TensorFlow setting; fresh interpreters, so run it once (the TF pass)
def test_entry_points_configure_and_a_library_import_does_not():
    assert _allocator_setting([sys.executable, "-m", "benchmarks", "overhead"]) == "true"
    assert _allocator_setting(["/venv/bin/kquant", "fit"], argv0="/venv/bin/kquant") == "true"
    assert _allocator_setting([sys.executable, "train.py"], argv0="train.py") == "None"
