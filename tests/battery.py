"""Run the bad-input table (tests/test_bad_inputs.py) case by case, each in a fresh process,
against this tree or another checkout of the project, and count the outcomes:

- clear: the documented exception, with a message that names the argument (what the test asserts)
- unclear: another exception, or a message that does not match
- silent: no error at all (a command still running after --timeout seconds counts here)
- crash: the process died from a signal (a segfault)
- absent: the tree has no such function or module (ImportError)

    python -m tests.battery                        # this tree
    python -m tests.battery --library ../old-tree  # another checkout, same table
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TABLE = Path(__file__).resolve().parent / "test_bad_inputs.py"

# Runs in the child: load the table from this tree, the library from --library.
CHILD = r"""
import importlib.util, json, pathlib, re, subprocess, sys
name, library, tmp, timeout, table = sys.argv[1:6]
sys.path.insert(0, str(pathlib.Path(table).parent.parent))
import tests.helpers  # this tree's, which the table uses, before the library's tree comes first
sys.path[0] = library
spec = importlib.util.spec_from_file_location("bad_input_table", table)
cases = sys.modules["bad_input_table"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
cases.ROOT, cases.COMMAND_TIMEOUT = pathlib.Path(library), float(timeout)
case = cases.CASES[name]
tmp = pathlib.Path(tmp)
(tmp / "case").mkdir(); (tmp / "shared").mkdir()
try:
    case.call(cases.Context(tmp / "case", tmp / "shared"))
    outcome, message = "silent", ""
except subprocess.TimeoutExpired:
    outcome, message = "silent", f"still running after {timeout} s"
except cases.CommandCrashed as error:
    outcome, message = "crash", str(error)
except ImportError as error:
    outcome, message = "absent", str(error)
except Exception as error:
    matched = isinstance(error, case.error) and re.search(case.message, str(error))
    outcome, message = ("clear" if matched else "unclear"), f"{type(error).__name__}: {error}"
print(json.dumps({"outcome": outcome, "message": message[-400:]}))
"""


def run_case(name: str, library: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-c", CHILD, name, str(library), tmp, str(timeout),
                                 str(TABLE)], capture_output=True, text=True, cwd=tmp,
                                timeout=timeout + 240)
    if result.returncode < 0:
        return {"case": name, "outcome": "crash", "message": f"signal {-result.returncode}"}
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"case": name, "outcome": "unclear", "message": result.stderr[-400:]}
    return {"case": name, **json.loads(lines[-1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--library", type=Path, default=TABLE.parent.parent,
                        help="root of the checkout to test (default: this one)")
    parser.add_argument("--timeout", type=float, default=60,
                        help="seconds a command may run before it counts as having accepted the input")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="run the cases whose names contain this")
    parser.add_argument("--out", type=Path, help="write every case's outcome here (JSON)")
    args = parser.parse_args()

    sys.path.insert(0, str(TABLE.parent.parent))
    from tests.test_bad_inputs import CASES

    names = [name for name in CASES if args.only in name]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda name: run_case(name, args.library.resolve(), args.timeout), names))
    counts = collections.Counter(r["outcome"] for r in results)
    for r in results:
        if r["outcome"] != "clear":
            print(f"{r['outcome']:8} {r['case']}: {r['message'].splitlines()[-1] if r['message'] else ''}")
    print(f"{len(results)} cases against {args.library.resolve()}: "
          + ", ".join(f"{counts[k]} {k}" for k in ("clear", "unclear", "silent", "crash", "absent")))
    if args.out:
        args.out.write_text(json.dumps({"library": str(args.library.resolve()), "counts": counts,
                                        "cases": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
