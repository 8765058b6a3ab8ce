"""rlhf-pipeline: a data-versioned, reproducible REBEL pipeline (Gao et al., arXiv 2404.16767).

Each DVC stage in ``stages/`` is a thin entry point over this library.
"""

import os

# PyTorch's OpenMP threads spin after each parallel region, waiting for the next one (libgomp: about
# 3 ms by default). With a second CPU-bound process on a 2-core machine, every region then waits on a
# descheduled spinning thread: generation ran 3.0-3.2x slower beside one busy process. Never
# spinning (OMP_WAIT_POLICY=PASSIVE) made that 1.1-1.7x but cost a thread wake-up per region: bf16
# generation ran 1.5x slower alone on a Xeon with AMX, where a decode step is many small ops. A short
# spin (about 20 us) keeps most of the speed alone and about 2x beside one busy process; the count
# changes only waiting, never the arithmetic (bench/generate.py --compete, README "A busy machine").
# libgomp reads it when torch loads it, so it is set on import, before torch; a wait policy or spin
# count set by the user wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")

__version__ = "0.1.0"
