"""MLflow tracking: one run per completed pipeline execution, and live training metrics.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the project root (a
queued ``dvc exp run`` works in a temporary copy under ``.dvc/tmp/exps/``; its runs still go to
the project's own ``mlflow.db``). Experiment: ``MLFLOW_EXPERIMENT_NAME`` if set, else
``rlhf-pipeline``. MLflow is imported only inside these functions: it is slow to import and
only the ``report`` stage (and ``train`` with ``train.mlflow_live``) need it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
DEFAULT_EXPERIMENT = "rlhf-pipeline"
#: The MLflow 3 UI opens an experiment in its model-training view (runs, charts, models) rather than
#: its GenAI view (traces, evaluations) by this tag.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow's batch limits (per log_batch call).
_MAX_PARAMS, _MAX_METRICS, _MAX_TAGS = 100, 1000, 100


def project_root(cwd: str | os.PathLike | None = None) -> Path:
    """The project folder: ``cwd``, or for a queued experiment's temporary copy
    (``<project>/.dvc/tmp/exps/...``) the project that owns the queue."""
    path = Path(cwd or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def tracking_uri(cwd: str | os.PathLike | None = None) -> tuple[str, bool]:
    """(tracking URI, whether the user set it explicitly through ``MLFLOW_TRACKING_URI``)."""
    explicit = os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return explicit, True
    return f"sqlite:///{project_root(cwd) / DEFAULT_STORE}", False


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast on an HTTP tracking server that does not answer (MLflow's own client retries
    for minutes before it gives up).

    Raises:
        PipelineError: naming the URI and what to do.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise PipelineError(f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({exc}). "
                            "The stage outputs are written; start the server (or unset MLFLOW_TRACKING_URI "
                            "for the local mlflow.db) and rerun `dvc repro`, which reruns only this stage") from None


@contextlib.contextmanager
def server_errors(uri: str):
    """Turn a tracking server's failure (it answers ``/health`` but its API errs, or the connection
    drops half-way) into one :class:`PipelineError` line: the DVC outputs are already written, so
    nothing is lost, and the next ``dvc repro`` reruns only ``report``.

    Raises:
        PipelineError: naming the URI and the server's first line of complaint.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError, ConnectionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PipelineError(f"MLFLOW_TRACKING_URI={uri}: the tracking server failed ({type(exc).__name__}: {first}). "
                            "The stage outputs are written; fix the server and rerun `dvc repro`, which reruns "
                            "only this stage") from None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys (``{"train": {"eta": 1}}`` -> ``{"train.eta": 1}``); lists
    become JSON strings."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, (list, tuple)):
        return {prefix: json.dumps(obj, sort_keys=True)}
    return {prefix: obj}


