"""rlhf-pipeline: a data-versioned, reproducible REBEL pipeline (Gao et al., arXiv 2404.16767).

Each DVC stage in ``stages/`` is a thin entry point over this library.
"""

import os

# PyTorch's OpenMP threads spin while they wait for each other. With a second CPU-bound process on
# a 2-core machine, every parallel region then waits on a descheduled spinning thread: generation
# ran 3.2x slower beside one busy process; with passive waiting 1.4x, and no slower alone
# (bench/generate.py --compete). libgomp reads this when torch loads it, so it is set on import,
# before torch; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
