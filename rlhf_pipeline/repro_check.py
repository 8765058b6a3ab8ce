"""Reproducibility checks: rerun the pipeline from scratch and compare every output's hash.

``make check-repro`` (no ``--profile``): the project's ``dvc.lock`` records the md5 of every data
and model output of the last ``dvc repro``. This reruns every stage (``dvc repro --force``) in a
scratch copy of the project (its git files and that lock) and compares, stage by stage in pipeline
order, the md5 of each output under ``data/`` and ``models/``. Metrics files hold timings and are
not compared.

``make check-repro-ci`` (``--profile envs/ci-params.yaml``): what a pull request's CI can afford.
The profile's keys are merged over ``params.yaml`` in a scratch copy, the whole iterated DAG runs
there (``dvc repro``), then again from scratch (``dvc repro --force``), and every output's md5 of
the two runs is compared. ``--summary FILE`` writes a Markdown report to post on the pull request:
that comparison, and ``dvc params diff`` / ``dvc metrics diff`` of the workspace against
``--against REV`` (the committed params and metrics of the full runs).

Usage: ``python -m rlhf_pipeline.repro_check [--keep] [--profile FILE [--against REV] [--summary
FILE]]`` from the project root. Exit status 0 when every output is byte-identical, 1 otherwise (the
first differing stage and file are printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rlhf_pipeline.errors import PipelineError

COMPARED = ("data/", "models/")


def project_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the work tree (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def scratch_copy(root: Path, dest: Path) -> Path:
    """A new git repository at ``dest`` holding the project's work tree, committed, with no DVC
    outputs, no cache and no ``dvc.lock`` of any pipeline (``classic/dvc.lock`` included: a
    committed lock names outputs that the scratch copy's cache does not hold)."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files(root):
        if Path(rel).name == "dvc.lock":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    git = ["git", "-c", "user.name=check-repro", "-c", "user.email=check-repro@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "scratch copy"], cwd=dest, check=True)
    return dest


def output_md5s(lock_path: Path) -> list[tuple[str, str, str]]:
    """(stage, output path, md5) of every compared output in ``dvc.lock``, in pipeline order.

    Raises:
        PipelineError: the lock file is missing.
    """
    if not lock_path.is_file():
        raise PipelineError(f"{lock_path}: no dvc.lock; run `make repro` first")
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    return [(stage, o["path"], o.get("md5", "")) for stage, entry in (lock.get("stages") or {}).items()
            for o in entry.get("outs") or [] if o["path"].startswith(COMPARED)]


def compare(reference: list[tuple[str, str, str]], rerun: list[tuple[str, str, str]]) -> list[tuple[str, str, str, str]]:
    """(stage, path, reference md5, rerun md5) for every output whose md5 differs or is missing
    on one side, in the reference's order."""
    new = {(s, p): m for s, p, m in rerun}
    out = [(s, p, m, new.get((s, p), "missing")) for s, p, m in reference if new.get((s, p)) != m]
    seen = {(s, p) for s, p, _ in reference}
    out += [(s, p, "missing", m) for s, p, m in rerun if (s, p) not in seen]
    return out


def check(root: Path, keep: bool = False) -> int:
    """Rerun the pipeline in a scratch copy of ``root`` and compare; returns the exit status."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--quiet", "dvc.yaml"], cwd=root,
                            env=env)  # the default pipeline: classic/dvc.yaml has a lock of its own
    if status.returncode != 0:
        raise PipelineError("the workspace has stale stages (`dvc status`): run `dvc repro` first, so that "
                            "dvc.lock describes the current code and params")
    reference = output_md5s(root / "dvc.lock")
    scratch = scratch_copy(root, Path(tempfile.mkdtemp(prefix="check-repro-")) / root.name)
    # The rerun's MLflow run goes to the scratch copy's own store, not to the user's server.
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    print(f"check-repro: dvc repro --force in {scratch}", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], cwd=scratch, env=env)
        if proc.returncode != 0:
            raise PipelineError(f"dvc repro --force failed in the scratch copy {scratch}")
        rerun = output_md5s(scratch / "dvc.lock")
    finally:
        if not keep:
            shutil.rmtree(scratch.parent, ignore_errors=True)
    differences = compare(reference, rerun)
    for stage, path, md5 in reference:
        print(f"  {stage:16s} {path:32s} {'DIFFERS' if any(d[1] == path for d in differences) else 'same'}")
    if differences:
        stage, path, ref, new = differences[0]
        print(f"check-repro: FAILED: first difference in stage '{stage}', file {path} "
              f"(dvc.lock {ref}, rerun {new}); {len(differences)} output(s) differ")
        return 1
    print(f"check-repro: OK: all {len(reference)} data and model outputs are byte-identical")
    return 0


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in: mappings key by key, everything else replaced. A
    mapping that names another variant of a tagged union (its ``name`` differs from the base's, e.g.
    ``train.objective: {name: dpo, beta: 0.1}`` over REBEL's) replaces it whole: REBEL's keys are
    not DPO's. A null over a mapping removes the key (``iterations: {iter_2: null}`` keeps one
    iteration); a null over anything else is the value null (``benchmark.num_prompts: null``)."""
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        if value is None and isinstance(old, dict):
            del out[key]
            continue
        same_variant = isinstance(old, dict) and isinstance(value, dict) and \
            value.get("name", old.get("name")) == old.get("name")
        out[key] = merged(old, value) if same_variant else value
    return out


def profile_params(root: Path, profile: Path) -> dict:
    """``root``'s ``params.yaml`` with the profile's keys merged in (:func:`merged`), validated.

    Raises:
        PipelineError: the profile is unreadable, or a merged key is invalid (before any run).
    """
    from rlhf_pipeline.params import PARAMS_FILE, parse_params

    try:
        overrides = yaml.safe_load(profile.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{profile}: cannot read the profile ({exc})") from None
    params = merged(yaml.safe_load((root / PARAMS_FILE).read_text(encoding="utf-8")), overrides)
    parse_params(params, f"{PARAMS_FILE} + {profile}")  # bad keys fail here, before minutes of work
    return params


def _dvc_markdown(root: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args, "--md"], cwd=root, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip() or "(no changes)"


def check_profile(root: Path, profile: Path, against: str | None, summary: Path | None, keep: bool = False) -> int:
    """Run the DAG twice on ``profile``'s params in a scratch copy of ``root`` and compare every
    output; optionally write the Markdown ``summary``. Returns the exit status.

    Raises:
        PipelineError: the profile is missing or invalid (before any run), or a run fails.
    """
    from rlhf_pipeline.params import PARAMS_FILE

    params = profile_params(root, profile)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    scratch = scratch_copy(root, Path(tempfile.mkdtemp(prefix="check-repro-")) / root.name)
    (scratch / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    runs = []
    try:
        for args in (["repro"], ["repro", "--force"]):
            print(f"check-repro: dvc {' '.join(args)} on {profile} in {scratch}", flush=True)
            if subprocess.run([sys.executable, "-m", "dvc", *args], cwd=scratch, env=env).returncode != 0:
                raise PipelineError(f"dvc {' '.join(args)} failed in the scratch copy {scratch}")
            runs.append(output_md5s(scratch / "dvc.lock"))
    finally:
        if not keep:
            shutil.rmtree(scratch.parent, ignore_errors=True)
    differences = compare(*runs)
    rows = [(stage, path, "DIFFERS" if any(d[1] == path for d in differences) else "same")
            for stage, path, _ in runs[0]]
    for row in rows:
        print(f"  {row[0]:22s} {row[1]:40s} {row[2]}")
    verdict = (f"FAILED: first difference in stage '{differences[0][0]}', file {differences[0][1]}; "
               f"{len(differences)} output(s) differ" if differences else
               f"OK: all {len(runs[0])} data and model outputs are byte-identical")
    print(f"check-repro: {verdict}")
    if summary is not None:
        lines = [f"## Reproducibility check ({profile})", "", f"Two runs of the whole DAG from scratch: **{verdict}**.",
                 "", "| stage | output | two runs |", "|---|---|---|"]
        lines += [f"| {s} | `{p}` | {v} |" for s, p, v in rows]
        if against:
            lines += ["", f"## Params changed against `{against}`", "",
                      _dvc_markdown(root, env, "params", "diff", against),
                      "", f"## Metrics changed against `{against}`", "",
                      _dvc_markdown(root, env, "metrics", "diff", against)]
        summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"check-repro: summary in {summary}")
    return 1 if differences else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--profile", type=Path, help="params overrides (e.g. envs/ci-params.yaml): run the DAG "
                        "twice on them in a scratch copy and compare the two runs")
    parser.add_argument("--against", help="with --profile --summary: git revision for dvc params/metrics diff")
    parser.add_argument("--summary", type=Path, help="with --profile: write a Markdown summary here")
    args = parser.parse_args(argv)
    try:
        if args.profile is not None:
            return check_profile(Path.cwd(), args.profile, args.against, args.summary, keep=args.keep)
        if args.against or args.summary:
            raise PipelineError("--against and --summary go with --profile")
        return check(Path.cwd(), keep=args.keep)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
