import sys

import pytest

from power_retention.cpu_backend import fast_blas_environment, openblas_library
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
    code = ("import os, mlx.core; from power_retention.cpu_backend import loaded_blas; "
            "print(loaded_blas()); print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    blas, timeout = run_python(code, launcher=(sys.executable, "-m", "power_retention", "--")).splitlines()
    assert blas.startswith("OpenBLAS (") and timeout == "4"
