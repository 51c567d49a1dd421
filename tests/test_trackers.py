"""output.trackers: TensorBoard, MLflow and W&B receive, through accelerate and from the main process
only, the metrics metrics.jsonl holds and the resolved recipe; secrets stay in the environment.

Everything is read back from what the trackers themselves stored: MLflow through its client (a local
SQLite store, and a real `mlflow server` on loopback), W&B from its offline run file.
"""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from launcher.config.load import load_recipe
from launcher.distributed.rendezvous import free_port
from launcher.errors import UserError
from tests.helpers import read_jsonl, run_in_process, wait_for


# Values that must never reach a tracker: the environment is where such things live.
SECRETS = {"WANDB_API_KEY": "wandb-key-do-not-log", "MLFLOW_TRACKING_PASSWORD": "mlflow-password-do-not-log",
           "MLFLOW_TRACKING_TOKEN": "mlflow-token-do-not-log", "HF_TOKEN": "hf_do_not_log"}
QUICK_RUN = ["eval.sample_prompts=[]"]


def leaf_paths(tree: dict, prefix: str = "") -> dict[str, object]:
    """The recipe's keys as overrides name them (`train.lr`), with their values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaf_paths(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_logged(value) -> str:
    """How a resolved-recipe value reads back from MLflow (params are text; lists are JSON)."""
    return json.dumps(value) if isinstance(value, list) else str(value)


def needs(module: str):
    return pytest.importorskip(module, reason=f"{module} (an optional extra) is not installed: "
                                              "pip install 'tunefleet[dev]'")


def jsonl_points(run_dir: Path) -> dict[tuple[str, int], float]:
    """metrics.jsonl as {(name as the trackers receive it, step): value}."""
    points = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        for name, value in row.items():
            if name != "step":
                points[("eval" if name.startswith("eval_") else "train") + f"/{name}", row["step"]] = value
    return points


def mlflow_client(tracking_uri: str):
    return needs("mlflow").MlflowClient(tracking_uri=tracking_uri)


def mlflow_runs(tracking_uri: str, experiment: str = "tunefleet") -> list:
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def mlflow_history(tracking_uri: str, run_id: str, names) -> list[tuple[str, int, float]]:
    """Every value MLflow holds for these metrics, in the order they were logged."""
    client = mlflow_client(tracking_uri)
    return [(name, m.step, m.value) for name in names
            for m in sorted(client.get_metric_history(run_id, name), key=lambda m: (m.timestamp, m.step))]


def assert_mlflow_holds_the_run(tracking_uri: str, run_dir: Path) -> None:
    """Exactly one MLflow run, named after the folder, with every metrics.jsonl value once and the recipe."""
    [record] = mlflow_runs(tracking_uri)
    assert record.info.run_name == run_dir.name and record.info.status == "FINISHED"
    expected = jsonl_points(run_dir)
    names = {name for name, _ in expected}
    assert {"train/loss", "train/lr", "eval/eval_loss"} <= names and set(record.data.metrics) == names
    history = mlflow_history(tracking_uri, record.info.run_id, sorted(names))
    assert len(history) == len(expected), "each (metric, step) is logged once"
    assert {(name, step): value for name, step, value in history} == pytest.approx(expected)
    recipe = leaf_paths(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    params = record.data.params
    assert {k: v for k, v in params.items() if not k.startswith("run.")} == {k: as_logged(v) for k, v in recipe.items()}
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert params["run.world_size"] == str(summary["world_size"])
    assert params["run.trainable_params"] == str(summary["trainable_params"])


def wandb_records(run_dir: Path) -> list:
    """The records of the run's offline W&B file (a LevelDB-style log of protobuf records)."""
    [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B run file"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of a record split across blocks
            record = needs("wandb.proto.wandb_internal_pb2").Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def tracked_run(tiny_llama, tmp_path_factory):
    """One ws1 run into all three trackers (MLflow: a local SQLite store; W&B: offline)."""
    needs("mlflow"), needs("wandb")
    root = tmp_path_factory.mktemp("tracked")
    store = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store)
        env.setenv("WANDB_MODE", "offline")
        for name, value in SECRETS.items():
            env.setenv(name, value)
        run_in_process("lora", tiny_llama, root / "run", "output.trackers=[tensorboard,mlflow,wandb]", *QUICK_RUN)
    return store, root / "run"


def test_mlflow_local_store_holds_the_metrics_and_the_resolved_recipe(tracked_run):
    store, run_dir = tracked_run
    assert_mlflow_holds_the_run(store, run_dir)
    [record] = mlflow_runs(store)
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] == record.info.run_id


