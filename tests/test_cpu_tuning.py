"""The Linux CPU tuning: what the fast-BLAS launcher does, and that nothing happens without it."""

import sys

import pytest

from power_retention.cpu_tuning import (_cpu_flags, _KERNELS_BEFORE_AVX2, fast_blas_environment,
                                        kernels_for_this_cpu, openblas_library)
from tests.helpers import run_python

needs_openblas = pytest.mark.skipif(openblas_library() is None,
                                    reason="no system OpenBLAS (apt-get install libopenblas0-pthread)")


@needs_openblas
def test_fast_environment_preloads_openblas_and_stops_its_threads_spinning():
    env = fast_blas_environment({"LD_PRELOAD": "/elsewhere/libother.so"})
    assert env["LD_PRELOAD"].split(":") == [openblas_library(), "/elsewhere/libother.so"]
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "4"


@needs_openblas
def test_fast_environment_keeps_the_users_thread_timeout():
    assert fast_blas_environment({"OPENBLAS_THREAD_TIMEOUT": "20"})["OPENBLAS_THREAD_TIMEOUT"] == "20"


def test_opting_out_leaves_the_environment_alone():
    env = {"POWER_RETENTION_NO_FAST_BLAS": "1", "PATH": "/bin"}
    assert fast_blas_environment(env) == env


@needs_openblas
def test_a_command_run_through_the_module_gets_openblas():
    code = ("import os, mlx.core; from power_retention.cpu_tuning import loaded_blas; "
            "print(loaded_blas()); print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    blas, timeout = run_python(code, launcher=(sys.executable, "-m", "power_retention", "--")).splitlines()
    assert blas.startswith("OpenBLAS (") and timeout == "4"


AVX512 = frozenset("fma avx avx2 avx512f avx512cd avx512bw avx512dq avx512vl".split())
AVX2 = frozenset("fma avx avx2".split())


@pytest.mark.parametrize("picked, flags, expected", [
    ("Prescott", AVX512, "SkylakeX"),      # a Xeon newer than the OpenBLAS release
    ("Sandybridge", AVX2, "Haswell"),
    ("Prescott", frozenset({"avx2"}), None),  # no FMA: nothing better to pick
    ("Prescott", frozenset({"sse3"}), None),  # an old CPU: its own pick is right
    ("SkylakeX", AVX512, None),            # recognised: left alone
    ("Zen", AVX512, None),                 # AVX2 kernels: left alone
    (None, AVX512, None),                  # could not ask OpenBLAS
], ids=lambda value: {AVX512: "avx512", AVX2: "avx2-fma"}.get(value, "-".join(sorted(value)))
     if isinstance(value, frozenset) else str(value))
def test_kernels_are_overridden_only_where_openblas_fell_back(picked, flags, expected):
    assert kernels_for_this_cpu(picked, flags) == expected


@needs_openblas
def test_the_users_kernel_choice_is_kept():
    assert fast_blas_environment({"OPENBLAS_CORETYPE": "Haswell"})["OPENBLAS_CORETYPE"] == "Haswell"


@needs_openblas
@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="a CPU without AVX2 and FMA")
def test_a_command_run_through_the_module_gets_kernels_for_this_cpu():
    """On an x86 CPU with AVX2 and FMA the preloaded OpenBLAS runs AVX2-or-later kernels,
    whether or not its release recognises the CPU."""
    code = ("import mlx.core; from power_retention.cpu_tuning import openblas_core; "
            "print(openblas_core())")
    core = run_python(code, launcher=(sys.executable, "-m", "power_retention", "--")).strip()
    assert core and core.lower() not in _KERNELS_BEFORE_AVX2


def _kept_after_freeing_256_mb(setup: str) -> int:
    """Bytes a fresh process still holds after ``setup`` and freeing a 256 MB buffer."""
    code = (
        f"{setup}\n"
        "import numpy as np\n"
        "def resident():\n"
        "    with open('/proc/self/statm') as f:\n"
        "        return int(f.read().split()[1]) * 4096\n"
        "before = resident()\n"
        "buffer = np.ones(2**26, dtype=np.float32)\n"
        "del buffer\n"
        "print(resident() - before)\n")
    return int(run_python(code))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_importing_the_packages_tunes_nothing():
    """``import power_retention, llm`` leaves malloc as glibc sets it (a freed 256 MB buffer
    goes back to the system: glibc serves it with mmap) and loads no tuning code."""
    setup = ("import sys, power_retention, llm\n"
             "assert 'power_retention.cpu_tuning' not in sys.modules")
    assert _kept_after_freeing_256_mb(setup) < 64 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_opt_in_keeps_freed_memory():
    """What ``tune_process`` changes in malloc, seen the same way: the freed buffer stays."""
    setup = "from power_retention.cpu_tuning import keep_freed_memory\nassert keep_freed_memory()"
    assert _kept_after_freeing_256_mb(setup) > 200 * 2**20

