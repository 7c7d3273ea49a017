"""promptcli: noise-robust prompt tuning of CLIP from the command line."""

import os

__version__ = "0.1.0"

# Prompt tuning on CPU runs many small tensor operations. With OpenMP's default (active, spinning)
# wait policy, threads whose core is taken by another process stall every step: on a shared 2-core
# machine one text-encoder step (forward + backward, 2 threads) took 2.1 s spinning and 0.21 s
# passive, as fast as 1 thread. Set before torch loads OpenMP; OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
