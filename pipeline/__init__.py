"""clipline: a reproducible DVC pipeline for CLIP-style models."""

import os

# Set before torch loads its OpenMP runtime (GNU libgomp in PyPI's wheels; every stage imports this
# package first). By default an OpenMP thread that runs out of work spins ~300,000 times before it
# sleeps; on cores shared with other jobs (a laptop, CI) it burns the time slice that the thread it
# waits for needs. With 1,000 spins a training epoch of the default run took 0.6x the time beside
# one busy process on 2 cores (5.1-5.2 s against 8.5-8.8 s) and 1.07x on a quiet machine (median
# of 3: 3.03 s against 2.83 s); sleeping at once (OMP_WAIT_POLICY=PASSIVE) was as good under load
# but 1.25x on a quiet machine (README, "Speed"). Thread waiting changes timing only, never
# results. Any OMP_WAIT_POLICY or GOMP_SPINCOUNT already in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
