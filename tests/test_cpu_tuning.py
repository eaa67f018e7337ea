"""The Linux CPU tuning: what the fast-BLAS launcher does, and that nothing happens without it."""

import sys

import pytest

from power_retention.cpu_tuning import fast_blas_environment, openblas_library
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