def git_info(root: Path) -> dict[str, str]:
    """Tags for the code version: commit and whether the work tree had changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()}


def dvc_output_md5s(lock_path: str | os.PathLike) -> dict[str, str]:
    """``{output path: md5}`` of every stage output recorded in ``dvc.lock``.

    Raises:
        PipelineError: the lock file is missing or not valid YAML.
    """
    try:
        lock = yaml.safe_load(Path(lock_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{lock_path}: cannot read the DVC lock file ({exc})") from None
    out = {}
    for stage in (lock.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            if "md5" in o:
                out[o["path"]] = o["md5"]
    return dict(sorted(out.items()))


#: Set by ``make results`` (:mod:`rlhf_pipeline.results`), whose DAG runs in a scratch copy: the
#: project's commit and work-tree state, which the copy's own git does not know.
SOURCE_COMMIT_ENV, SOURCE_DIRTY_ENV = "RLHF_SOURCE_COMMIT", "RLHF_SOURCE_DIRTY"


def run_tags(root: Path) -> dict[str, str]:
    """Tags every run of this project carries: git commit, DVC experiment name if any; for a
    ``make results`` run the project's commit (not its scratch copy's) and ``rlhf.run = results``."""
    tags = git_info(root)
    if os.environ.get(SOURCE_COMMIT_ENV):
        tags.update({"git_commit": os.environ[SOURCE_COMMIT_ENV],
                     "git_dirty": os.environ.get(SOURCE_DIRTY_ENV, "unknown"), "rlhf.run": "results"})
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc_exp_name"] = exp
    return tags


def _client_and_experiment(root: Path):
    """(client, experiment id) for the tracking URI of ``root``; an explicitly set server is
    checked first (:func:`check_reachable`)."""
    from mlflow.tracking import MlflowClient

    uri, explicit = tracking_uri(root)
    if explicit:
        check_reachable(uri)
        # MLflow's HTTP client retries a failing call 7 times with exponential back-off (minutes);
        # a server that fails should fail the stage in seconds. A user's own setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)  # the first call creates (migrates) a new sqlite store
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # a user's own choice of view stays
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return client, exp.experiment_id
        # The local store keeps its artifacts next to mlflow.db, not in whatever folder a stage runs in.
        location = None if uri.startswith(("http://", "https://")) else (root / "mlartifacts").as_uri()
        return client, client.create_experiment(name, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


@contextlib.contextmanager
def _store_lock(uri: str):
    """Hold an exclusive file lock beside a local sqlite store while it is opened: its first use
    creates the schema by running MLflow's migrations, and two stages doing that at once (``dvc
    queue start -j 2`` on a fresh project) failed with ``duplicate column name: step``. Other
    stores (a server) serialise themselves.

    Raises:
        PipelineError: the store is not a database MLflow can open (one line, naming the file).
    """
    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(db) + ".lock", timeout=600)
        lock.acquire()
    except OSError as exc:
        raise PipelineError(f"{db}: cannot open the MLflow store's folder ({exc.strerror or exc})") from None
    try:
        yield
    except Exception as exc:
        if isinstance(exc, PipelineError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PipelineError(f"{db}: MLflow cannot use this store ({type(exc).__name__}: {first}); move the file "
                            "away (a new store is created) or set MLFLOW_TRACKING_URI") from None
    finally:
        lock.release()


def _log_in_batches(client, run_id: str, params: dict[str, Any], metrics: list, tags: dict[str, str]) -> None:
    from mlflow.entities import Param, RunTag

    plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
    tlist = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
    for i in range(0, len(plist), _MAX_PARAMS):
        client.log_batch(run_id, params=plist[i:i + _MAX_PARAMS])
    for i in range(0, len(tlist), _MAX_TAGS):
        client.log_batch(run_id, tags=tlist[i:i + _MAX_TAGS])
    for i in range(0, len(metrics), _MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[i:i + _MAX_METRICS])


@dataclass
class RunRecord:
    """One MLflow run of a pipeline execution: the parent, or a child (an iteration, an algorithm).

    ``metrics``: ``{prefix: nested metrics}``; numbers become metrics ``<prefix>.<dotted key>``
    (no prefix for ``""``), strings become tags of the same name. ``curves``: ``{prefix: (step
    column, rows)}``; each row's other columns become step metrics ``<prefix>.<column>`` at step
    ``row[step column]`` (``train_log.loss`` per update), so the MLflow UI draws them as charts.
    """

    name: str
    metrics: dict[str, dict] = field(default_factory=dict)
    curves: dict[str, tuple[str, list[dict[str, Any]]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class DatasetRecord:
    """A DVC-tracked file a run read, for ``mlflow.log_input``: its DVC md5 is the digest."""

    name: str
    path: str
    md5: str
    context: str  # training | validation | test | benchmark
    rows: int | None = None


@dataclass
class PipelineRecord:
    """One completed pipeline execution as MLflow users read it: a parent run (params, the headline
    figures, tables, example responses, the input datasets, the final policy as a logged model) and
    a child run per iteration or algorithm (its stages' metrics, its training curves)."""

    params: dict[str, Any]
    parent: RunRecord
    children: list[RunRecord] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)
    plots: dict[str, Any] = field(default_factory=dict)
    #: ``{artifact file: {column: values}}``, logged with ``log_table`` (the UI's table view)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    #: ``{artifact file: text}`` (Markdown example responses …)
    texts: dict[str, str] = field(default_factory=dict)
    datasets: list[DatasetRecord] = field(default_factory=list)
    #: the final policy: (model name, its DVC path, its md5), logged as an MLflow logged model
    model: tuple[str, str, str] | None = None


def log_pipeline_run(record: PipelineRecord, root: Path, lock_path: Path) -> str:
    """Record one completed pipeline execution: a parent run and its child runs (``mlflow.parentRunId``).

    The parent holds every params key (flattened: ``train.eta``), the git and DVC tags (the md5 of
    each data and model output of ``lock_path`` as ``dvc.md5.<path>``), the headline metrics, the artifacts,
    plots, tables and texts, the datasets (``log_inputs``, digest = DVC md5) and the final policy
    as a logged model whose tags give its DVC path and md5 (the weights stay in DVC's cache). Each
    child holds the params too, so the UI compares children on them.

    Returns:
        the parent run's id.

    Raises:
        PipelineError: an explicitly set tracking server does not answer (checked before logging),
            or its API fails (:func:`server_errors`); one line either way.
    """
    with server_errors(tracking_uri(root)[0]):
        return _log_pipeline_run(record, root, lock_path)


def _record_metrics(run: RunRecord, now: int) -> tuple[list, dict[str, str]]:
    from mlflow.entities import Metric

    metrics, string_tags = [], {}
    for prefix, values in run.metrics.items():
        for key, value in flatten(values, prefix).items():
            if isinstance(value, (bool, int, float)):
                metrics.append(Metric(key, float(value), now, 0))
            elif value is not None:
                string_tags[key] = value
    for prefix, (step_column, rows) in run.curves.items():
        for row in rows:
            step = int(row[step_column])
            metrics += [Metric(f"{prefix}.{k}", float(v), now, step) for k, v in row.items()
                        if k != step_column and isinstance(v, (int, float))]
    return metrics, string_tags


