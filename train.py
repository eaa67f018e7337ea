"""The trainer is not written yet (issue 4: `python train.py --model ultra-tiny`).

Until then `make run` (demo.py) shows the op itself.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: the trainer is not implemented yet (see issue 4); run `make run` "
             "for the power retention demo.")