def test_wandb_offline_run_holds_the_metrics_and_the_resolved_recipe(tracked_run):
    _, run_dir = tracked_run
    records = wandb_records(run_dir)
    history, steps = {}, []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item_key(i): json.loads(i.value_json) for i in record.history.item}
            steps.append(row["_step"])
            history.update({(k, row["_step"]): v for k, v in row.items() if not k.startswith("_")})
    assert steps == [0, 1, 2, 3, 4]  # eval at start, then one row per optimizer step
    assert history == pytest.approx(jsonl_points(run_dir))
    config = {item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    recipe = leaf_paths(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    assert {k: config[k] for k in recipe} == {k: json.dumps(v) if isinstance(v, list) else v for k, v in recipe.items()}
    [exit_record] = [r for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit.exit_code == 0
    [run_record] = [r for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run.display_name == run_dir.name and run_record.run.project == "tunefleet"


def test_tensorboard_still_gets_scalars_and_hyperparameters(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {("train/loss", e.step): e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx({k: v for k, v in jsonl_points(run_dir).items() if k[0] == "train/loss"})
    [hparams] = (run_dir / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text())["train.lr"] == load_recipe(
        [f"recipe={run_dir / 'recipe.yaml'}"])[1].train.lr


def test_no_secret_from_the_environment_reaches_any_tracker(tracked_run):
    store, run_dir = tracked_run
    [record] = mlflow_runs(store)
    logged = [json.dumps(record.data.params), json.dumps(record.data.tags), (run_dir / "trackers.json").read_text()]
    logged += [p.read_text() for p in (run_dir / "tensorboard").glob("*/hparams.yml")]
    logged += [str(r.config) for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "config"]
    for secret in SECRETS.values():
        assert all(secret not in text for text in logged), secret


def test_the_schema_has_no_key_that_could_hold_a_secret():
    """Secrets live in the environment: no recipe key may invite one (and so none can be logged)."""
    from pydantic import BaseModel

    from launcher.config.schema import PEFT_CLASSES, Recipe

    looks_secret = re.compile(r"secret|password|passwd|api_?key|credential|auth|(^|_)token$|tracking_uri")

    def names(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            out.append(f"{prefix}{name}")
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += names(field.annotation, f"{prefix}{name}.")
        return out

    keys = names(Recipe) + [f"peft.{k}" for cls in PEFT_CLASSES.values() for k in cls.model_fields]
    assert "output.trackers" in keys and "train.lr" in keys
    assert [k for k in keys if looks_secret.search(k.rsplit(".", 1)[-1])] == []


def test_an_unknown_tracker_is_refused_with_the_choices():
    with pytest.raises(UserError) as info:
        load_recipe(["recipe=lora", "output.trackers=[tensorboard,mlflw]"])
    assert "output.trackers" in str(info.value) and "'mlflw'" in str(info.value)
    assert "'mlflow'" in str(info.value) and "'wandb'" in str(info.value)


def test_a_tracker_whose_package_is_missing_is_refused_before_anything_loads(monkeypatch, tmp_path):
    import importlib.util

    from launcher.preflight import preflight

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "mlflow" else real_find_spec(name, *a, **k))
    name, recipe = load_recipe(["recipe=lora", "output.trackers=[tensorboard,mlflow]", f"output.dir={tmp_path}/r"])
    with pytest.raises(UserError) as info:
        preflight(recipe, name)
    [line] = [line for line in str(info.value).splitlines() if "output.trackers" in line]
    assert "mlflow" in line and "pip install 'tunefleet[mlflow]'" in line and "tensorboard" not in line
    # Installed trackers pass.
    _, fine = load_recipe(["recipe=lora", "output.trackers=[tensorboard,wandb]", f"output.dir={tmp_path}/r"])
    try:
        preflight(fine, name)
    except UserError as err:
        assert "output.trackers" not in str(err)


def test_a_resumed_run_continues_its_mlflow_run(tiny_llama, tmp_path, monkeypatch):
    """One MLflow run across the interruption; the latest value of each step is the one metrics.jsonl keeps.
    TensorBoard drops the events of the steps after the checkpoint, so each step appears once there."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import RESUMABLE as EXACT, crash_after

    needs("mlflow")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    words = ["output.trackers=[mlflow,tensorboard]", *EXACT, *QUICK_RUN]
    run_in_process("lora", tiny_llama, tmp_path / "run", *words)
    crash_after(tmp_path / "run", 2)
    run_in_process("lora", tiny_llama, tmp_path / "run", *words, "train.resume=auto")
    [record] = mlflow_runs(store)
    assert record.info.status == "FINISHED"
    history = mlflow_history(store, record.info.run_id, ["train/loss"])
    assert [step for _, step, _ in history] == [1, 2, 3, 4, 5, 6, 3, 4, 5, 6]  # MLflow keeps both attempts
    latest = {(name, step): value for name, step, value in history}
    expected = {k: v for k, v in jsonl_points(tmp_path / "run").items() if k[0] == "train/loss"}
    assert latest == pytest.approx(expected)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {("train/loss", e.step): e.value for e in events.Scalars("train/loss")} == pytest.approx(expected)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_failed_run_is_closed_as_failed(tiny_llama, tmp_path, monkeypatch):
    """accelerate would close every tracker run as finished; a run that raised says so in MLflow and W&B."""
    from launcher.train import loop
    from launcher.train.build import build_run

    needs("mlflow"), needs("wandb")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("WANDB_MODE", "offline")
    real_step = loop.train_step

    def step_that_breaks(run, step, fed):
        if step == 2:
            raise RuntimeError("broken on purpose")
        return real_step(run, step, fed)

    monkeypatch.setattr(loop, "train_step", step_that_breaks)
    words = ["recipe=lora", f"model.name={tiny_llama}", f"output.dir={tmp_path / 'run'}", "train.max_steps=4",
             "output.trackers=[mlflow,wandb]", "eval.at_start=false", *QUICK_RUN]
    run = build_run(load_recipe(words)[1], "lora", words)
    try:
        with pytest.raises(RuntimeError, match="broken on purpose"):
            loop.train_steps(run)
    finally:
        loop.release(run)
    [record] = mlflow_runs(store)
    assert record.info.status == "FAILED" and record.data.metrics["train/loss"] > 0
    [exit_record] = [r for r in wandb_records(tmp_path / "run") if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit.exit_code == 1


def test_changing_trackers_does_not_block_a_resume():
    """Where metrics go is not part of the training: a checkpoint from a run with other trackers (or from
    before output.trackers existed) may be continued."""
    from launcher.train.resume import changed_keys

    _, before = load_recipe(["recipe=lora"])
    saved = before.model_dump(mode="json")
    for key in ("trackers", "project", "run_name"):
        del saved["output"][key]
    _, now = load_recipe(["recipe=lora", "output.trackers=[mlflow,wandb]", "output.project=p", "output.run_name=r"])
    assert changed_keys(saved, now.model_dump(mode="json")) == []
    assert changed_keys(saved, load_recipe(["recipe=lora", "train.lr=1"])[1].model_dump(mode="json")) == ["train.lr"]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port, with its own SQLite store; stopped afterwards."""
    import importlib.util

    needs("mlflow")
    if importlib.util.find_spec("flask") is None:
        pytest.skip("`mlflow server` needs the full mlflow package, not mlflow-skinny: pip install 'tunefleet[dev]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        assert wait_for(lambda: healthy() or server.poll() is not None, timeout=90) and server.poll() is None, \
            (tmp_path / "server.log").read_text()[-3000:]
        yield url
    finally:  # the server's own session: its worker processes stop with it
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_mlflow_server_on_loopback_holds_the_run(mlflow_server, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run_in_process("lora", tiny_llama, tmp_path / "run", "output.trackers=[mlflow]", *QUICK_RUN)
    assert_mlflow_holds_the_run(mlflow_server, tmp_path / "run")


@pytest.mark.slow
def test_two_processes_log_once_from_the_main_process(tiny_llama, tmp_path, monkeypatch):
    """World size 2: one MLflow run, each step's value once; one W&B run; the values rank 0 wrote to metrics.jsonl."""
    from tests.helpers import launch

    needs("mlflow"), needs("wandb")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("WANDB_MODE", "offline")
    done = launch(tmp_path / "run", "lora", tiny_llama, "output.trackers=[tensorboard,mlflow,wandb]", *QUICK_RUN)
    assert done.stdout.count("[tunefleet] trackers: ") == 1
    assert_mlflow_holds_the_run(store, tmp_path / "run")
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_tracking_uri_is_printed_without_its_credentials():
    from launcher.outputs.trackers import without_credentials

    assert without_credentials("https://alice:s3cret@mlflow.example:5000/path") == "https://***@mlflow.example:5000/path"
    assert without_credentials("sqlite:///runs/mlflow.db") == "sqlite:///runs/mlflow.db"