def _log_pipeline_run(record: PipelineRecord, root: Path, lock_path: Path) -> str:
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, LoggedModelStatus, RunStatus

    client, experiment_id = _client_and_experiment(root)
    tags = run_tags(root)
    # data and models: a metrics file's values are the run's metrics already
    md5s = {p: m for p, m in dvc_output_md5s(lock_path).items() if "metrics" not in Path(p).parts}
    tags.update({f"dvc.md5.{path}": md5 for path, md5 in md5s.items()})
    name = tags.get("dvc_exp_name") or f"{tags.get('rlhf.run', 'repro')}-{tags['git_commit'][:8]}"
    run = client.create_run(experiment_id, run_name=record.parent.name or name)
    run_id = run.info.run_id
    created = [run_id]
    try:
        now = int(run.info.start_time)
        params = flatten(record.params)
        metrics, string_tags = _record_metrics(record.parent, now)
        _log_in_batches(client, run_id, params, metrics, {**tags, **record.parent.tags, **string_tags})
        for child in record.children:
            child_id = client.create_run(experiment_id, run_name=child.name,
                                         tags={"mlflow.parentRunId": run_id}).info.run_id
            created.append(child_id)
            metrics, string_tags = _record_metrics(child, now)
            _log_in_batches(client, child_id, params, metrics, {**run_tags(root), **child.tags, **string_tags})
            client.set_terminated(child_id)
        if record.datasets:
            client.log_inputs(run_id, datasets=[
                DatasetInput(Dataset(name=d.name, digest=d.md5[:36], source_type="dvc",
                                     source=json.dumps({"path": d.path, "md5": d.md5}),
                                     profile=json.dumps({"num_rows": d.rows}) if d.rows is not None else None),
                             tags=[InputTag("mlflow.data.context", d.context)])
                for d in record.datasets])
        if record.model is not None:
            model_name, path, md5 = record.model
            model = client.create_logged_model(experiment_id, name=model_name, source_run_id=run_id,
                                               tags={"dvc.path": path, "dvc.md5": md5}, model_type="causal-lm")
            client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        for path in record.artifacts:
            client.log_artifact(run_id, str(path))
        for file_name, figure in record.plots.items():
            client.log_figure(run_id, figure, f"plots/{file_name}")
        for file_name, columns in record.tables.items():
            client.log_table(run_id, data=columns, artifact_file=file_name)
        for file_name, text in record.texts.items():
            client.log_text(run_id, text, file_name)
    except Exception:
        with contextlib.suppress(Exception):  # the server that failed may fail this too
            for rid in created:
                client.set_terminated(rid, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id)
    log.info("MLflow run %s (%s) with %d child runs in %s", run_id, name, len(record.children), client.tracking_uri)
    return run_id


class LiveRun:
    """An MLflow run that receives the training metrics while training runs (``train.mlflow_live``).

    It is its own run (``rlhf.stage=train-live``), separate from the pipeline's run that
    ``report`` logs once every stage has finished: a run for a pipeline that has not finished
    would claim results it does not have.

    Raises:
        PipelineError: an explicitly set tracking server does not answer, or its API fails (at
            creation, before training starts). Later failures only stop the streaming: training
            goes on, and its log is in ``metrics/train_log.tsv`` and the ``report`` run.
    """

    def __init__(self, params: dict[str, Any], root: Path | None = None, stage: str = "train"):
        root = root or project_root()
        self.uri = tracking_uri(root)[0]
        self.failed = False
        with server_errors(self.uri):
            self.client, experiment_id = _client_and_experiment(root)
            tags = {**run_tags(root), "rlhf.stage": f"{stage}-live"}
            name = f"{tags.get('dvc_exp_name') or 'repro-' + tags['git_commit'][:8]}-{stage}-live"
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            _log_in_batches(self.client, self.run_id, flatten(params), [], tags)

    def _call(self, fn, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            with server_errors(self.uri):
                fn(*args, **kwargs)
        except PipelineError as exc:
            self.failed = True
            log.warning("live MLflow metrics stopped: %s", exc)

    def log_update(self, row: dict[str, Any]) -> None:
        """Log one update's row of ``metrics/train_log.tsv`` at step ``row["update"]``."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(row["update"])
        self._call(self.client.log_batch, self.run_id, metrics=[Metric(f"train_log.{k}", float(v), now, step)
                                                                for k, v in row.items() if k != "update"])

    def finish(self, ok: bool = True) -> None:
        self._call(self.client.set_terminated, self.run_id, "FINISHED" if ok else "FAILED")


@contextlib.contextmanager
def live_run(enabled: bool, params: dict[str, Any], stage: str):
    """A :class:`LiveRun` for a training stage when ``enabled`` (its ``mlflow_live`` key, on the main
    process), else None; the run ends FINISHED, or FAILED when the stage raises.

    Raises:
        PipelineError: see :class:`LiveRun` (before training starts).
    """
    if not enabled:
        yield None
        return
    live = LiveRun(params, stage=stage)
    try:
        yield live
    except BaseException:
        live.finish(ok=False)
        raise
    live.finish()
