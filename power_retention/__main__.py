"""``python -m power_retention``: which BLAS MLX uses here; ``-- CMD ...`` runs CMD with a fast one."""

import os
import sys

from .cpu_tuning import fast_blas_environment, loaded_blas, openblas_library


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv:
        os.execvpe(argv[0], argv, fast_blas_environment())
    library = openblas_library()
    print(f"BLAS in use:        {loaded_blas()}")
    print(f"system OpenBLAS:    {library or 'not found (apt-get install libopenblas0-pthread)'}")
    if library:
        core = fast_blas_environment().get("OPENBLAS_CORETYPE")
        print(f"its kernels here:   {core or 'as OpenBLAS picks them'}"
              f"{' (OPENBLAS_CORETYPE)' if core else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
