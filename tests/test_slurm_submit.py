"""`tunefleet submit` against the real local Slurm (tests/slurm_cluster.py): one live job per run
folder, a cancelled run continued by submitting the same words again, and the training step run
through a container runtime (a stand-in `apptainer` that records its words and runs the command
after the image). Marked `slurm` and `slow`."""

import json
import sys

import pytest

from tests.helpers import read_jsonl, wait_for
from tests.helpers import ROOT
from tests.slurm_cluster import TRAIN, job_env, scontrol_job, tunefleet, tunefleet_submit, wait_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Records its words and the environment variable the profile's env: sets, then runs what follows the
# image, as `apptainer exec [--nv] [--bind MOUNTS] IMAGE COMMAND...` would inside the image.
STAND_IN_APPTAINER = """#!/bin/bash
printf '%s\\n' "$*" >> {calls}
printf 'env %s\\n' "$TUNEFLEET_TEST_MARK" >> {calls}
shift
while [ "${{1#--}}" != "$1" ]; do [ "$1" = --bind ] && shift; shift; done
shift
exec "$@"
"""


def test_a_run_folder_takes_one_job_and_the_same_words_continue_it_in_a_container(slurm, tiny_llama, tmp_path):
    env = job_env(slurm)
    bin_dir, calls = tmp_path / "bin", tmp_path / "apptainer-calls"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(STAND_IN_APPTAINER.format(calls=calls))
    (bin_dir / "apptainer").chmod(0o755)
    profile = tmp_path / "site.yaml"
    profile.write_text(f"""partition: debug
time: 00:30:00
signal_seconds: 60
python: {sys.executable}   # the image's Python; here the image is this machine
setup: ['export PATH={bin_dir}:$PATH']
env: {{TUNEFLEET_TEST_MARK: set-without-a-shell}}
container: {{runtime: apptainer, image: /images/tunefleet.sif}}
""")
    run_dir = tmp_path / "run"
    words = ["recipe=lora", f"model.name={tiny_llama}", *TRAIN, "train.max_steps=100", "data.max_samples=400",
             f"cluster={profile}", f"output.dir={run_dir}"]
    first = tunefleet_submit(env, *words)
    again = tunefleet(env, "submit", *words)  # the first job pends or runs
    assert again.returncode == 2 and f"job {first} (" in again.stderr, again.stdout + again.stderr
    assert f"tunefleet cancel {run_dir}" in again.stderr and "Traceback" not in again.stderr
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180)
    assert tunefleet(env, "cancel", str(run_dir)).returncode == 0
    assert wait_for(lambda: "JobState=CANCELLED" in scontrol_job(env, first), 90), scontrol_job(env, first)
    stopped_at = json.loads((run_dir / "status.json").read_text())
    assert stopped_at["state"] == "interrupted", stopped_at
    # "submit it again to continue": the same words, the same folder, from its checkpoint.
    done = tunefleet(env, "submit", *words)
    assert done.returncode == 0 and "continues it" in done.stdout, done.stdout + done.stderr
    second = done.stdout.split("submitted job ")[1].split(":")[0]
    wait_state(env, run_dir, {"finished", "failed"}, 300)
    log = (run_dir / "slurm" / f"slurm-{second}.out").read_text()
    assert "resumed from" in log, log[-3000:]
    steps = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert steps[-1] == 100 and steps == sorted(set(steps))
    record = json.loads((run_dir / "submission.json").read_text())
    assert record["job_id"] == second and [e["job_id"] for e in record["earlier_jobs"]] == [first]
    # Both jobs' steps ran in the container, with the image's Python and the profile's env.
    step = (f"exec --bind {ROOT}:{ROOT},{run_dir}:{run_dir} /images/tunefleet.sif "
            f"{sys.executable} -m launcher.cluster.node train.resume=auto recipe=lora")
    lines = calls.read_text().splitlines()
    assert [line.startswith(step) for line in lines] == [True, False, True, False], lines
    assert lines[1] == lines[3] == "env set-without-a-shell"
    finished = tunefleet(env, "submit", *words)
    assert finished.returncode == 2 and "already holds a finished run" in finished.stderr
