"""``make results``: the results recipe, run as the default DAG on a params profile, recorded.

The profile (``envs/results.yaml``: more prompts, the full IFEval benchmark) is merged over
``params.yaml`` in a scratch copy of the project (``results/.workspace/``, git-ignored) whose DVC
cache is the project's own, so a stage that already ran with the same code, data and params, the
base policy's benchmark above all, is restored from DVC's run cache instead of rerun, and an
interrupted run resumes. The MLflow run (``results-<commit>``, tagged with the project's commit)
goes to the project's ``mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set. What the run produced is copied to ``results/`` for a commit: the
merged ``params.yaml``, the ``dvc.lock`` (every output's md5, for a byte-identical check of a
rerun), the metrics files of the stages that ran (:func:`recorded_files`) and ``stage_times.json`` (wall seconds per stage as run here;
0 for a stage restored from the run cache).

Usage: ``python -m rlhf_pipeline.results [--profile envs/results.yaml] [--out results] [TARGET ...]``
from the project root (targets: ``dvc repro``'s, for the tuning runs of ``envs/compare/``). Exit status
0 on success, 1 when ``dvc repro`` fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.repro_check import profile_params, scratch_copy
from rlhf_pipeline.tracking import SOURCE_COMMIT_ENV, SOURCE_DIRTY_ENV, git_info

#: The pipelines' lock files; a run's record holds those it wrote.
LOCKS = ("dvc.lock", "classic/dvc.lock", "online/dvc.lock")


def recorded_files(workspace: Path) -> list[str]:
    """What ``results/`` keeps of a run in ``workspace`` (besides ``stage_times.json``): the merged
    ``params.yaml``, each lock the run wrote, and the metrics files (JSON, TSV) those locks list as
    outputs of the stages that ran. The workspace also holds the committed metrics files of stages
    that did not run (``scratch_copy`` copies the work tree); a record of a targeted run must not
    carry them."""
    files = ["params.yaml"]
    for lock in LOCKS:
        if not (workspace / lock).is_file():
            continue
        files.append(lock)
        stages = (yaml.safe_load((workspace / lock).read_text(encoding="utf-8")) or {}).get("stages") or {}
        files += sorted({o["path"] for entry in stages.values() for o in entry.get("outs") or []
                         if "metrics/" in o["path"] and (workspace / o["path"]).is_file()})
    return files


def stage_times(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Wall seconds per stage from timestamped ``dvc repro`` output lines: a stage runs from its
    ``Running stage 'x'`` line to the next stage's line (or ``end``); a stage DVC restored from
    the run cache (``Stage 'x' is cached - skipping run``) or found unchanged takes 0."""
    starts, out = [], {}
    for t, line in lines:
        if line.startswith("Running stage '"):
            starts.append((line.split("'")[1], t))
        elif line.startswith("Stage '") and ("is cached" in line or "didn't change" in line):
            out[line.split("'")[1]] = 0.0
    for i, (name, t) in enumerate(starts):
        out[name] = round((starts[i + 1][1] if i + 1 < len(starts) else end) - t, 1)
    return out


def run_results(root: Path, profile: Path, out: Path, targets: list[str] | None = None) -> int:
    """Run the DAG on ``profile`` in the workspace and record it in ``out``; returns the exit status.
    ``targets``: ``dvc repro`` targets (with what they depend on), e.g. ``evaluate@iter_2`` for a
    tuning run that reads the validation split only; none: the whole default DAG.

    Raises:
        PipelineError: the profile is missing or its params invalid (before any run).
    """
    from rlhf_pipeline.params import PARAMS_FILE

    params = profile_params(root, profile)
    workspace = out / ".workspace"
    shutil.rmtree(workspace, ignore_errors=True)
    scratch = scratch_copy(root, workspace / root.name)
    (scratch / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(root / 'mlflow.db').resolve()}")
    git = git_info(root)
    env[SOURCE_COMMIT_ENV], env[SOURCE_DIRTY_ENV] = git["git_commit"], git["git_dirty"]
    dvc = [sys.executable, "-m", "dvc"]
    cache = (root / ".dvc" / "cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(dvc + ["cache", "dir", "--local", str(cache)], cwd=scratch, env=env, check=True)
    print(f"results: dvc repro on {profile} in {scratch} (cache {cache})", flush=True)
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(dvc + ["repro", *(targets or [])], cwd=scratch, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append((time.monotonic(), line.strip()))
    if proc.wait() != 0:
        print(f"results: dvc repro failed; the workspace is kept: {scratch}", file=sys.stderr)
        return 1
    times = stage_times(lines, time.monotonic())
    recorded = recorded_files(scratch)
    for old in ("metrics", "classic", "online"):  # a previous record's files, never the workspace
        shutil.rmtree(out / old, ignore_errors=True)
    for name in recorded:
        dest = out / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(scratch / name, dest)
    (out / "stage_times.json").write_text(json.dumps(times, indent=2) + "\n", encoding="utf-8")
    print(f"results: recorded in {out}/ ({len(recorded)} files: params, locks, metrics; stage_times.json); total "
          f"{sum(times.values()) / 60:.1f} min of stages", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=Path("envs/results.yaml"), help="params overrides")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where the run is recorded")
    parser.add_argument("targets", nargs="*", help="dvc repro targets (default: the whole default DAG), e.g. "
                        "evaluate@iter_2 or classic/dvc.yaml:evaluate_sft")
    args = parser.parse_args(argv)
    try:
        return run_results(Path.cwd(), args.profile, args.out, args.targets)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
