"""MLflow tracking helpers: where runs go, what they are tagged with, live training metrics."""

import pytest
import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.tracking import (LiveRun, check_reachable, dvc_output_md5s, flatten, project_root,
                                    tracking_uri)


def test_default_store_is_the_projects_even_for_queued_experiments(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert project_root(tmp_path) == tmp_path.resolve()
    queued = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12"
    queued.mkdir(parents=True)
    assert project_root(queued) == tmp_path.resolve()
    assert tracking_uri(queued) == (f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri(queued) == ("http://example:5000", True)


def test_flatten_gives_dotted_keys_and_json_lists():
    out = flatten({"seed": 1, "train": {"eta": 2.0, "x": {"y": None}}, "reward": {"scorers": [{"name": "ifeval"}]}})
    assert out == {"seed": 1, "train.eta": 2.0, "train.x.y": None, "reward.scorers": '[{"name": "ifeval"}]'}


def test_dvc_output_md5s(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "a": {"cmd": "x", "outs": [{"path": "data/a.parquet", "md5": "1" * 32, "size": 3}]},
        "b": {"cmd": "y", "deps": [{"path": "data/a.parquet", "md5": "1" * 32}],
              "outs": [{"path": "models/m", "md5": "2" * 32 + ".dir"}]}}}))
    assert dvc_output_md5s(lock) == {"data/a.parquet": "1" * 32, "models/m": "2" * 32 + ".dir"}
    with pytest.raises(PipelineError, match="cannot read the DVC lock file"):
        dvc_output_md5s(tmp_path / "missing.lock")


def test_unreachable_server_fails_fast():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match=f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: the tracking server"):
        check_reachable(f"http://127.0.0.1:{port}", timeout=2)
    check_reachable("sqlite:///anything.db")  # local stores are not servers


def test_live_run_streams_update_rows(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'live.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    live = LiveRun({"seed": 3, "train": {"eta": 1.0}}, root=tmp_path)
    for u in (1, 2, 3):
        live.log_update({"update": u, "loss": 1.0 / u, "kl_chosen": 0.1 * u})
    live.finish()
    run = MlflowClient(uri).get_run(live.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"seed": "3", "train.eta": "1.0"}
    assert run.data.tags["dvc_exp_name"] == "exp-1" and run.data.tags["rlhf.stage"] == "train-live"
    history = MlflowClient(uri).get_metric_history(live.run_id, "train_log.loss")
    assert [(h.step, h.value) for h in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


@pytest.fixture
def broken_server():
    """A loopback HTTP server that answers /health with OK and every MLflow API call with a 500."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            ok = self.path.rstrip("/") == "/health"
            body = b"OK" if ok else b'{"error_code": "INTERNAL_ERROR", "message": "database is locked"}'
            self.send_response(200 if ok else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_whose_api_fails_is_one_line(broken_server, tmp_path, monkeypatch):
    from rlhf_pipeline.tracking import PipelineRecord, RunRecord, log_pipeline_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", broken_server)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    check_reachable(broken_server)  # /health answers: the old check let this through
    with pytest.raises(PipelineError) as exc:
        log_pipeline_run(PipelineRecord({"seed": 1}, RunRecord("")), tmp_path, tmp_path / "dvc.lock")
    message = str(exc.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI={broken_server}: the tracking server failed (")
    assert "\n" not in message and "rerun `dvc repro`" in message
    with pytest.raises(PipelineError, match="the tracking server failed"):
        LiveRun({"seed": 1}, root=tmp_path)


def test_two_stages_creating_a_new_store_at_once_both_succeed(tmp_path):
    # dvc queue start -j 2 on a fresh project: two schema migrations at once failed with
    # "duplicate column name: step"; the store's creation is serialised by a file lock
    import subprocess
    import sys

    from conftest import stage_env

    code = ("import sys; from pathlib import Path; from rlhf_pipeline.tracking import _client_and_experiment; "
            "print(_client_and_experiment(Path(sys.argv[1]))[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=stage_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].strip() == outs[1][0].strip()  # one experiment, found or made once


def test_a_file_that_is_not_a_store_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    from rlhf_pipeline.tracking import _client_and_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(PipelineError, match="mlflow.db: MLflow cannot use this store"):
        _client_and_experiment(Path(tmp_path))


def test_a_results_run_is_tagged_with_the_projects_commit(tmp_path, monkeypatch):
    from rlhf_pipeline.tracking import run_tags

    monkeypatch.setenv("RLHF_SOURCE_COMMIT", "a" * 40)
    monkeypatch.setenv("RLHF_SOURCE_DIRTY", "false")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert run_tags(tmp_path) == {"git_commit": "a" * 40, "git_dirty": "false", "rlhf.run": "results"}
