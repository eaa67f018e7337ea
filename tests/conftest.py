import os
import tempfile

import mlx.core as mx
import pytest

# The tests compare against float64 references, and MLX runs float64 on the CPU only: on a
# Mac the suite runs on the CPU device, and the Metal kernel tests select the GPU themselves.
mx.set_default_device(mx.cpu)


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)


# The op keeps the chunk sizes it measures (power_retention.tuning) in one file per machine:
# the suite, and the processes it starts, keep theirs apart from the user's.
os.environ.setdefault("POWER_RETENTION_CACHE", tempfile.mkdtemp(prefix="power-retention-tuning-"))
