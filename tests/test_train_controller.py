"""train_controller.py against real parts: SB3 PPO, a real MLflow server on loopback, subprocesses."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
import zipfile
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train_controller as tc
from controller import FEATURE_NAMES, load_policy
from envs import EnvConfig, LRControlEnv
from envs.export import policy_from_sb3, read_sb3_zip

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    timesteps=128, n_envs=1, n_steps=64, batch_size=32, n_epochs=2, net_arch=(16,), checkpoint_every=64,
    eval_every=0, eval_seeds=1, families=("breast_cancer_mlp", "friedman_mlp"), eval_families=("diabetes_mlp",),
)
TINY_CLI = ["--n-envs", "1", "--n-steps", "64", "--batch-size", "32", "--n-epochs", "2", "--net-arch", "16",
            "--families", "breast_cancer_mlp,friedman_mlp", "--eval-families", "diabetes_mlp", "--eval-every", "0",
            "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free loopback port."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port",
             str(self.port), "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


def check_run(uri: str, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "state.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["timesteps"] == "128"
    assert run.data.params["families"] == "breast_cancer_mlp,friedman_mlp"
    assert run.data.tags["git_commit"] != ""
    for key in ("rollout/ep_rew_mean", "time/fps", "val/ratio_vs_cosine", "val/diverged", "time/env_steps_per_s"):
        assert key in run.data.metrics, (key, sorted(run.data.metrics))
    assert any(k.startswith("train/") for k in run.data.metrics)
    # SB3 logs an update's losses only before the next rollout: the last update's are flushed at the end, not lost
    assert client.get_metric_history(run.info.run_id, "train/value_loss")[-1].step == state["num_timesteps"] == 128
    history = client.get_metric_history(run.info.run_id, "rollout/ep_rew_mean")
    assert [m.step for m in history] == sorted(m.step for m in history) and history[-1].step <= 128
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "policy")}
    assert "policy/policy.safetensors" in artifacts
    local = client.download_artifacts(run.info.run_id, "policy/policy.safetensors", str(out / "downloaded"))
    net = load_policy(local)
    assert net.metadata["feature_names"] == list(FEATURE_NAMES)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/validation_trajectories.png"}
    versions = client.search_model_versions("name='lrcontrol-policy'")
    assert any(v.run_id == run.info.run_id for v in versions)


def test_train_logs_to_a_real_mlflow_server(mlflow_server, tmp_path):
    cfg = tc.TrainConfig(**TINY, out=str(tmp_path / "run"), tracking_uri=mlflow_server.uri, experiment="server-test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.onceregistry.clear()  # MLflow shows its type-hint advice "once" per process: as in a fresh one
        policy_path = tc.train(cfg, show_progress=False)
    assert not [w for w in caught if "type hints" in str(w.message)], "MLflow's type-hint advice reached the user"
    assert policy_path == tmp_path / "run" / "policy.safetensors" and policy_path.exists()
    check_run(mlflow_server.uri, tmp_path / "run")
    assert not (tmp_path / "run" / tc.UNLOGGED_FILE).exists()

    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server.uri)
    obs = np.random.default_rng(0).uniform(-2, 2, (5, len(FEATURE_NAMES))).astype(np.float32)
    names = list(FEATURE_NAMES)
    table = pd.DataFrame(obs.astype(np.float64), columns=names)  # pandas' default dtype
    with warnings.catch_warnings(record=True) as caught:  # what a user loading the registered model sees
        warnings.simplefilter("always")
        warnings.onceregistry.clear()
        model = mlflow.pyfunc.load_model("models:/lrcontrol-policy/latest")
        factors = np.asarray(model.predict(table))
    ours = [str(w.message) for w in caught if "type hints" in str(w.message) or "not writable" in str(w.message)]
    assert not ours, ours
    expected = 2.0 ** load_policy(policy_path)(torch.as_tensor(obs)).detach().numpy()[:, 0]
    np.testing.assert_allclose(factors, expected, rtol=1e-6)
    # columns are matched by name: another order gives the same factors, and a table lacking one is refused
    np.testing.assert_array_equal(model.predict(table[names[::-1]]), factors)
    np.testing.assert_array_equal(model.predict(table.astype(np.float32)), factors)
    with pytest.raises(Exception, match="progress"):
        model.predict(table.drop(columns="progress"))
    with pytest.raises(Exception, match="finite.*'grad_cos'"):
        model.predict(table.assign(grad_cos=np.nan))
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/lrcontrol-policy/latest")).read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements.split(), requirements  # pinned, as logged


def test_pyfunc_called_directly_reads_an_array_by_position_and_a_table_by_name(tmp_path):
    """A direct predict() call with an array: (19,) is one observation, (n, 19) n of them. Any other shape was
    reshaped to (-1, 19), so a (19, 4) array (features in rows) became 4 scrambled observations. The factors follow the
    policy file's action map: with ``scale`` 0.5, 2^(0.5·a)."""
    from types import SimpleNamespace

    from controller import ActionConfig, PolicyNet, save_policy
    from controller.integrations.mlflow_pyfunc import PolicyModel

    torch.manual_seed(0)
    net = PolicyNet(len(FEATURE_NAMES), hidden=(8,))
    path = save_policy(tmp_path / "p.safetensors", net, action_config=ActionConfig(scale=0.5))
    model = PolicyModel()
    model.load_context(SimpleNamespace(artifacts={"policy": str(path)}))
    obs = np.random.default_rng(0).uniform(-2, 2, (4, len(FEATURE_NAMES)))
    factors = model.predict(None, obs)
    assert factors.shape == (4,)
    with torch.no_grad():
        actions = net(torch.as_tensor(obs, dtype=torch.float32)).numpy()[:, 0]
    assert np.abs(actions).max() > 0.05  # the scale shows
    np.testing.assert_allclose(factors, 2.0 ** (0.5 * actions), rtol=1e-6)
    # one observation: the same factor up to float32 rounding (a batch of one may take another matmul kernel)
    np.testing.assert_allclose(model.predict(None, obs[1]), factors[1:2], rtol=1e-6)
    # a table called directly (no MLflow signature in between) is read by name too, and one lacking a column refused
    import pandas as pd

    table = pd.DataFrame(obs, columns=list(FEATURE_NAMES))
    np.testing.assert_array_equal(model.predict(None, table[list(FEATURE_NAMES)[::-1]]), factors)
    with pytest.raises(ValueError, match=r"observation table lacks the feature columns \['progress'\]"):
        model.predict(None, table.drop(columns="progress"))
    # a read-only float32 array (what MLflow hands over) is read without torch's not-writable warning
    frozen = obs.astype(np.float32)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(model.predict(None, frozen), factors)
    for bad in (obs.T, obs.reshape(2, -1), obs[None], obs[:, :-1]):
        n = len(FEATURE_NAMES)
        with pytest.raises(ValueError, match=re.escape(f"({n},) or (rows, {n}), one column per feature in "
                                                       f"FEATURE_NAMES order, got shape {bad.shape}")):
            model.predict(None, bad)


