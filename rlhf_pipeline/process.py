"""Process-wide settings for a stage's process: OpenMP's spin and glibc's malloc.

Called once by the stage entry package (``stages/__init__.py``) and by the ``bench/`` scripts, before
torch is imported; importing the library itself changes nothing in the process. Neither setting
changes the arithmetic: outputs are the same bytes with or without them.
"""

import ctypes
import os


def configure_process() -> None:
    """Set a short OpenMP spin and make malloc keep freed memory, unless the user set either.

    PyTorch's OpenMP threads spin after each parallel region, waiting for the next one (libgomp: about
    3 ms by default). With a second CPU-bound process on a 2-core machine, every region then waits on a
    descheduled spinning thread: generation ran 3.0-3.2x slower beside one busy process. Never
    spinning (OMP_WAIT_POLICY=PASSIVE) made that 1.1-1.7x but cost a thread wake-up per region: bf16
    generation ran 1.5x slower alone on a Xeon with AMX, where a decode step is many small ops. A short
    spin (about 20 us) keeps most of the speed alone and about 2x beside one busy process
    (bench/generate.py --compete; docs/measurements-2026.md, "A busy machine"). libgomp reads it when
    torch loads it, so this must run before torch is imported; a wait policy or spin count set by the
    user wins.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "2000")
    _keep_freed_memory()


def is_malloc_setting(name: str) -> bool:
    """Whether the environment variable ``name`` configures glibc's malloc (``GLIBC_TUNABLES`` or a
    ``MALLOC_*`` name). If the user sets any, the package leaves malloc as they have it."""
    return name == "GLIBC_TUNABLES" or name.startswith("MALLOC_")


def _keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it.

    A forward pass allocates and frees activations and logits of tens to hundreds of MB. glibc serves
    each block over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free, so
    the next step faults every page in again, zeroed by the kernel: 7.9 million page faults and 27 s
    of system time in a 74 s `train` stage on the default. Serving every block from the heap
    (M_MMAP_MAX 0) and trimming its top only above 2 GiB free (M_TRIM_THRESHOLD) reuses the pages:
    the same stage took 64 s, ref_logprobs 1.14x faster (bench/allocator.py). Freed memory stays in
    the process (peak RSS 6.1 -> 6.9 GB in train). Only where memory comes from changes, never the
    arithmetic: the outputs are the same bytes.
    Any MALLOC_* variable or GLIBC_TUNABLES the user sets wins: then nothing is changed.
    """
    if any(is_malloc_setting(k) for k in os.environ):
        return
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not POSIX, or a C library without the name
        libc_version = ""
    if not libc_version.startswith("glibc"):  # musl, macOS, Windows: their own allocators
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # mallopt takes an int: 2 GiB is its largest value
