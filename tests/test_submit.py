"""`tunefleet submit` without a cluster: profile values as Slurm reads them, safe job names, records
without secrets, the folder's claim (one live job per run folder, a resubmit continues), a sweep
submitted again over what is unfinished, the collect job, and the container words of the training
step. Slurm is stood in for by two small scripts on PATH: `sbatch` records its arguments and
answers a job id; `squeue` prints the queue a test wrote."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cluster.job import step_command
from launcher.cluster.job_settings import JobSettings, load_job_settings
from launcher.cluster.profiles import load_profile
from launcher.cluster.render import render, template_for
from launcher.cluster.slurm_env import SlurmJob
from launcher.cluster.submit import plan
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

FAKE_SBATCH = """import json, os, sys
state = os.environ["FAKE_SLURM"]
with open(os.path.join(state, "sbatch.log"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
counter = os.path.join(state, "next-id")
job = int(open(counter).read()) if os.path.exists(counter) else 100
open(counter, "w").write(str(job + 1))
print(job)
"""
FAKE_SQUEUE = """import os, sys
queue = os.path.join(os.environ["FAKE_SLURM"], "queue")
sys.stdout.write(open(queue).read() if os.path.exists(queue) else "")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """The folder of the stand-in Slurm: sbatch.log (one JSON argv per call) and queue (squeue's lines)."""
    state, bin_dir = tmp_path / "fake-slurm", tmp_path / "fake-bin"
    state.mkdir()
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


def sbatch_calls(state: Path) -> list[list[str]]:
    log = state / "sbatch.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def tunefleet(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *words], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_profile_values_are_the_text_slurm_wants(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("partition: gpu\naccount: 12345\nmem: 0\ntime: 24:00:00\nqos: ~\nconstraint:\n"
                       "nodes: 2\ncollect: false\nenv: {NCCL_SOCKET_IFNAME: ib0, NCCL_IB_HCA: 'mlx5_0,mlx5_1'}\n")
    loaded = load_profile(str(profile), [])
    assert (loaded.account, loaded.mem, loaded.time, loaded.qos, loaded.constraint) == ("12345", "0", "24:00:00",
                                                                                        None, None)
    assert loaded.nodes == 2 and loaded.collect is False
    assert loaded.env == {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0,mlx5_1"}
    overridden = load_profile("local", [("time", "24:00:00"), ("account", "12345"), ("mem", "0"),
                                        ("env.NCCL_DEBUG", "INFO"), ("container.runtime", "pyxis"),
                                        ("container.image", "nvcr.io#nvidia/pytorch:24.05-py3")])
    assert (overridden.time, overridden.account, overridden.mem) == ("24:00:00", "12345", "0")
    assert overridden.env == {"NCCL_DEBUG": "INFO"} and overridden.container.image.endswith(":24.05-py3")
    script = render(template_for(1), overridden, ["recipe=lora"], job_name="tf", python="python3")
    assert "#SBATCH --time=24:00:00" in script and "#SBATCH --account=12345" in script and "#SBATCH --mem=0" in script


@pytest.mark.parametrize("key, value, named", [
    ("env.1BAD", "x", "not an environment variable name"),
    ("env.A-B", "x", "not an environment variable name"),
    ("time", "", "slurm.time: is empty"),
    ("container.image", "x.sif", "slurm.container.runtime"),
    ("container.runtime", "docker", "slurm.container.runtime"),
    ("container.mounts", "[data:/data]", "absolute paths"),
    ("container.imagez", "x", "valid keys: container.runtime"),
])
def test_bad_profile_values_are_named(key, value, named):
    with pytest.raises(UserError, match=named):
        load_profile("local", [(key, value)])


def test_a_hostile_sweep_folder_makes_a_safe_job_name_and_braces_are_named(tmp_path):
    sub = plan(["recipe=lora", "train.lr=1e-4,2e-4", "cluster=local", f"sweep.dir={tmp_path}/s\ntouch pwned #"])
    directives = [line for line in sub.script.splitlines() if line.startswith("#SBATCH --job-name=")]
    assert directives == ["#SBATCH --job-name=tf-sweep-s-touch-pwned"]
    script = tmp_path / "job.sbatch"
    script.write_text(sub.script)
    ran = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert "not inside a Slurm job" in ran.stderr and not (tmp_path / "pwned").exists()
    for words, key in (([f"sweep.dir={tmp_path}/{{lr}}", "train.lr=1e-4,2e-4"], "sweep.dir"),
                       ([f"output.dir={tmp_path}/run-{{nope}}"], "output.dir")):
        with pytest.raises(UserError, match=rf"{key}=.*placeholders are \{{recipe\}} and \{{time\}}"):
            plan(["recipe=lora", "cluster=local", *words])
    done = tunefleet("submit", "recipe=lora", "train.lr=1e-4,2e-4", f"sweep.dir={tmp_path}/{{x}}", "--dry-run")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "sweep.dir=" in done.stderr
    with pytest.raises(UserError, match="--job-name"):
        render(template_for(1), load_profile("local", []), ["recipe=lora"], job_name="a\nb", python="python3")


def _secret_profile(tmp_path: Path, extra: str = "") -> Path:
    profile = tmp_path / "site.yaml"
    profile.write_text("partition: debug\ntime: '00:10:00'\nsetup:\n  - export HF_TOKEN=hf_setupsecret\n"
                       f"env:\n  WANDB_API_KEY: wandb_envsecret\n  NCCL_SOCKET_IFNAME: ib0\n{extra}")
    return profile


def test_setup_lines_and_env_stay_out_of_every_record(fake_slurm, tmp_path):
    from launcher.cluster.submit import submit

    profile = _secret_profile(tmp_path)
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    submit(plan(["recipe=lora", f"cluster={profile}", f"output.dir={run_dir}"]))
    submit(plan(["recipe=lora", "train.lr=1e-4,2e-4", f"cluster={profile}", f"sweep.dir={sweep_dir}"]))
    records = (run_dir / "submission.json").read_text() + (sweep_dir / "manifest.json").read_text()
    assert "hf_setupsecret" not in records and "wandb_envsecret" not in records and "ib0" not in records
    assert '"partition": "debug"' in records
    for folder in (run_dir, sweep_dir):
        settings = folder / "slurm" / "job-settings.json"
        assert stat.S_IMODE(settings.stat().st_mode) == 0o600
        assert load_job_settings({"TUNEFLEET_JOB_SETTINGS": str(settings)}).env == {
            "WANDB_API_KEY": "wandb_envsecret", "NCCL_SOCKET_IFNAME": "ib0"}
        script = (folder / "slurm" / "job.sbatch").read_text()
        assert f"export TUNEFLEET_JOB_SETTINGS={settings}" in script and "wandb_envsecret" not in script
        assert "export HF_TOKEN=hf_setupsecret" in script  # the script runs them: it is the one place they live


def test_a_run_folder_holds_one_live_job_and_a_resubmit_continues_it(fake_slurm, tmp_path):
    run_dir = tmp_path / "run"
    words = ["recipe=lora", "cluster=local", "train.max_steps=7", f"output.dir={run_dir}"]
    script = run_dir / "slurm" / "job.sbatch"
    assert tunefleet("submit", *words).returncode == 0
    assert json.loads((run_dir / "submission.json").read_text())["job_id"] == "100"
    # Its job pends: a second submit is refused, naming the job and how to stop it.
    (fake_slurm / "queue").write_text(f"100|PENDING|{script}\n")
    done = tunefleet("submit", *words)
    assert done.returncode == 2 and "job 100 (pending) still trains" in done.stderr, done.stderr
    assert f"tunefleet cancel {run_dir}" in done.stderr and "Traceback" not in done.stderr
    # An sbatch that timed out had created a job nobody recorded: found by its script.
    (fake_slurm / "queue").write_text(f"163|RUNNING|{script}\n")
    assert "job 163 (running)" in tunefleet("submit", *words).stderr
    assert len(sbatch_calls(fake_slurm)) == 1
    # Ended (cancelled, failed, out of requeues): the same words continue it; other words are refused.
    (fake_slurm / "queue").write_text("")
    (run_dir / "recipe.yaml").write_text("# the run started\n")
    other = tunefleet("submit", *words[:-2], "train.max_steps=8", words[-1])
    assert other.returncode == 2 and "train.max_steps=7" in other.stderr and "train.max_steps=8" in other.stderr
    done = tunefleet("submit", *words)
    assert done.returncode == 0 and "continues it" in done.stdout, done.stderr
    record = json.loads((run_dir / "submission.json").read_text())
    assert record["job_id"] == "101" and [e["job_id"] for e in record["earlier_jobs"]] == ["100"]
    assert sbatch_calls(fake_slurm)[-1][-1] == str(script)
    assert "train.resume=auto" in script.read_text()
    # A submit under way elsewhere holds the claim; one whose process died left a claim that is free.
    claim = run_dir / "slurm" / "submitting"
    claim.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": "now"}))
    assert "another `tunefleet submit` into this folder is under way" in tunefleet("submit", *words).stderr
    dead = subprocess.Popen(["true"])
    dead.wait()
    claim.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": "then"}))
    assert tunefleet("submit", *words).returncode == 0 and not claim.exists()
    # A finished run is never submitted again.
    (run_dir / "status.json").write_text(json.dumps({"state": "finished"}))
    done = tunefleet("submit", *words)
    assert done.returncode == 2 and "already holds a finished run" in done.stderr
    assert len(sbatch_calls(fake_slurm)) == 3


def test_a_sweep_submitted_again_is_one_array_over_its_unfinished_runs_and_is_collected(fake_slurm, tmp_path):
    sweep = tmp_path / "sweep"
    words = ["recipe=lora", "train.lr=1e-4,2e-4,3e-4,4e-4", "cluster=local", "slurm.array_parallelism=2",
             f"sweep.dir={sweep}"]
    done = tunefleet("submit", *words)
    assert done.returncode == 0 and "job 101 collects the results" in done.stdout, done.stderr
    array, collect = sbatch_calls(fake_slurm)
    assert "--array=0-3%2" in array
    assert collect[:5] == ["--parsable", "--dependency=afterany:100", "--kill-on-invalid-dep=yes",
                           f"--output={sweep}/slurm/collect-%j.out", f"--chdir={ROOT}"]
    collect_script = Path(collect[-1]).read_text()
    assert collect_script.rstrip().endswith(f"-m launcher.cli collect {sweep}") and "#SBATCH --partition=debug" in \
        collect_script
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert manifest["array_job_id"] == "100" and manifest["collect_job_id"] == "101"
    # Run 0 finished, run 2 still runs: the others go again as one new array, their history kept.
    (sweep / "lr-1e-4" / "status.json").write_text(json.dumps({"state": "finished"}))
    (fake_slurm / "queue").write_text(f"100_2|RUNNING|{sweep}/slurm/job.sbatch\n")
    done = tunefleet("submit", *words, "slurm.collect=false")
    assert done.returncode == 0 and "runs 1,3 of 4" in done.stdout, done.stderr
    calls = sbatch_calls(fake_slurm)
    assert len(calls) == 3 and "--array=1,3%2" in calls[2]  # and no collect job: slurm.collect=false
    runs = json.loads((sweep / "manifest.json").read_text())["runs"]
    assert [r["job_id"] for r in runs] == ["100_0", "102_1", "100_2", "102_3"]
    assert [e["job_id"] for e in runs[1]["earlier_jobs"]] == ["100_1"] and "earlier_jobs" not in runs[2]
    # Nothing left that is neither finished nor live; other words for the same folder are refused.
    (fake_slurm / "queue").write_text("".join(f"{r['job_id']}|PENDING|{sweep}/slurm/job.sbatch\n" for r in runs[1:]))
    assert "nothing to submit" in tunefleet("submit", *words).stderr
    assert "other words" in tunefleet("submit", *words[:1], "train.lr=1e-4,2e-4", *words[2:]).stderr
    assert len(sbatch_calls(fake_slurm)) == 3


CONTAINER = "container:\n  runtime: {runtime}\n  image: {image}\n  mounts: [/shared/data:/data]\n"


def test_the_training_step_runs_in_the_container_with_the_images_python():
    from launcher.cluster.job_settings import Container

    job = SlurmJob(job_id=7, node_id=0, hosts=("node1", "node2"), restart_count=0)
    mounts = ("/home/me/work:/home/me/work", "/scratch/runs/r:/scratch/runs/r")
    pyxis = JobSettings(container=Container("pyxis", "nvcr.io#nvidia/pytorch:24.05-py3", mounts, "/home/me/work",
                                            mount_home=False))
    command = step_command(["recipe=lora"], job, pyxis)
    at = command.index("--container-image=nvcr.io#nvidia/pytorch:24.05-py3")
    assert command[at:] == ["--container-image=nvcr.io#nvidia/pytorch:24.05-py3",
                            "--container-mounts=/home/me/work:/home/me/work,/scratch/runs/r:/scratch/runs/r",
                            "--container-workdir=/home/me/work", "--no-container-mount-home",
                            "python", "-m",
                            "launcher.cluster.node", "recipe=lora"]
    apptainer = JobSettings(container=Container("apptainer", "/images/tf.sif", mounts, "/home/me/work",
                                                python="/opt/venv/bin/python", gpus=True))
    command = step_command(["recipe=lora"], job, apptainer)
    at = command.index("apptainer")
    assert command[at:] == ["apptainer", "exec", "--nv", "--bind", ",".join(mounts), "/images/tf.sif",
                            "/opt/venv/bin/python", "-m",
                            "launcher.cluster.node", "recipe=lora"]
    assert not any(w.startswith("--container") for w in command)
    assert sys.executable not in command  # the batch process's Python is a host path
    assert JobSettings.from_json(apptainer.to_json()) == apptainer


@pytest.mark.parametrize("runtime, gpus", [("apptainer", 0), ("apptainer", 2), ("pyxis", 2)])
def test_dry_run_shows_the_container_words_and_the_settings_file(tmp_path, runtime, gpus):
    profile = tmp_path / "site.yaml"
    profile.write_text(f"gpus_per_node: {gpus}\n" + CONTAINER.format(runtime=runtime, image="/images/tf.sif"))
    run_dir = tmp_path / "run"
    done = tunefleet("submit", "recipe=lora", f"cluster={profile}", f"output.dir={run_dir}", "--dry-run")
    assert done.returncode == 0, done.stderr
    mounts = f"{ROOT}:{ROOT},{run_dir}:{run_dir},/shared/data:/data"
    assert f"export TUNEFLEET_JOB_SETTINGS={run_dir}/slurm/job-settings.json" in done.stdout
    assert f"export TUNEFLEET_PYTHON={sys.executable}" in done.stdout  # the batch process stays on the host
    step = done.stdout.split("# each node runs:\n#   ")[1].splitlines()[0]
    image_python = "python -m launcher.cluster.node"
    if runtime == "apptainer":
        nv = "--nv " if gpus else ""
        assert step.startswith(f"srun --ntasks-per-node=1 apptainer exec {nv}--bind {mounts} /images/tf.sif "
                               + image_python), step
    else:
        assert step.startswith(f"srun --ntasks-per-node=1 --container-image=/images/tf.sif "
                               f"--container-mounts={mounts} --container-workdir={ROOT} " + image_python), step
    assert not run_dir.exists(), "a dry run writes nothing"