def test_train_logs_to_the_default_embedded_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 4 slots: the batched path; "auto" reaches the validation runs resolved (it used to crash them)
    cfg = tc.TrainConfig(**{**TINY, "n_envs": 4, "n_steps": 32, "device": "auto"}, out="run")
    tc.train(cfg, show_progress=False)
    assert (tmp_path / "mlflow.db").exists()
    check_run(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run")


def test_train_exports_the_best_validated_policy_not_the_last(tmp_path):
    from controller import read_metadata

    out = tmp_path / "run"
    cfg = tc.TrainConfig(**{**TINY, "timesteps": 256, "eval_every": 64, "learning_rate": 3e-3}, out=str(out),
                         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registered_model="")
    tc.train(cfg, show_progress=False)
    state = json.loads((out / tc.STATE_FILE).read_text())
    scores = [(e["val/ratio_vs_cosine"], e["step"]) for e in state["evals"]]
    assert [step for _, step in scores] == [64, 128, 192, 256]
    best_score, best_step = min(scores, key=lambda e: e[0])  # the first of equal scores
    assert (state["best_score"], state["best_step"]) == (best_score, best_step)
    assert best_step != 256  # with this seed the last policy is not the best: the check below can tell them apart
    training = read_metadata(out / tc.POLICY_FILE)["training"]
    assert (training["timesteps"], training["validation_ratio_vs_cosine"]) == (best_step, best_score)
    # the runs kept for the trajectory plot are the exported policy's: validating it again gives them back
    _, _, runs, _ = tc.Validator(cfg)(load_policy(out / tc.POLICY_FILE))
    assert json.loads(json.dumps([dataclasses.asdict(r) for r in runs])) == state["best_runs"]


def _train_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train_controller.py"), "train", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_train_keeps_the_first_of_equally_scored_policies(tmp_path, monkeypatch):
    """A later validation must beat the best score to replace the exported policy: a tie keeps the earlier one (the
    same score reached in fewer steps)."""
    from controller import read_metadata

    validate, first = tc.Validator.__call__, []

    def same_result(self, net):  # every validation scores as the first did
        if not first:
            first.append(validate(self, net))
        return first[0]

    monkeypatch.setattr(tc.Validator, "__call__", same_result)
    out = tmp_path / "run"
    cfg = tc.TrainConfig(**{**TINY, "timesteps": 192, "eval_every": 64}, out=str(out),
                         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registered_model="")
    tc.train(cfg, show_progress=False)
    state = json.loads((out / tc.STATE_FILE).read_text())
    assert [e["step"] for e in state["evals"]] == [64, 128, 192]
    assert len({e["val/ratio_vs_cosine"] for e in state["evals"]}) == 1
    assert state["best_step"] == 64 and read_metadata(out / tc.POLICY_FILE)["training"]["timesteps"] == 64


def test_kill_and_resume_continues_steps_and_mlflow_run(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_CLI, "--timesteps", "384", "--checkpoint-every", "64", "--gamma", "0.9", "--gae-lambda", "0.8",
            "--out", str(out)]
    proc = _train_cli(args, tmp_path)
    state_path = out / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state_path.exists() and json.loads(state_path.read_text()).get("checkpoint"):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"finished before the kill: {proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_state = json.loads(state_path.read_text())
    assert 64 <= killed_state["num_timesteps"] < 384

    resumed = _train_cli(["--resume", "--timesteps", "384", "--out", str(out), "--no-progress"], tmp_path)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    state = json.loads(state_path.read_text())
    assert state["num_timesteps"] == 384
    assert state["mlflow_run_id"] == killed_state["mlflow_run_id"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lrcontrol").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]
    steps = [m.step for m in client.get_metric_history(state["mlflow_run_id"], "time/total_timesteps")]
    assert steps == sorted(set(steps)) and steps[-1] == 384, steps  # continued, never restarted from 0
    params = client.get_run(state["mlflow_run_id"]).data.params
    assert params["timesteps"] == "384"
    assert (params["gamma"], params["gae_lambda"]) == ("0.9", "0.8")  # the CLI's PPO options, kept by the resume
    assert (state["config"]["gamma"], state["config"]["gae_lambda"]) == (0.9, 0.8)
    assert (out / "policy.safetensors").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_checkpoints_where_it_stops_and_resume_goes_on_from_there(tmp_path, signum):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    # no periodic checkpoint before the interrupt: whatever is saved, the interrupt saved it. SIGINT as a
    # terminal's Ctrl-C delivers it: a shell that starts pytest in the background makes its children ignore it
    args = [sys.executable, str(ROOT / "train_controller.py"), "train", *TINY_CLI, "--timesteps", "100000",
            "--checkpoint-every", "100000", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # until a PPO update has been logged
        state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
        if state.get("mlflow_run_id") and client.get_metric_history(state["mlflow_run_id"], "train/loss"):
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"finished before the interrupt: {proc.stdout.read()}"
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "checkpoint saved: continue with" in output, output
    state = json.loads((out / "state.json").read_text())
    assert state["num_timesteps"] >= 64 and (out / "checkpoints" / state["checkpoint"]).exists()
    assert client.get_run(state["mlflow_run_id"]).info.status == "KILLED"
    target = state["num_timesteps"] + 64
    resume = ["--resume", "--timesteps", str(target), "--out", str(out), "--no-progress"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if signum == signal.SIGTERM:  # the store moved: the resume is refused until --tracking-uri says where it is now
        store = elsewhere / "moved.db"
        (tmp_path / "mlflow.db").rename(store)
        refused = _train_cli(resume, elsewhere)
        output = refused.communicate(timeout=120)[0]
        assert refused.returncode == 1 and f"the run's MLflow store {tmp_path / 'mlflow.db'} does not exist" in output
        assert not (tmp_path / "mlflow.db").exists()  # not recreated empty
        resume += ["--tracking-uri", f"sqlite:///{store}"]
    # from another directory: the run's store is the one it started with, not ./mlflow.db
    resumed = _train_cli(resume, elsewhere)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    state = json.loads((out / "state.json").read_text())
    assert state["num_timesteps"] == target
    if signum == signal.SIGTERM:
        assert state["tracking_uri"] == f"sqlite:///{store}"  # where the next resume looks
    else:
        assert not (elsewhere / "mlflow.db").exists()
        assert client.get_run(state["mlflow_run_id"]).info.status == "FINISHED"


def test_a_sigterm_during_the_final_validation_keeps_the_trained_steps(tmp_path):
    """The final validation can take minutes: the steps trained since the last periodic checkpoint are
    saved before it starts, an interrupt there says so, and a resume only validates and exports."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train_controller.py"), "train", *TINY_CLI, "--timesteps", "64",
            "--checkpoint-every", "100000", "--eval-families", "digits_cnn", "--eval-seeds", "2", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list((out / "checkpoints").glob("step_*.zip")):
        time.sleep(0.2)
    assert proc.poll() is None, f"finished before the interrupt: {proc.stdout.read()}"
    time.sleep(1.0)  # inside the validation's inner runs
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and "interrupted at step 64, checkpoint saved" in output, output
    state = json.loads((out / "state.json").read_text())
    assert state["num_timesteps"] == 64 and state["checkpoint"] == "step_000000064.zip" and not state["evals"]
    assert not (out / "policy.safetensors").exists()
    resumed = _train_cli(["--resume", "--timesteps", "64", "--out", str(out), "--no-progress"], tmp_path)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    state = json.loads((out / "state.json").read_text())
    assert [e["step"] for e in state["evals"]] == [64] and (out / "policy.safetensors").exists()


def test_a_sigterm_stops_evaluate_and_its_worker_processes(tmp_path):
    """SIGTERM to evaluate alone (``timeout``, a job scheduler): it exits with a message, and no worker
    process of its pool outlives it (they used to, holding ~0.5 GB each, until killed by hand)."""
    args = [sys.executable, str(ROOT / "train_controller.py"), "evaluate", "--families", "diabetes_mlp", "--seeds",
            "3", "--workers", "2", "--out", str(tmp_path / "eval")]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the pool's workers join it
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # until the pool has started its workers
            children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if len(children) >= 4:  # evaluate, the forkserver and its two workers (and the resource tracker)
                break
            time.sleep(0.2)
        time.sleep(2.0)
        assert proc.poll() is None, f"finished before the interrupt: {proc.stdout.read()}"
        proc.send_signal(signal.SIGTERM)  # to evaluate only, not its group
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 1 and "interrupted: nothing written" in output, output
        left = []
        for _ in range(50):
            left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if not left:
                break
            time.sleep(0.2)
        assert not left, f"processes outlived evaluate: {left}"
        assert not (tmp_path / "eval" / "evaluation.json").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_no_worker_process_outlives_a_killed_train(tmp_path):
    """SIGKILL (or the OOM killer) gives train no chance to stop its subprocess envs and validation pool:
    they end by themselves (they used to wait forever on their queues, ~0.5 GB each)."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train_controller.py"), "train", "--families", "mnist1d_gru", "--n-envs", "2",
            "--n-steps", "32", "--batch-size", "32", "--n-epochs", "1", "--net-arch", "16", "--eval-every", "64",
            "--eval-families", "diabetes_mlp", "--timesteps", "100000", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: every process it starts joins it

    def group() -> list[str]:
        return subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # until a validation has used the pool
            if (out / "state.json").exists() and json.loads((out / "state.json").read_text())["evals"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "train ended before the kill"
        assert len(group()) >= 5, group()  # train, resource tracker, forkserver, two envs (and the pool's workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for _ in range(50):
            if not (left := group()):
                break
            time.sleep(0.2)
        assert not left, f"processes outlived the killed train: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_resume_refuses_options_that_differ_from_the_saved_run_but_takes_a_new_device(tmp_path):
    """--resume goes on with the saved configuration: an option given with another value would be silently
    ignored, so it is refused before any work; the device may change (the run moved to another machine), and so
    may the tracking URI (its store moved: tested with a real run in the interrupt test)."""
    run = tmp_path / "run"
    run.mkdir()
    saved = dataclasses.asdict(tc.TrainConfig(out=str(run), seed=3))
    saved["device"] = "cuda:99"  # trained on a machine with more GPUs than this one has
    (run / tc.STATE_FILE).write_text(json.dumps({"config": saved, "checkpoint": None, "mlflow_run_id": "0123abc",
                                                 "num_timesteps": 0}))
    runner = CliRunner()
    result = runner.invoke(tc.cli, ["train", "--resume", "--out", str(run), "--families", "digits_mlp", "--seed", "3",
                                    "--experiment", "other"])
    assert result.exit_code == 2, result.output
    assert "--families (saved:" in result.output and "--experiment (saved: 'lrcontrol', given: 'other')" in result.output
    assert "--seed" not in result.output  # given, but the saved value
    result = runner.invoke(tc.cli, ["train", "--resume", "--out", str(run), "--seed", "4", "--n-envs", "8"])
    assert result.exit_code == 2 and "--n-envs (saved: 16, given: 8); --seed (saved: 3, given: 4)" in result.output
    result = runner.invoke(tc.cli, ["train", "--resume", "--out", str(run)])
    assert result.exit_code == 2 and "'cuda:99' is not available" in result.output
    options = {**saved, "timesteps": 500, "device": "cpu"}
    cfg = tc.resume_config(saved, options, {"timesteps", "device", "seed"}, run)
    assert (cfg.timesteps, cfg.device, cfg.seed, cfg.families) == (500, "cpu", 3, tc.TRAIN_FAMILIES)
    # a store given again as the same relative URI as the saved one may have moved with the run: resolved here
    saved["tracking_uri"] = "sqlite:///m.db"
    cfg = tc.resume_config(saved, {**options, "tracking_uri": "sqlite:///m.db"}, {"tracking_uri", "device"}, run)
    assert cfg.tracking_uri == f"sqlite:///{Path.cwd() / 'm.db'}"
    assert tc.resume_config(saved, options, {"device"}, run).tracking_uri == "sqlite:///m.db"  # not given: saved
    # no --timesteps: the saved total (the resume command an interrupt prints has none), not the option's default
    cfg = tc.resume_config({**saved, "timesteps": 384}, options, {"device"}, run)
    assert (cfg.timesteps, cfg.device) == (384, "cpu")
    # a saved budget range comes back from JSON as a list; runs saved before the option have none
    from_json = json.loads(json.dumps({**saved, "epochs": [50, 100]}))
    assert tc.resume_config(from_json, options, {"device"}, run).epochs == (50, 100)
    # options given again with their saved values (tuples, as the CLI parses them; lists in JSON) are no change
    given = {**options, "epochs": (50, 100), "net_arch": tuple(saved["net_arch"]), "families": tuple(saved["families"])}
    cfg = tc.resume_config(from_json, given, {"device", "epochs", "net_arch", "families"}, run)
    assert (cfg.epochs, cfg.net_arch, cfg.families) == ((50, 100), tuple(saved["net_arch"]), tc.TRAIN_FAMILIES)
    assert tc.resume_config({k: v for k, v in saved.items() if k != "epochs"}, options, {"device"}, run).epochs is None
    result = runner.invoke(tc.cli, ["train", "--resume", "--out", str(run), "--device", "cpu", "--epochs", "100"])
    assert result.exit_code == 2 and "--epochs (saved: None, given: (100, 100))" in result.output


def test_an_epoch_range_reaches_training_episodes_and_validation_tasks(tmp_path):
    cfg = tc.TrainConfig(**{**TINY, "n_envs": 2, "epochs": (4, 4)}, out=str(tmp_path / "run"))
    assert tc._epochs(None, None, "4") == (4, 4) and tc._epochs(None, None, "3,30") == (3, 30)  # type: ignore[arg-type]
    assert {t.epochs for *_, t in tc.Validator(cfg).tasks} == {4}
    venv = tc.make_vec_env(cfg)
    venv.reset()
    dones = np.zeros(2, dtype=bool)
    while not dones.any():
        _, _, dones, infos = venv.step(np.zeros((2, 1), dtype=np.float32))
    assert dones.all() and [i["epoch"] for i in infos] == [4, 4]
    venv.close()


def test_evaluate_epochs_draws_every_budget_from_the_range_and_saves_it(tmp_path):
    from envs.evaluation import Evaluation

    out = tmp_path / "eval"
    result = CliRunner().invoke(tc.cli, ["evaluate", "--families", "diabetes_mlp", "--seeds", "1", "--epochs", "3",
                                         "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                         "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "evaluation.txt").read_text().startswith("epoch budgets drawn from 3-3\n")
    saved = json.loads((out / "evaluation.json").read_text())
    assert {len(r["lrs"]) for r in saved["records"]} == {3}
    assert saved["protocol"]["epochs"] == [3, 3] and Evaluation.from_dict(saved).epochs == (3, 3)
    assert Evaluation.from_dict({**saved, "protocol": {k: v for k, v in saved["protocol"].items() if k != "epochs"}
                                 }).epochs is None  # files written before the option


def test_evaluate_keeps_its_results_when_the_server_goes_away_during_the_runs(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path / "server")
    real = tc.evaluate_policy

    def stop_then_run(*args, **kwargs):
        server.stop()  # after the up-front checks, before MLflow is needed again
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "evaluate_policy", stop_then_run)
    out = tmp_path / "eval"
    try:
        result = CliRunner().invoke(tc.cli, ["evaluate", "--families", "diabetes_mlp", "--seeds", "1", "--epochs",
                                             "3", "--out", str(out), "--tracking-uri", server.uri, "--workers", "1",
                                             "--no-progress"])
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    assert "MLflow did not receive" in result.output and f"wrote {out / 'evaluation.json'}" in result.output
    assert json.loads((out / "evaluation.json").read_text())["records"]
    assert "run" in {json.loads(line)["what"] for line in (out / tc.UNLOGGED_FILE).read_text().splitlines()}


def test_unreachable_server_is_reported_before_any_work(tmp_path):
    port = free_port()
    result = CliRunner().invoke(tc.cli, ["train", "--timesteps", "64", "--out", str(tmp_path / "run"),
                                         "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert result.exit_code != 0
    assert f"cannot reach the MLflow tracking server at http://127.0.0.1:{port}" in result.output
    assert not (tmp_path / "run").exists()  # not even an empty OUT is left behind
    mine = tmp_path / "mine"  # an OUT that was there before is left as it was
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = CliRunner().invoke(tc.cli, ["train", "--timesteps", "64", "--out", str(mine),
                                         "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert result.exit_code != 0 and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_server_dropping_mid_run_keeps_training_and_says_what_was_lost(tmp_path):
    server = MlflowServer(tmp_path / "server")
    out = tmp_path / "run"
    try:
        proc = _train_cli([*TINY_CLI, "--timesteps", "320", "--checkpoint-every", "64", "--out", str(out),
                           "--tracking-uri", server.uri], tmp_path)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "state.json").exists() and json.loads((out / "state.json").read_text()).get("checkpoint"):
                break
            time.sleep(0.2)
    finally:
        server.stop()
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "MLflow did not receive" in output and "metrics" in output
    assert json.loads((out / "state.json").read_text())["num_timesteps"] == 320
    assert (out / "policy.safetensors").exists()
    lines = (out / tc.UNLOGGED_FILE).read_text().splitlines()
    assert any(json.loads(line)["what"] == "metrics" for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timesteps", "-5"], "-5 is not in the range x>=1"),
        (["--families", "digits_mlp,not_a_family"], "unknown task family 'not_a_family'"),
        (["--families", "digits_cnn"], "validation families never train a policy"),
        (["--families", "digits_mlp,moons_mlp"], "test families are for reporting only"),
        (["--eval-families", "digits_cnn,wine_mlp"], "test families are for reporting only"),
        (["--eval-families", "test"], "test families are for reporting only"),
        (["--device", "cuda:99"], "'cuda:99' is not available"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "mps"], "device 'mps' is not supported"),
        (["--device", "meta"], "device 'meta' is not supported"),
        (["--net-arch", "16,x"], "expected comma-separated layer sizes"),
        (["--batch-size", "4096", "--n-steps", "64", "--n-envs", "1"], "exceeds the rollout size"),
        (["--learning-rate", "nan"], "learning_rate must be a finite number"),
        (["--learning-rate", "inf"], "learning_rate must be a finite number"),
        (["--ent-coef", "nan"], "ent_coef must be a finite number"),
        (["--gamma", "1.5"], "1.5 is not in the range 0<=x<=1"),
        (["--gae-lambda", "nan"], "gae_lambda must be a finite number"),
        (["--families", "breast_cancer_mlp,friedman_mlp", "--eval-families", "friedman_mlp"],
         "['friedman_mlp'] are also in families"),
        (["--experiment", " "], "experiment must name an MLflow experiment"),
        (["--seed", "-1"], "-1 is not in the range 0<=x<=4294967295"),
        (["--epochs", "40,10"], "expected MIN,MAX (or one number) with 2 <= MIN <= MAX, got '40,10'"),
        (["--epochs", "0"], "expected MIN,MAX (or one number) with 2 <= MIN <= MAX, got '0'"),
        (["--epochs", "1"], "expected MIN,MAX (or one number) with 2 <= MIN <= MAX, got '1'"),
        (["--epochs", "10,x"], "expected MIN,MAX (or one number)"),
        (["--net-arch", "0,16"], "layer sizes must be positive integers, got '0,16'"),
        (["--batch-size", "1025", "--n-steps", "64", "--n-envs", "16"], "batch_size 1025 exceeds the rollout size"),
    ],
)
def test_bad_cli_input_fails_before_work(tmp_path, args, message):
    result = CliRunner().invoke(tc.cli, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32 - 1\]"), ({"seed": 2**32}, "seed must be in"),
    ({"gamma": 1.5}, "gamma must be a finite number in"), ({"gae_lambda": -0.1}, "gae_lambda must be a finite number"),
])
def test_train_config_checks_what_the_cli_does_not_see(change, message):
    """train() is also called directly (tests, notebooks): its config checks do not rely on click's ranges."""
    with pytest.raises(ValueError, match=message):
        tc.TrainConfig(**change)


def test_family_options_take_split_names():
    assert tc._families(None, None, "test") == tc.TEST_FAMILIES  # type: ignore[arg-type]
    assert tc._families(None, None, "digits_cnn, validation") == tc.VALIDATION_FAMILIES  # type: ignore[arg-type]
    assert tc._families(None, None, "train,wine_mlp") == (*tc.TRAIN_FAMILIES, "wine_mlp")  # type: ignore[arg-type]


def test_unwritable_output_dir_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(tc.cli, ["train", "--timesteps", "64", "--out", str(blocker / "run")])
    assert result.exit_code != 0
    assert "is not writable" in result.output


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text("{}")
    result = CliRunner().invoke(tc.cli, ["train", "--timesteps", "64", "--out", str(out)])
    assert result.exit_code != 0 and "already holds a run" in result.output
    assert (out / "state.json").read_text() == "{}"
    (out / "state.json").unlink()  # an earlier run's checkpoints without its state: a new run would prune them
    (out / tc.CHECKPOINT_DIR).mkdir()
    (out / tc.CHECKPOINT_DIR / "step_000020000.zip").write_bytes(b"PK")
    result = CliRunner().invoke(tc.cli, ["train", "--timesteps", "64", "--out", str(out)])
    assert result.exit_code != 0 and "holds checkpoints of an earlier run" in result.output
    assert [p.name for p in (out / tc.CHECKPOINT_DIR).iterdir()] == ["step_000020000.zip"]


def test_export_matches_sb3_predict(tmp_path):
    from stable_baselines3 import PPO

    env = LRControlEnv(EnvConfig(families=("breast_cancer_mlp",)))
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=16, n_epochs=1, seed=0,
                policy_kwargs={"net_arch": {"pi": [16, 16], "vf": [16]}, "activation_fn": torch.nn.Tanh})
    model.learn(64)
    with torch.no_grad():  # SB3 initialises action_net near 0; spread the outputs over the clip range
        model.policy.action_net.weight.copy_(torch.linspace(-3, 3, 16).reshape(1, 16))
    obs = np.random.default_rng(0).uniform(-5, 5, (2000, len(FEATURE_NAMES))).astype(np.float32)
    expected, _ = model.predict(obs, deterministic=True)
    live = policy_from_sb3(model.policy)
    model.save(tmp_path / "model.zip")
    from_zip = read_sb3_zip(tmp_path / "model.zip")
    runner = CliRunner()
    result = runner.invoke(tc.cli, ["export", str(tmp_path / "model.zip"), str(tmp_path / "policy.safetensors")])
    assert result.exit_code == 0, result.output
    zip_bytes = (tmp_path / "model.zip").read_bytes()
    result = runner.invoke(tc.cli, ["export", str(tmp_path / "model.zip"), str(tmp_path / "model.zip")])
    assert result.exit_code == 1 and "exporting over it would lose it" in result.output
    assert (tmp_path / "model.zip").read_bytes() == zip_bytes
    (tmp_path / "afile").write_text("")
    result = runner.invoke(tc.cli, ["export", str(tmp_path / "model.zip"), str(tmp_path / "afile" / "p.safetensors")])
    assert result.exit_code == 1 and f"cannot write {tmp_path / 'afile' / 'p.safetensors'}" in result.output
    from_file = load_policy(tmp_path / "policy.safetensors")
    for net in (live, from_zip, from_file):
        got = net(torch.as_tensor(obs)).detach().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(expected).max() == 1.0 and np.abs(expected).min() < 0.5  # clipped and unclipped outputs


def test_export_refuses_corrupt_and_foreign_files(tmp_path):
    runner = CliRunner()
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"this is not a zip")
    result = runner.invoke(tc.cli, ["export", str(garbage), str(tmp_path / "p.safetensors")])
    assert result.exit_code != 0 and "is not a zip archive" in result.output
    import zipfile

    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("hello.txt", "hi")
    result = runner.invoke(tc.cli, ["export", str(other), str(tmp_path / "p.safetensors")])
    assert result.exit_code != 0 and "not a Stable-Baselines3 model" in result.output
    result = runner.invoke(tc.cli, ["export", str(tmp_path), str(tmp_path / "p.safetensors")])
    assert result.exit_code != 0 and "not a training run directory" in result.output
    assert not (tmp_path / "p.safetensors").exists()


def _sb3_zip(path: Path, data: object = None, weights: object = None, edit=None) -> Path:
    """An SB3-shaped zip: a JSON 'data' entry and a weights-only policy.pth (a 19-16-1 Tanh actor unless given)."""
    import io
    import zipfile

    if weights is None:
        g = torch.Generator().manual_seed(0)
        weights = {"mlp_extractor.policy_net.0.weight": torch.randn(16, len(FEATURE_NAMES), generator=g),
                   "mlp_extractor.policy_net.0.bias": torch.zeros(16),
                   "action_net.weight": torch.randn(1, 16, generator=g), "action_net.bias": torch.zeros(1)}
        if edit is not None:
            edit(weights)
    if data is None:
        data = {"use_sde": False, "policy_kwargs": {"activation_fn": "<class 'torch.nn.modules.activation.Tanh'>"}}
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data", json.dumps(data))
        z.writestr("policy.pth", buffer.getvalue())
    return path


def _bomb(path: Path) -> Path:
    """``path`` (an SB3-shaped zip) with a 'data' entry that unpacks to 16 MiB + 1 byte from a few KB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("data", b" " * (2**24 + 1))
        z.writestr("policy.pth", b"")
    return path


def _weights_only_zip(path: Path) -> Path:
    """``path`` (an SB3-shaped zip) less its 'data' entry."""
    with zipfile.ZipFile(_sb3_zip(path)) as z:
        weights = z.read("policy.pth")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("policy.pth", weights)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _sb3_zip(p, data=[1, 2]), "'data' entry is not an SB3 model description"),
        (lambda p: _sb3_zip(p, data={"policy_kwargs": "tanh"}), "'data' entry is not an SB3 model description"),
        (lambda p: _sb3_zip(p, weights=torch.zeros(3)), "weights are not a dict of tensors"),
        (lambda p: _sb3_zip(p, weights={"action_net.weight": 3}), "weights are not a dict of tensors"),
        (lambda p: _sb3_zip(p, edit=lambda w: w.pop("mlp_extractor.policy_net.0.bias")),
         "not an SB3 actor-critic policy for these features: 'mlp_extractor.policy_net.0.bias'"),
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"action_net.bias": torch.zeros(2)})), "size mismatch"),
        (lambda p: _sb3_zip(p, edit=lambda w: w["action_net.weight"].fill_(math.nan)), "not all finite"),
        (lambda p: _sb3_zip(p, data={"use_sde": True, "policy_kwargs": {}}), "gSDE or squashed outputs"),
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"mlp_extractor.policy_net.0.weight": torch.zeros(16)})),
         "mlp_extractor.policy_net.0.weight has shape (16,), not a matrix"),  # an IndexError escaped
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"action_net.weight": torch.tensor(1.0)})),
         "action_net.weight has shape (), not a matrix"),
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"mlp_extractor.policy_net.0.bias": torch.zeros(16, 1)})),
         "mlp_extractor.policy_net.0.bias has shape (16, 1), not a vector"),  # was named 'mlp.0.bias', not SB3's
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"action_net.bias": torch.tensor(0.0)})),
         "action_net.bias has shape (), not a vector"),
        (lambda p: _bomb(_sb3_zip(p)), "its data entry unpacks to 16,777,217 bytes, more than an SB3 policy's"),
        # cast to float32 they were exported as another policy: truncated, or less their imaginary part
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"action_net.weight": w["action_net.weight"].long()})),
         "weights must be real floating-point tensors, got action_net.weight (torch.int64)"),
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"action_net.bias": torch.zeros(1, dtype=torch.complex64)})),
         "weights must be real floating-point tensors, got action_net.bias (torch.complex64)"),
        (lambda p: _sb3_zip(p, data={"use_sde": False, "policy_kwargs": {"squash_output": True}}),
         "gSDE or squashed outputs"),
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"mlp_extractor.policy_net.0.weight": torch.zeros(16, 7)})),
         "the policy takes 7 observations; this library's features have 19"),
        (lambda p: _sb3_zip(p, edit=lambda w: w.update({"action_net.weight": torch.zeros(2, 16),
                                                        "action_net.bias": torch.zeros(2)})),
         "action_net has shape (2, 16); expected a 1-D action"),
        (_weights_only_zip, "is a zip but not a Stable-Baselines3 model (no policy.pth/data entries)"),
    ],
    ids=["data-list", "kwargs-str", "weights-tensor", "weights-int", "missing-bias", "bad-shape", "nan", "sde",
         "1-d-hidden", "0-d-action", "2-d-hidden-bias", "0-d-action-bias", "zip-bomb", "int-weights",
         "complex-bias", "squash", "other-features", "2-d-action", "no-data-entry"],
)
def test_export_refuses_malformed_sb3_zips_by_name(tmp_path, make, message):
    _sb3_zip(tmp_path / "good.zip")  # the same construction, unedited, exports
    result = CliRunner().invoke(tc.cli, ["export", str(tmp_path / "good.zip"), str(tmp_path / "good.safetensors")])
    assert result.exit_code == 0, result.output
    bad = make(tmp_path / "bad.zip")
    result = CliRunner().invoke(tc.cli, ["export", str(bad), str(tmp_path / "p.safetensors")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "p.safetensors").exists()


def test_export_keeps_the_actor_activation(tmp_path):
    """A ReLU-trained actor is exported with ReLU (every other export test uses Tanh)."""
    relu = {"use_sde": False, "policy_kwargs": {"activation_fn": "<class 'torch.nn.modules.activation.ReLU'>"}}
    g = torch.Generator().manual_seed(1)
    weights = {"mlp_extractor.policy_net.0.weight": torch.randn(16, len(FEATURE_NAMES), generator=g),
               "mlp_extractor.policy_net.0.bias": torch.randn(16, generator=g),
               "action_net.weight": torch.randn(1, 16, generator=g), "action_net.bias": torch.zeros(1)}
    net = read_sb3_zip(_sb3_zip(tmp_path / "relu.zip", data=relu, weights=weights))
    x = torch.randn(50, len(FEATURE_NAMES), generator=g)
    hidden = torch.relu(x @ weights["mlp_extractor.policy_net.0.weight"].T + weights["mlp_extractor.policy_net.0.bias"])
    torch.testing.assert_close(net(x).detach(), (hidden @ weights["action_net.weight"].T).clamp(-1, 1))
    # a zip that names no activation has SB3's default, Tanh
    default = _sb3_zip(tmp_path / "default.zip", data={"policy_kwargs": {}}, weights=weights)
    assert read_sb3_zip(default).activation == "tanh"


def test_a_live_sb3_policy_with_an_activation_policynet_lacks_is_refused_by_name():
    from gymnasium import spaces
    from stable_baselines3.common.policies import ActorCriticPolicy

    policy = ActorCriticPolicy(spaces.Box(-5, 5, (len(FEATURE_NAMES),)), spaces.Box(-1, 1, (1,)), lambda _: 0.0,
                               net_arch=[8], activation_fn=torch.nn.ELU)
    with pytest.raises(ValueError, match="activation ELU is not supported by PolicyNet"):
        policy_from_sb3(policy)


def test_commands_refuse_what_they_cannot_use_before_any_work(tmp_path):
    runner = CliRunner()
    result = runner.invoke(tc.cli, ["train", "--resume", "--out", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "--resume: no run to resume" in result.output
    run = tmp_path / "fresh_run"
    run.mkdir()
    for corrupt, problem in (("{bad", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object")):
        (run / tc.STATE_FILE).write_text(corrupt)
        for args in (["train", "--resume", "--out", str(run)], ["export", str(run), str(tmp_path / "p.safetensors")]):
            result = runner.invoke(tc.cli, args)
            assert result.exit_code == 1 and f"{run / tc.STATE_FILE} {problem}" in result.output, result.output
    config = dataclasses.asdict(tc.TrainConfig(out=str(run)))
    state = {"checkpoint": None, "config": config, "mlflow_run_id": "0123abc", "num_timesteps": 0}
    for broken, problem in (({"checkpoint": None}, "has no 'config', no 'mlflow_run_id', no 'num_timesteps'"),
                            ({**state, "checkpoint": 5}, "has 'checkpoint' is 5")):  # hand-edited, as a hint suggests
        (run / tc.STATE_FILE).write_text(json.dumps(broken))
        for args in (["train", "--resume", "--out", str(run)], ["export", str(run), str(tmp_path / "p.safetensors")]):
            result = runner.invoke(tc.cli, args)
            assert result.exit_code == 1 and f"{run / tc.STATE_FILE} {problem}" in result.output, result.output
    (run / tc.STATE_FILE).write_text(json.dumps(state))
    result = runner.invoke(tc.cli, ["export", str(run), str(tmp_path / "p.safetensors")])
    assert result.exit_code == 1 and "has no checkpoint yet" in result.output
    (run / tc.STATE_FILE).write_text(json.dumps({**state, "checkpoint": "step_000000064.zip"}))
    result = runner.invoke(tc.cli, ["train", "--resume", "--out", str(run)])  # its checkpoint deleted since
    assert result.exit_code == 1 and "step_000000064.zip, the run's last checkpoint, is missing" in result.output
    (run / tc.CHECKPOINT_DIR).mkdir()
    (run / tc.CHECKPOINT_DIR / "step_000000032.zip").write_bytes(b"")
    (run / tc.CHECKPOINT_DIR / "step_000000064.zip").write_bytes(b"PK\x03\x04 cut short")  # a copy that died
    result = runner.invoke(tc.cli, ["train", "--resume", "--out", str(run)])
    assert result.exit_code == 1 and "is not a readable zip (truncated?). The one before it is step_000000032.zip" in (
        result.output)
    result = runner.invoke(tc.cli, ["evaluate", "--device", "cuda:99", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "'cuda:99' is not available" in result.output
    for command in ("train", "evaluate"):  # a URI MLflow cannot open: named before any work, no traceback
        result = runner.invoke(tc.cli, [command, "--tracking-uri", "bogus://x", "--out", str(tmp_path / command)])
        assert result.exit_code == 1 and "cannot use 'bogus://x' as an MLflow tracking URI" in result.output
        assert not (tmp_path / command).exists()  # no OUT left behind
    # an in-memory store opens, and everything logged to it is gone when the command ends (small runs, should it not
    # be refused)
    for uri in ("sqlite:///:memory:", "sqlite://", "sqlite:///?cache=shared", "sqlite:///:memory:?cache=shared"):
        with pytest.raises(click.ClickException, match=re.escape(f"{uri} is an in-memory MLflow store")):
            tc.check_tracking_uri(uri)
    for args in (["train", *TINY_CLI, "--timesteps", "64"], ["evaluate", "--families", "wine_mlp", "--seeds", "1"]):
        result = runner.invoke(tc.cli, [*args, "--tracking-uri", "sqlite:///:memory:", "--out", str(tmp_path / "mem")])
        assert result.exit_code == 1 and "sqlite:///:memory: is an in-memory MLflow store" in result.output, result.output
        assert not (tmp_path / "mem").exists()
    tc.check_tracking_uri(f"sqlite:///{tmp_path / 'memory.db'}")  # a file merely named so is a store
    # a blank experiment name: MLflow would refuse it only after all of evaluate's runs
    result = runner.invoke(tc.cli, ["evaluate", "--experiment", " ", "--families", "wine_mlp", "--seeds", "1", "--out",
                                    str(tmp_path / "blank"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 1 and "--experiment must name an MLflow experiment, got an empty name" in result.output
    assert not (tmp_path / "blank" / "evaluation.json").exists()
    pickled = tmp_path / "policy.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + bytes(64))
    out = tmp_path / "eval"
    result = runner.invoke(tc.cli, ["evaluate", "--policy", str(pickled), "--families", "wine_mlp", "--seeds", "1",
                                    "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 1 and "looks like a Python pickle" in result.output
    assert not (out / "evaluation.json").exists()


def test_a_deleted_experiment_is_refused_before_any_work(tmp_path):
    """MLflow refuses a deleted experiment only when the run is set up: for evaluate, after all its runs."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    runner = CliRunner()
    for command, written in (("train", tc.STATE_FILE), ("evaluate", "evaluation.json")):
        out = tmp_path / command
        result = runner.invoke(tc.cli, [command, "--experiment", "gone", "--tracking-uri", uri, "--out", str(out),
                                        "--families", "breast_cancer_mlp" if command == "train" else "wine_mlp"])
        assert result.exit_code == 1, result.output
        assert f"MLflow experiment 'gone' is deleted in {uri}: restore it" in result.output
        assert not (out / written).exists()


def test_check_resumed_run_names_what_is_missing(tmp_path):
    from mlflow.tracking import MlflowClient

    with pytest.raises(click.ClickException, match="store .*nowhere.db does not exist"):
        tc.check_resumed_run(f"sqlite:///{tmp_path / 'nowhere.db'}", "abc")
    assert not (tmp_path / "nowhere.db").exists()
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(uri).search_experiments()  # a store that exists but never held the run
    with pytest.raises(click.ClickException, match=f"MLflow run 0123abc is not in {uri}"):
        tc.check_resumed_run(uri, "0123abc")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    tc.check_resumed_run(uri, run_id)
    client.delete_run(run_id)  # `mlflow runs delete`, or the UI's Delete
    with pytest.raises(click.ClickException, match=f"run {run_id} in .* was deleted; restore it first"):
        tc.check_resumed_run(uri, run_id)
    assert tc.resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{Path.cwd() / 'rel' / 'm.db'}"
    assert tc.resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tc.resolve_tracking_uri("http://h:1") == "http://h:1"


def test_export_refuses_an_sb3_zip_carrying_a_pickle_payload_without_running_it(tmp_path):
    import pickle
    import zipfile

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("data", json.dumps({"policy_kwargs": {"activation_fn": "<class 'torch.nn.modules.activation.Tanh'>"}}))
        z.writestr("policy.pth", pickle.dumps(Payload()))
    result = CliRunner().invoke(tc.cli, ["export", str(evil), str(tmp_path / "p.safetensors")])
    assert result.exit_code == 1 and "holds Python objects other than tensors" in result.output, result.output
    assert "weights_only set to `False`" not in result.output  # torch's own advice would be the unsafe one here
    assert not marker.exists() and not (tmp_path / "p.safetensors").exists()


def test_help_explains_every_option_with_defaults():
    runner = CliRunner()
    for command in ("train", "export", "evaluate"):
        result = runner.invoke(tc.cli, [command, "--help"])
        assert result.exit_code == 0
    text = runner.invoke(tc.cli, ["train", "--help"]).output
    for option in ("--timesteps", "--n-envs", "--seed", "--families", "--out", "--tracking-uri", "--experiment",
                   "--resume", "--n-steps", "--batch-size", "--learning-rate", "--net-arch"):
        assert option in text
    assert f"default: {tc.TrainConfig().timesteps}" in text


def test_ratio_counts_divergence_on_either_side():
    from envs.evaluation import RATIO_CAP, ratio_to

    assert ratio_to(2.0, 1.0) == 2.0
    assert ratio_to(float("nan"), 1.0) == RATIO_CAP
    assert ratio_to(1.0, float("inf")) == 1 / RATIO_CAP  # only the reference diverged: a win, not a loss
    assert ratio_to(float("nan"), float("nan")) == 1.0
    assert ratio_to(1e9, 1.0) == RATIO_CAP
    # a reference loss of exactly 0 (float32 rounding of a perfect classifier) is no divergence: only 0 matches it
    assert ratio_to(0.1, 0.0) == RATIO_CAP and ratio_to(0.0, 0.0) == 1.0 and ratio_to(0.0, 0.5) == 1 / RATIO_CAP


def test_validation_counts_the_policy_runs_that_diverged_and_scores_each_as_ten_times_worse():
    from controller import N_FEATURES, PolicyNet
    from envs.evaluation import MULTIPLIERS, RATIO_CAP, geomean, ratio_to

    always_up = PolicyNet(N_FEATURES, hidden=(4,))  # a = +1 at every decision: the LR keeps rising
    with torch.no_grad():
        for p in always_up.parameters():
            p.zero_()
        always_up.action_net.bias.fill_(5.0)
    cfg = tc.TrainConfig(**{**TINY, "eval_families": ("teacher_mlp", "blobs_mlp"), "eval_seeds": 2, "epochs": (4, 4)})
    score, metrics, policy, cosine = tc.Validator(cfg)(always_up.eval())
    diverged = [p.diverged for p in policy]
    assert not any(c.diverged for c in cosine) and 0 < sum(diverged) < len(diverged), diverged  # both kinds of run
    assert metrics["val/diverged"] == sum(diverged)
    ratios = [ratio_to(p.final_val, c.final_val) for p, c in zip(policy, cosine)]
    assert [r for r, d in zip(ratios, diverged) if d] == [RATIO_CAP] * sum(diverged)
    assert score == metrics["val/ratio_vs_cosine"] == pytest.approx(geomean(ratios))
    # the breakdowns: each initial-LR multiplier's tasks, each family's (they differ here, so no one stands for all)
    parts = {f"val/ratio_vs_cosine_x{m:g}": [r for r, p in zip(ratios, policy) if p.multiplier == m]
             for m in MULTIPLIERS}
    parts.update({f"val/{f}": [r for r, p in zip(ratios, policy) if p.family == f] for f in cfg.eval_families})
    assert {k: metrics[k] for k in parts} == pytest.approx({k: geomean(v) for k, v in parts.items()})
    assert len({round(metrics[k], 9) for k in parts}) == len(parts)


def test_validation_runs_the_cosine_references_once_per_training(monkeypatch):
    """The cosine runs a policy is compared with do not depend on the policy: the second validation reuses them."""
    submitted: list[str] = []
    run_jobs = tc.run_jobs
    monkeypatch.setattr(tc, "run_jobs", lambda jobs, pool=None: (
        submitted.extend(job.schedule for job in jobs), run_jobs(jobs, pool))[1])
    validator = tc.Validator(tc.TrainConfig(**{**TINY, "eval_families": ("blobs_mlp",), "epochs": (2, 2)}))
    first, second = validator(load_policy(None)), validator(load_policy(None))
    assert submitted == ["cosine"] * 3 + ["policy"] * 3 + ["policy"] * 3  # one task per multiplier
    assert first[0] == second[0] and first[3] is second[3]


def test_scores_by_hand_geomean_over_tasks_then_mean_and_population_std_over_seeds():
    """The model card's cells: per seed the geometric mean of the tasks' ratios to the oracle, then the mean and the
    population std over seeds; failures count only on tasks where cosine at the same LR had neither failure."""
    from envs.evaluation import Evaluation, RunRecord

    oracle = {"a/0": 1.0, "b/0": 0.25, "a/1": 1.0, "b/1": 0.25}
    # policy ratios: seed 0: 2 and 8 (geomean 4), seed 1: 1 and 4 (geomean 2); initial test losses make a/0 and a/1
    # blow-ups (final above the untrained model's), of which only a/1 counts: cosine blew up on a/0 too
    policy = {("a", 0): (2.0, 1.5), ("b", 0): (2.0, 3.0), ("a", 1): (1.0, 0.5), ("b", 1): (1.0, 3.0)}
    cosine = {("a", 0): (3.0, 2.0), ("b", 0): (0.5, 3.0), ("a", 1): (1.0, 2.0), ("b", 1): (0.5, 3.0)}
    records = [RunRecord(f, s, 1.0, name, final_test=final, initial_test=initial)
               for name, runs in (("policy", policy), ("cosine", cosine)) for (f, s), (final, initial) in runs.items()]
    ev = Evaluation(["a", "b"], 2, [1.0], ["policy", "cosine"], records, oracle)
    assert ev.aggregate("policy", 1.0) == pytest.approx((3.0, 1.0))  # mean of 4 and 2; population std 1
    assert ev.aggregate("policy", 1.0, "a") == pytest.approx((1.5, 0.5))  # one task per seed: ratios 2 and 1
    assert ev.failures("policy") == {"diverged": 0, "blew_up": 1, "tasks": 3}
    assert ev.failures("cosine") == {"diverged": 0, "blew_up": 0, "tasks": 3}


def test_baselines_run_the_schedules_the_readme_names():
    """Each epoch's LR under each baseline, by hand: cosine to 0 over the budget, step decay x0.1 at 50 % and 75 %,
    ReduceLROnPlateau with patience 2 and factor 0.5 (replayed from the run's own validation losses), OneCycle
    peaking at the initial LR."""
    from envs.evaluation import run_schedule
    from envs.tasks import get_family

    task = dataclasses.replace(get_family("diabetes_mlp").default_task(seed=0), epochs=8)
    lr0 = task.lr
    runs = {name: run_schedule(task, name) for name in ("constant", "cosine", "step", "plateau", "onecycle")}
    assert runs["constant"].lrs == pytest.approx([lr0] * 8)
    assert runs["cosine"].lrs == pytest.approx([lr0 * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(8)])
    assert runs["step"].lrs == pytest.approx([lr0] * 4 + [lr0 / 10] * 2 + [lr0 / 100] * 2)
    lr, best, bad, want = lr0, math.inf, 0, []
    for val in runs["plateau"].val_losses:
        want.append(lr)
        if val < best * (1 - 1e-4):
            best, bad = val, 0
        else:
            bad += 1
        if bad > 2:
            lr, bad = lr * 0.5, 0
    assert runs["plateau"].lrs == pytest.approx(want)
    onecycle = runs["onecycle"].lrs
    assert onecycle[0] == pytest.approx(lr0 / 25) and max(onecycle) <= lr0 * (1 + 1e-9) and onecycle[-1] < onecycle[3]


def test_the_protocol_scores_test_losses_against_cosine_over_the_documented_grid():
    """evaluate_policy end to end, by hand: a record's final_test is the test split's loss of the trained model (not
    the validation loss), and the oracle is the best test loss of cosine annealing over x1/27 ... x27."""
    from envs.evaluation import evaluate_policy, evaluation_tasks, run_schedule
    from envs.inner import TorchRun

    ev = evaluate_policy(None, ["diabetes_mlp"], seeds=1, multipliers=[1.0], baselines=["constant"], epochs=(3, 3))
    (record,) = ev.records
    task = evaluation_tasks("diabetes_mlp", 1, 1.0, epochs=(3, 3))[0]
    run = TorchRun(task, hook=False)  # the same seeded run, by hand
    run.evaluate("test")
    for _ in range(task.epochs):
        run.train_epoch()
        run.evaluate("val")
    assert record.final_test == run.evaluate("test")[0] and record.final_val == run.evaluate("val")[0]
    grid = [3.0**k for k in range(-3, 4)]
    oracle = min(run_schedule(evaluation_tasks("diabetes_mlp", 1, m, epochs=(3, 3))[0], "cosine").final_test
                 for m in grid)
    assert ev.oracle == {"diabetes_mlp/0": oracle} and ev.to_dict()["protocol"]["oracle_grid"] == pytest.approx(grid)


def test_the_oracle_is_the_best_finite_grid_run_of_each_task():
    from envs.evaluation import RunRecord, oracle_losses

    def record(family, seed, multiplier, final_test):
        return RunRecord(family, seed, multiplier, "cosine", final_test=final_test)

    records = [record("a", 0, -1.0, 0.5), record("a", 0, -3.0, math.inf), record("a", 0, -9.0, 0.4),
               record("a", 1, -1.0, math.nan), record("a", 1, -3.0, math.inf),  # every grid run diverged
               record("a", 0, 1.0, 0.1), record("b", 0, 10.0, 0.2)]  # not grid runs: ignored
    assert oracle_losses(records) == {"a/0": 0.4, "a/1": math.inf}


def test_a_grid_search_picks_the_lowest_finite_validation_loss_else_the_middle_of_the_grid():
    from envs.evaluation import ORACLE_GRID, RunRecord, grid_search_picks

    def record(seed, multiplier, final_val):
        return RunRecord("a", seed, multiplier, "cosine", final_val=final_val)

    picked = [record(0, -3.0, 0.2)]
    records = [record(0, -1.0, 0.5), record(0, -9.0, math.nan), *picked, record(0, 1.0, 0.01),  # x1: not a grid run
               *[record(1, -g, math.inf) for g in ORACLE_GRID]]  # every grid run diverged
    picks = grid_search_picks(records)
    assert picks[("a", 0)] is picked[0] and picks[("a", 1)].multiplier == -1.0 and set(picks) == {("a", 0), ("a", 1)}


def test_an_evaluation_reads_back_from_its_json():
    import json

    from envs.evaluation import Evaluation, RunRecord

    records = [RunRecord("a", seed, 1.0, schedule, lrs=[0.1, 0.05], final_test=loss, final_val=loss,
                         diverged=not math.isfinite(loss))
               for seed, schedule, loss in ((0, "policy", 0.5), (0, "cosine", math.inf), (1, "policy", 0.2),
                                            (1, "cosine", 0.3))]
    ev = Evaluation(["a"], 2, [1.0], ["policy", "cosine"], records, {"a/0": 0.4, "a/1": math.inf}, False)
    saved = json.dumps(ev.to_dict())
    again = Evaluation.from_dict(json.loads(saved))
    assert json.dumps(again.to_dict()) == saved and again.aggregate("policy", 1.0) == ev.aggregate("policy", 1.0)
    with pytest.raises(ValueError, match="not a saved evaluation .*'records'"):
        Evaluation.from_dict({k: v for k, v in json.loads(saved).items() if k != "records"})
    # as `evaluate` writes it: standard JSON, non-finite values as null (a null final loss and oracle were refused
    # or read as None, and the scores then failed with a TypeError)
    records[0].train_losses, records[0].initial_test = [1.0, math.nan], 2.0
    strict = json.loads(json.dumps(tc.strict_json(ev.to_dict()), allow_nan=False))
    assert strict["records"][1]["final_test"] is None and strict["oracle"]["a/1"] is None
    again = Evaluation.from_dict(strict)
    assert [again.aggregate(s, 1.0) for s in ev.schedules] == [ev.aggregate(s, 1.0) for s in ev.schedules]
    assert again.failures("policy") == ev.failures("policy") and again.oracle["a/1"] == math.inf
    assert again.records[1].final_test == math.inf and math.isnan(again.records[0].train_losses[1])
    assert tc.format_table(again) == tc.format_table(ev)
    with pytest.raises(ValueError, match="not a saved evaluation"):
        Evaluation.from_dict({"protocol": 5})


def test_selection_and_evaluation_tasks_differ_and_families_are_independent():
    from envs.evaluation import SELECTION_SEED, evaluation_tasks

    a = evaluation_tasks("diabetes_mlp", 3, 1.0)
    assert a == evaluation_tasks("diabetes_mlp", 3, 1.0)
    assert [t.seed for t in a] != [t.seed for t in evaluation_tasks("diabetes_mlp", 3, 1.0, SELECTION_SEED)]
    assert [t.with_lr(1.0) for t in evaluation_tasks("diabetes_mlp", 3, 10.0)] == [t.with_lr(1.0) for t in a]
    # training's periodic validation (which picks the shipped checkpoint) draws from the selection seeds
    cfg = tc.TrainConfig(**{**TINY, "eval_families": ("diabetes_mlp",), "eval_seeds": 3})
    picked = [t for family, i, m, t in tc.Validator(cfg).tasks if m == 1.0]
    assert picked == evaluation_tasks("diabetes_mlp", 3, 1.0, SELECTION_SEED) and picked != a
    draws = {f: [(t.optimizer, t.epochs) for t in evaluation_tasks(f, 6, 1.0)] for f in ("blobs_mlp", "diabetes_mlp")}
    assert draws["blobs_mlp"] != draws["diabetes_mlp"]


def test_evaluate_cli_scores_policy_and_baselines_against_the_oracle(tmp_path, monkeypatch):
    """The command behind the model card's tables, end to end on one small family: files, scores, MLflow."""
    import mlflow

    from envs.evaluation import BASELINES, MULTIPLIERS, RATIO_CAP, evaluation_tasks, run_schedule

    drawn = []  # what the trajectory plot compares the policy with
    plot = tc.plot_trajectories
    monkeypatch.setattr(tc, "plot_trajectories", lambda policy, reference, path, name: (
        drawn.append((policy, reference, name)), plot(policy, reference, path, name))[1])
    out, uri = tmp_path / "eval", f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(tc.cli, ["evaluate", "--families", "wine_mlp", "--seeds", "1", "--out", str(out),
                                         "--tracking-uri", uri, "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert {"evaluation.json", "evaluation.txt", "evaluation_trajectories.png"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "evaluation.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    schedules = ["policy", *BASELINES]
    assert report["protocol"]["families"] == ["wine_mlp"]
    assert sorted(report["summary"]) == sorted(f"x{m:g}" for m in MULTIPLIERS)
    assert all(sorted(cell) == sorted(schedules) for cell in report["summary"].values())
    records = report["records"]
    assert sorted((r["schedule"], r["multiplier"]) for r in records) == sorted(
        (s, m) for s in schedules for m in MULTIPLIERS)
    oracle = report["oracle"]["wine_mlp/0"]
    by_key = {(r["schedule"], r["multiplier"]): r for r in records}
    # the oracle's grid holds cosine at x1 on the same task: nothing cosine at x1 scores can beat it
    assert 0 < oracle <= by_key["cosine", 1.0]["final_test"]
    for m in MULTIPLIERS:
        assert 1 / RATIO_CAP <= report["summary"][f"x{m:g}"]["policy"]["mean"] <= RATIO_CAP * (1 + 1e-9)  # a geomean
    # the policy ran as PolicyScheduler: its LRs move by 2^a within the safety rule's range of the initial LR
    task = evaluation_tasks("wine_mlp", 1, 1.0)[0]
    lrs = np.array(by_key["policy", 1.0]["lrs"])
    assert lrs[0] == task.lr and len(lrs) == len(by_key["policy", 1.0]["val_losses"])
    assert np.all(lrs >= task.lr * 2.0**-12 * (1 - 1e-9)) and np.all(lrs <= task.lr * 64 * (1 + 1e-9))
    assert np.all(np.abs(np.diff(np.log2(lrs))) <= 2 + 1e-9)  # at most x2 per epoch, or the safety cut to 1/4
    assert len(set(lrs.round(12))) > 2  # it did move the LR
    # a worker process and this one give the same run, bit for bit (the card's "deterministic" claim)
    again = run_schedule(task, "policy", load_policy(None), multiplier=1.0)
    assert again.lrs == by_key["policy", 1.0]["lrs"] and again.final_test == by_key["policy", 1.0]["final_test"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("lrcontrol-evaluation").experiment_id])
    assert runs and runs[0].data.metrics["policy/x1"] == pytest.approx(report["summary"]["x1"]["policy"]["mean"])
    # the plot sets the policy beside the baseline that scored best at x1
    best = min(BASELINES, key=lambda s: report["summary"]["x1"][s]["mean"])
    [(policy_runs, reference, name)] = drawn
    assert name == best and {r.schedule for r in reference} == {best} and len(reference) == len(MULTIPLIERS)
    assert {r.schedule for r in policy_runs} == {"policy"}


def test_tracker_keeps_what_fails_and_leaves_a_failing_server_alone_for_a_while(tmp_path, monkeypatch):
    """A failed MLflow call is not retried for ``retry_after`` seconds (each retry against a dead server costs MLflow's
    own retries, minutes), every value that did not reach MLflow is appended to the unlogged file, and the summary
    says what was lost. Non-finite metrics are left out rather than sent."""
    calls: list[str] = []

    def down():
        calls.append("tried")
        raise ConnectionError("server gone")

    tracker = tc.Tracker(tmp_path, retry_after=60.0)
    assert tracker.summary() is None
    assert tracker.call("params", down) is None and tracker.call("params", down) is None
    assert calls == ["tried"]  # the second call came within retry_after: MLflow left alone
    sent: list[tuple[dict, int]] = []
    monkeypatch.setattr(tc.mlflow, "log_metrics", lambda metrics, step: sent.append((metrics, step)))
    tracker.log_metrics({"a": 1.0, "b": math.nan}, 7)  # still within retry_after: kept, not sent
    assert sent == []
    lines = [json.loads(line) for line in (tmp_path / tc.UNLOGGED_FILE).read_text().splitlines()]
    assert [line["what"] for line in lines] == ["params", "params", "metrics"]
    assert lines[2]["metrics"] == {"a": 1.0} and lines[2]["step"] == 7
    summary = tracker.summary()
    assert "1× metrics, 2× params" in summary and "ConnectionError: server gone" in summary
    assert str(tmp_path / tc.UNLOGGED_FILE) in summary

    tracker = tc.Tracker(tmp_path / "up", retry_after=0.0)  # a server that is back is used again
    (tmp_path / "up").mkdir()
    tracker.call("params", down)
    tracker.log_metrics({"a": 1.0, "b": math.inf, "c": None, "d": 2}, 3)
    tracker.log_metrics({"b": math.nan}, 4)  # nothing finite: no call at all
    assert calls == ["tried", "tried"] and sent == [({"a": 1.0, "d": 2.0}, 3)]


def test_strict_json_writes_non_finite_numbers_as_null():
    value = {"a": [1.5, math.nan, (math.inf, -math.inf)], "b": {"c": 2, "d": "NaN"}}
    assert json.dumps(tc.strict_json(value), allow_nan=False) == '{"a": [1.5, null, [null, null]], "b": {"c": 2, "d": "NaN"}}'


def test_resuming_a_finished_run_does_nothing_unless_given_more_timesteps(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    cfg = tc.TrainConfig(**TINY, out=str(out), tracking_uri=uri)
    policy = tc.train(cfg, show_progress=False)
    state = json.loads((out / tc.STATE_FILE).read_text())
    client = MlflowClient(uri)
    run_id = state["mlflow_run_id"]

    def logged() -> tuple:
        run = client.get_run(run_id)
        return (run.info.status, run.info.end_time, len(client.get_metric_history(run_id, "best/step")),
                len(client.search_model_versions("name='lrcontrol-policy'")))

    before, policy_bytes = logged(), policy.read_bytes()
    assert state["finished"] and before[0] == "FINISHED" and before[3] == 1
    result = CliRunner().invoke(tc.cli, ["train", "--out", str(out), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "finished at step 128" in result.output and "nothing to do" in result.output
    assert logged() == before and policy.read_bytes() == policy_bytes  # no new version, metric or artefact

    tc.train(dataclasses.replace(cfg, timesteps=192), resume=True, show_progress=False)  # more steps: it trains
    state = json.loads((out / tc.STATE_FILE).read_text())
    assert state["num_timesteps"] == 192 and state["finished"] and state["config"]["timesteps"] == 192
    assert [e["step"] for e in state["evals"]] == [128, 192]  # the new steps were validated too
    result = CliRunner().invoke(tc.cli, ["train", "--out", str(out), "--resume", "--no-progress"])
    assert result.exit_code == 0 and "finished at step 192" in result.output  # the new total, not the first
    status, _, best_logged, versions = logged()
    assert (status, best_logged, versions) == ("FINISHED", 2, 2)


def test_a_finished_run_trained_further_and_interrupted_is_not_finished(tmp_path, monkeypatch):
    """A finished run resumed with more steps and stopped after an update holds steps no validation has seen: a resume
    to the step it reached validates and exports them, rather than calling the run finished."""
    out = tmp_path / "run"
    cfg = tc.TrainConfig(**TINY, out=str(out), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", registered_model="")
    tc.train(cfg, show_progress=False)  # finished at 128
    on_step = tc.TrainingCallback._on_step

    def interrupting(self):  # Ctrl-C while collecting steps 193-256, after the update that learned from 192
        if self.model.num_timesteps == 224:
            raise KeyboardInterrupt
        return on_step(self)

    with monkeypatch.context() as m:
        m.setattr(tc.TrainingCallback, "_on_step", interrupting)
        with pytest.raises(KeyboardInterrupt):
            tc.train(dataclasses.replace(cfg, timesteps=256), resume=True, show_progress=False)
    state = json.loads((out / tc.STATE_FILE).read_text())
    assert state["num_timesteps"] == 192 and "finished" not in state
    tc.train(dataclasses.replace(cfg, timesteps=192), resume=True, show_progress=False)
    state = json.loads((out / tc.STATE_FILE).read_text())
    assert [e["step"] for e in state["evals"]] == [128, 192] and state["finished"]


def test_a_resume_keeps_the_checkpoint_and_validation_cadence_and_draws_fresh_tasks(tmp_path, monkeypatch):
    """Checkpoints and validations due every 96 steps, counted from step 0 across a resume, each of the policy that
    collects that step (64-step rollouts); only the last two checkpoints stay; the resumed run does not replay the first
    run's tasks."""
    saved_at: list[int] = []
    first_tasks: list[list] = []  # each learn()'s first tasks, as its reset drew them
    save, make_vec_env = tc.TrainingCallback.checkpoint, tc.make_vec_env

    def recording(self):  # the real checkpoint, with the step it is labelled with noted down
        save(self)
        saved_at.append(json.loads((self.out / tc.STATE_FILE).read_text())["num_timesteps"])

    def noting_first_tasks(cfg):
        venv = make_vec_env(cfg)
        reset = venv.reset

        def noting_reset():
            obs = reset()
            first_tasks.append([episode.task for episode in venv.get_attr("episode")])
            return obs

        venv.reset = noting_reset
        return venv

    monkeypatch.setattr(tc.TrainingCallback, "checkpoint", recording)
    monkeypatch.setattr(tc, "make_vec_env", noting_first_tasks)
    out = tmp_path / "run"
    cfg = tc.TrainConfig(**{**TINY, "checkpoint_every": 96, "eval_every": 96}, out=str(out),
                         tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", registered_model="")

    def kept() -> list[str]:
        return sorted(p.name for p in (out / tc.CHECKPOINT_DIR).iterdir())

    tc.train(cfg, show_progress=False)
    assert saved_at == [64, 128]  # step 96's policy (the update after 64 steps), then the end
    assert kept() == ["step_000000064.zip", "step_000000128.zip"]
    saved_at.clear()
    tc.train(dataclasses.replace(cfg, timesteps=320), resume=True, show_progress=False)
    # step 192's policy is 128's, saved already; step 288's is 256's. Counted from the resume, the steps due would be
    # 224 and 320: the policies of 192 and 256 (then the end)
    assert saved_at == [256, 320]
    assert kept() == ["step_000000256.zip", "step_000000320.zip"]
    assert len(first_tasks) == 2 and first_tasks[1] != first_tasks[0]  # the resume does not replay the first tasks
    validated = [e["step"] for e in json.loads((out / tc.STATE_FILE).read_text())["evals"]]
    assert validated == [64, 128, 256, 320]  # validation keeps the same cadence, and scores 128's policy once


def test_evaluate_no_accuracy_gives_the_policy_only_the_losses(tmp_path):
    """--no-accuracy runs the policy as a loop that passes no val_accuracy (the README's): its runs are those of
    run_schedule(policy_accuracy=False), not the default's, and the JSON and MLflow say which."""
    import mlflow

    from envs.evaluation import evaluation_tasks, run_schedule

    out, uri = tmp_path / "eval", f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(tc.cli, ["evaluate", "--families", "wine_mlp", "--seeds", "1", "--out", str(out),
                                         "--tracking-uri", uri, "--workers", "1", "--no-progress", "--no-accuracy"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["protocol"]["policy_accuracy"] is False
    policy = {r["multiplier"]: r for r in report["records"] if r["schedule"] == "policy"}
    task = evaluation_tasks("wine_mlp", 1, 1.0)[0]
    without = run_schedule(task, "policy", load_policy(None), multiplier=1.0, policy_accuracy=False)
    with_accuracy = run_schedule(task, "policy", load_policy(None), multiplier=1.0)
    assert policy[1.0]["lrs"] == without.lrs and policy[1.0]["final_test"] == without.final_test
    assert with_accuracy.lrs != without.lrs  # the accuracy feature moves the decisions on this classification task
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("lrcontrol-evaluation").experiment_id])
    assert runs[0].data.params["policy_accuracy"] == "False"


def test_checkpoints_and_validations_hold_the_policy_trained_on_the_steps_they_are_labelled_with(tmp_path, monkeypatch,
                                                                                               capsys):
    """SB3 calls the callback at every env step while it collects a rollout, and learns from the rollout only after:
    a policy saved or scored in the middle of one is the previous update's. Each checkpoint, validation and exported
    policy must hold the weights trained on exactly the steps it is labelled with, an interrupt in the middle of a
    rollout too, and a resume must collect the steps no update learned from again."""
    from stable_baselines3 import PPO

    updates: dict[int, dict] = {}  # env steps trained on → the actor's weights then
    run_updates, validate, checkpoint, on_step = PPO.train, tc.Validator.__call__, tc.TrainingCallback.checkpoint, \
        tc.TrainingCallback._on_step
    scored: list[dict] = []  # every validated policy's weights, in order
    saved: list[tuple[str, dict]] = []  # every checkpoint's file name and weights

    def recording_update(self):
        if not updates:
            updates[0] = policy_from_sb3(self.policy).state_dict()
        run_updates(self)
        updates[self.num_timesteps] = policy_from_sb3(self.policy).state_dict()

    def recording_validate(self, net):
        scored.append(net.state_dict())
        return validate(self, net)

    def recording_checkpoint(self):
        checkpoint(self)
        name = json.loads((self.out / tc.STATE_FILE).read_text())["checkpoint"]
        saved.append((name, read_sb3_zip(self.out / tc.CHECKPOINT_DIR / name).state_dict()))
        with zipfile.ZipFile(self.out / tc.CHECKPOINT_DIR / name) as archive:  # SB3's own count, as PPO.load reads it
            assert json.loads(archive.read("data"))["num_timesteps"] == int(name[5:14])

    def interrupting(self):  # Ctrl-C in the middle of the third rollout (steps 129-192)
        if self.model.num_timesteps == 160 and interrupt:
            raise KeyboardInterrupt
        return on_step(self)

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.setattr(PPO, "train", recording_update)
    monkeypatch.setattr(tc.Validator, "__call__", recording_validate)
    monkeypatch.setattr(tc.TrainingCallback, "checkpoint", recording_checkpoint)
    monkeypatch.setattr(tc.TrainingCallback, "_on_step", interrupting)
    out = tmp_path / "run"
    # rollouts of 64 steps; checkpoints and validations due at steps 96 and 192, inside the second and third rollouts
    cfg = tc.TrainConfig(**{**TINY, "timesteps": 256, "checkpoint_every": 96, "eval_every": 96}, out=str(out),
                         tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", registered_model="")
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        tc.train(cfg, show_progress=False)
    state = json.loads((out / tc.STATE_FILE).read_text())
    assert "interrupted at step 160 (the last PPO update learned from 128 steps: a resume collects the steps after " \
        "them again), checkpoint saved" in capsys.readouterr().err
    assert sorted(updates) == [0, 64, 128]  # two updates before the interrupt
    # the policies collecting steps 96 and 192 were those trained on 64 and 128 steps; the interrupt keeps the latter
    assert [e["step"] for e in state["evals"]] == [64, 128] and state["num_timesteps"] == 128
    assert [name for name, _ in saved] == ["step_000000064.zip", "step_000000128.zip", "step_000000128.zip"]
    assert all(same(s, updates[e["step"]]) for s, e in zip(scored, state["evals"], strict=True))
    assert all(same(weights, updates[int(name[5:14])]) for name, weights in saved)

    interrupt = False
    tc.train(dataclasses.replace(cfg, timesteps=256), resume=True, show_progress=False)
    state = json.loads((out / tc.STATE_FILE).read_text())
    assert sorted(updates) == [0, 64, 128, 192, 256]  # steps 129-192 collected again: two more updates, not one
    assert [e["step"] for e in state["evals"]] == [64, 128, 256]  # the 128 policy is not scored twice
    assert all(same(s, updates[e["step"]]) for s, e in zip(scored, state["evals"], strict=True))
    assert all(same(weights, updates[int(name[5:14])]) for name, weights in saved)
    assert state["num_timesteps"] == 256 and saved[-1][0] == "step_000000256.zip"
    exported = load_policy(out / tc.POLICY_FILE)
    assert same(exported.state_dict(), updates[exported.metadata["training"]["timesteps"]])
