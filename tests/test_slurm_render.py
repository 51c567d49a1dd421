"""Slurm files without a cluster: every shipped template and profile renders, hostile values stay
data, secrets stay out, and each node reads its own place in the job."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cluster.profiles import available_profiles, load_profile
from launcher.cluster.render import render
from launcher.cluster.slurm_env import SlurmJob, rendezvous_port
from launcher.cluster.submit import plan
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "slurm").glob("*.sbatch"))
HOSTILE = [
    "with spaces", "it's", 'say "hi"', "a;b", "$(touch pwned)", "`touch pwned`", "line\nbreak", "$HOME",
    "back\\slash", "*", "--flag", "tab\there", "",
]


def test_templates_ship_and_open_with_the_command_that_uses_them():
    assert {p.name for p in TEMPLATES} >= {"single_node.sbatch", "multi_node.sbatch"}
    for path in TEMPLATES:
        lines = path.read_text().splitlines()
        assert lines[0] == "#!/bin/bash" and "sbatch" in lines[2] and path.name in lines[2]
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize("profile", sorted(available_profiles()))
@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_every_template_renders_with_every_profile(template, profile, tmp_path):
    script = render(template, load_profile(profile, []), ["recipe=lora"], job_name="tf-lora", python="python3")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --signal=B:USR1@" in script and "#SBATCH --requeue" in script
    assert script.count("#SBATCH --nodes=") == 1


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_hostile_words_reach_the_launcher_exactly(template, tmp_path):
    """Run the rendered script with a stand-in Python that records its arguments."""
    record = tmp_path / "argv"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport sys, json\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    words = ["recipe=lora", *(f"eval.sample_prompts=[{value!r}]" for value in HOSTILE), *HOSTILE]
    script = render(template, load_profile("local", []), words, job_name="tf", python=str(fake))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    done = subprocess.run(["bash", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    import json

    assert json.loads(record.read_text()) == ["-m", "launcher.cluster.job", "train.resume=auto", *words]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("override, named", [
    ("slurm.partition=gpu;rm", "slurm.partition"),
    ("slurm.account=a b", "slurm.account"),
    ("slurm.time=$(date)", "slurm.time"),
    ("slurm.sbatch=['--wrap=x y']", "slurm.sbatch"),
    ("slurm.sbatch=['not-an-option']", "slurm.sbatch"),
    ("slurm.nodes=0", "slurm.nodes"),
    ("slurm.nodez=2", "slurm.nodez"),
])
def test_profile_values_that_could_become_code_are_refused(override, named):
    key, _, value = override.partition("=")
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_profile("local", [(key.removeprefix("slurm."), value)])


def test_unknown_cluster_lists_the_shipped_ones():
    with pytest.raises(UserError, match="available: example, local"):
        load_profile("nope", [])


def test_dry_run_plan_fixes_the_folder_and_keeps_secrets_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_verysecret")
    monkeypatch.setenv("WANDB_API_KEY", "wandb_secret")
    sub = plan(["recipe=lora", "cluster=local", "slurm.nodes=2", f"output.dir={tmp_path}/r-{{time}}", "--dry-run"])
    [run] = sub.runs
    assert sub.dry_run and sub.profile.nodes == 2 and run.run_dir.parent == tmp_path and "{time}" not in str(run.run_dir)
    assert f"output.dir={run.run_dir}" in run.words and "distributed.num_machines=2" in run.words
    text = sub.script + " ".join(sub.sbatch_argv) + sub.node_preview
    assert "hf_verysecret" not in text and "wandb_secret" not in text
    assert not run.run_dir.exists(), "a dry run writes nothing"


def test_a_bad_recipe_is_refused_before_anything_is_submitted(tmp_path):
    with pytest.raises(UserError, match="train.lrr"):
        plan(["recipe=lora", "cluster=local", "train.lrr=1", f"output.dir={tmp_path}/r"])


def test_each_node_reads_its_own_place_in_the_job():
    from launcher.cluster.node import node_words

    job = SlurmJob(job_id=1234, node_id=1, hosts=("node1", "node2"), restart_count=0)
    words = node_words(["recipe=lora"], job)
    assert words[1:] == ["distributed.num_machines=2", "distributed.machine_rank=1",
                         "distributed.main_process_ip=node1", f"distributed.main_process_port={rendezvous_port(1234)}"]
    assert rendezvous_port(1234) != rendezvous_port(1235) and 20000 <= rendezvous_port(10**9) < 40000


def test_a_typed_gpu_request_reaches_sbatch_and_sets_the_processes_per_node(tmp_path):
    sub = plan(["recipe=lora", "cluster=example", "slurm.gpus_per_node=h100:8", "train.global_batch_size=64",
                f"output.dir={tmp_path}/r"])
    assert "#SBATCH --gpus-per-node=h100:8" in sub.script.splitlines()
    assert "distributed.num_processes=8" in sub.runs[0].words
    with pytest.raises(UserError, match="'eight' is not a GPU count"):
        load_profile(None, [("gpus_per_node", "eight")])
    assert "#SBATCH --gpus-per-node" not in plan(["recipe=lora", "cluster=local", f"output.dir={tmp_path}/s"]).script


def test_the_checkpoint_warning_must_come_before_the_time_limit():
    from launcher.cluster.profiles import time_limit_seconds

    assert [time_limit_seconds(v) for v in ("30", "30:15", "24:00:00", "1-12:30", "UNLIMITED")] == [
        1800, 1815, 86400, 131400, None]
    with pytest.raises(UserError, match="signal_seconds=300 is not shorter than the time limit 00:05:00"):
        load_profile("example", [("time", "00:05:00")])
    assert load_profile("example", [("time", "00:05:01")]).signal_seconds == 300
