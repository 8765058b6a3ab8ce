"""Memory allocator: the stages with the package's malloc settings against glibc's defaults.

``import rlhf_pipeline`` makes glibc's malloc keep freed memory (``rlhf_pipeline/__init__.py``).
This runs the default pipeline's ``ref_logprobs@iter_1`` and ``train@iter_1`` commands (and
``generate@iter_1`` if asked), as ``dvc.yaml`` resolves them, on their real inputs (run it after
``make repro``), each twice, one after another: once with glibc's
defaults (``GLIBC_TUNABLES=glibc.malloc.perturb=0``: a malloc setting of the user's, which makes the
package leave malloc alone, and whose value is glibc's default) and once as the pipeline runs them.
Outputs go to a temporary folder; the script checks that both runs wrote the same bytes.

    python bench/allocator.py [--stages generate ref_logprobs train]   # default: ref_logprobs train

Prints each run's wall time (the stage's own ``seconds`` metric and the process's), system time,
minor page faults and peak RSS, then the ratio glibc default / package setting per stage. Nothing
else may run beside it: the ratio is only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf_pipeline.process import is_malloc_setting

ROOT = Path(__file__).resolve().parent.parent


def commands(out: Path, stages: list[str]) -> dict[str, tuple[list[str], list[Path], Path]]:
    """Each stage's command on iteration 1's inputs as ``dvc.yaml`` resolves it, its outputs moved
    under ``out``; the outputs (files or folders) whose bytes the two runs must share (the cached
    ones: not its metrics or logs, which hold timings); and its metrics file."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        resolved = {s.addressing: s for s in repo.index.stages}
    found = {}
    for name in stages:
        stage = resolved[f"{name}@iter_1"]
        argv = shlex.split(stage.cmd)
        if argv[0] != "python":
            raise SystemExit(f"{stage.addressing}: expected a python command, got {stage.cmd!r}")
        argv[0] = sys.executable
        compared = []
        for o in stage.outs:  # every output to the scratch folder, nothing in the workspace touched
            moved = out / Path(o.def_path).name
            if o.def_path not in argv:
                raise SystemExit(f"{stage.addressing}: output {o.def_path} is not an argument of {stage.cmd!r}")
            argv[argv.index(o.def_path)] = str(moved)
            if o.use_cache and not o.metric:
                compared.append(moved)
        metrics = [out / Path(o.def_path).name for o in stage.outs if o.metric]
        found[name] = (argv, compared, metrics[0])
    return found


def run(stage: str, env: dict[str, str], out: Path) -> dict:
    """Run one stage command; its wall time (seconds), system time, minor faults, peak RSS (MB), digest."""
    cmd, outputs, metrics_file = commands(out, [stage])[stage]
    log = out / f"{stage}.log"  # a file, not a pipe: a full pipe would block the stage's progress bar
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} failed:\n{log.read_text()[-3000:]}")
    metrics = json.loads(metrics_file.read_text())
    files = [f for p in outputs for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
    digest = hashlib.md5(b"".join(f.read_bytes() for f in files)).hexdigest()
    return {"stage_seconds": metrics["seconds"], "wall": wall, "sys": usage.ru_stime,
            "faults": usage.ru_minflt, "rss_mb": usage.ru_maxrss / 1024, "md5": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", default=["ref_logprobs", "train"], choices=["generate", "ref_logprobs", "train"])
    args = ap.parse_args()
    for needed in ("models/base", "data/iter_1/pairs.parquet", "data/iter_1/ref_logprobs.parquet"):
        if not (ROOT / needed).exists():
            raise SystemExit(f"{needed} is missing: run `make repro` first")
    base_env = {k: v for k, v in os.environ.items() if not is_malloc_setting(k)}
    settings = {"glibc default": {**base_env, "GLIBC_TUNABLES": "glibc.malloc.perturb=0"},
                "package": base_env}
    for stage in args.stages:
        results = {}
        for name, env in settings.items():
            with tempfile.TemporaryDirectory(prefix="bench-allocator-") as tmp:
                r = results[name] = run(stage, env, Path(tmp))
            print(f"{stage:12s} {name:13s}: stage {r['stage_seconds']:6.1f} s, process {r['wall']:6.1f} s, "
                  f"system {r['sys']:5.1f} s, {r['faults']:>9,} minor faults, peak RSS {r['rss_mb']:6.0f} MB",
                  flush=True)
        same = results["glibc default"]["md5"] == results["package"]["md5"]
        ratio = results["glibc default"]["stage_seconds"] / results["package"]["stage_seconds"]
        print(f"{stage:12s} ratio glibc default / package: {ratio:.2f}x; outputs "
              f"{'identical' if same else 'DIFFER'}", flush=True)
        if not same:
            raise SystemExit(f"{stage}: the allocator setting changed the output")


if __name__ == "__main__":
    main()
