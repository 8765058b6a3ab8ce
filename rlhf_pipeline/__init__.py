"""rlhf-pipeline: a data-versioned, reproducible REBEL pipeline (Gao et al., arXiv 2404.16767).

Each DVC stage in ``stages/`` is a thin entry point over this library. Importing the library sets
nothing process-wide; a stage's process settings are :mod:`rlhf_pipeline.process`'s, made by ``stages``.
"""

__version__ = "0.1.0"
