"""DVC stage entry points: ``python -m stages.<stage>``, run from the project root.

Each stage is a process of its own, so its process-wide settings (OpenMP's spin, malloc) are made here,
before any stage module imports torch: :func:`rlhf_pipeline.process.configure_process`.
"""

from rlhf_pipeline.process import configure_process

configure_process()
