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


_REFAULTS = """
import ctypes, resource, sys, threading
{setup}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 96 << 20            # one step's temporaries: over glibc's 32 MiB mmap threshold cap

def cycle():
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    libc.free(p)

faults = []

def step():             # as XLA:CPU does it: from a worker thread, the same block each step
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=step)
thread.start()
thread.join()
print(faults[0])
"""


def _refaults(setup, **env):
    """Page faults of the second malloc/touch/free of a 96 MiB block in a worker thread."""
    environ = {k: v for k, v in os.environ.items()
               if k not in runtime.GLIBC_MALLOC_VARIABLES} | env
    out = subprocess.run([sys.executable, "-c", _REFAULTS.format(setup=setup)], env=environ,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.tf_only   # a process setting, backend-independent: run it once (the TF pass)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_configure_malloc_reuses_a_large_block_freed_by_a_worker_thread():
    pages = (96 << 20) // os.sysconf("SC_PAGE_SIZE")
    configured = "from kquant import runtime; assert runtime.configure_malloc()"
    # glibc's defaults: the block is mmap-ed afresh and zero-filled page by page
    assert _refaults("") > pages // 2
    assert _refaults(configured) < pages // 100
    # glibc settings in the environment are the user's choice: malloc left alone
    kept = "from kquant import runtime; assert runtime.configure_malloc() == {}"
    assert _refaults(kept, MALLOC_ARENA_MAX="8") > pages // 2


@pytest.mark.tf_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_entry_points_record_the_malloc_settings():
    code = ("import sys; sys.orig_argv = {!r}; import kquant; from kquant import runtime; "
            "print(runtime.settings().get('mallopt'))")
    env = {k: v for k, v in os.environ.items() if k not in runtime.GLIBC_MALLOC_VARIABLES}

    def mallopt(orig_argv):
        out = subprocess.run([sys.executable, "-c", code.format(orig_argv)], env=env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    assert mallopt([sys.executable, "-m", "benchmarks", "overhead"]) == (
        "M_ARENA_MAX=1 M_MMAP_MAX=0 M_TRIM_THRESHOLD=2147483647")
    assert mallopt([sys.executable, "train.py"]) == "None"
