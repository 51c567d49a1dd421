"""`tunefleet submit`: validate a recipe run, render its batch script, submit it to Slurm.

    tunefleet submit recipe=lora train.lr=2e-4 [cluster=NAME] [slurm.nodes=2 ...] [--dry-run]

The run folder is decided here, once (its {time} rendered now), and holds everything of the run:
the rendered script (RUN/slurm/job.sbatch), Slurm's log appended across requeues
(RUN/slurm/slurm-JOBID.out), and RUN/submission.json (job id, profile, the sbatch command).
Everything is validated before anything is submitted or written.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.cluster.profiles import ClusterProfile, load_profile
from launcher.cluster.render import render, template_for
from launcher.errors import UserError

# Stands in for the head node while validating at submission; each node gets the real one in the job.
HEAD_PLACEHOLDER = "slurm-head-node"


@dataclass
class Submission:
    recipe_name: str
    run_dir: Path
    profile: ClusterProfile
    words: list[str]  # what the job runs: recipe, overrides, where the run lives
    script: str
    sbatch_argv: list[str]
    node_preview: str  # the command each node runs, with the head and rank filled in at run time
    extra: dict = field(default_factory=dict)


def split_submit_words(words: list[str]) -> tuple[list[str], str | None, list[tuple[str, str]], bool]:
    """(recipe words, cluster name, slurm.* overrides, dry run)."""
    recipe_words, cluster, slurm, dry_run = [], None, [], False
    for word in words:
        key, _, value = word.partition("=")
        if word == "--dry-run":
            dry_run = True
        elif key == "cluster":
            cluster = value
        elif key.startswith("slurm."):
            slurm.append((key.removeprefix("slurm."), value))
        else:
            recipe_words.append(word)
    return recipe_words, cluster, slurm, dry_run


def plan(words: list[str]) -> tuple[Submission, bool]:
    """Everything `submit` would do, validated, without touching the cluster or the disk."""
    from launcher.config.load import load_recipe
    from launcher.config.preflight import preflight
    from launcher.outputs.run_dir import render_dir

    recipe_words, cluster, slurm_overrides, dry_run = split_submit_words(words)
    profile = load_profile(cluster, slurm_overrides)
    layout = [f"distributed.num_machines={profile.nodes}"]
    if profile.gpus_per_node:
        layout.append(f"distributed.num_processes={profile.gpus_per_node}")
    checked = [*recipe_words, *layout, f"distributed.main_process_ip={HEAD_PLACEHOLDER}"]
    name, recipe = load_recipe(checked)
    run_dir = render_dir(recipe.output.dir, name).resolve()
    job_words = [*recipe_words, *layout, f"output.dir={run_dir}"]
    name, recipe = load_recipe([*job_words, f"distributed.main_process_ip={HEAD_PLACEHOLDER}"])
    if recipe.train.resume == "never":  # the job adds train.resume=auto (for its requeues): the folder must be new
        preflight(recipe, name)
    python = profile.python or sys.executable
    script = render(template_for(profile.nodes), profile, job_words, job_name=f"tf-{name}"[:64], python=python)
    logs = run_dir / "slurm"
    sbatch_argv = ["sbatch", "--parsable", f"--output={logs / 'slurm-%j.out'}", f"--chdir={Path.cwd()}",
                   str(logs / "job.sbatch")]
    node_preview = (f"srun --ntasks-per-node=1 {shlex.quote(python)} -m launcher.cluster.node "
                    + shlex.join(["train.resume=auto", *job_words])
                    + f" distributed.machine_rank=$SLURM_NODEID distributed.main_process_ip=<first node>"
                      f" distributed.main_process_port=<20000 + job id % 20000>")
    return Submission(name, run_dir, profile, job_words, script, sbatch_argv, node_preview), dry_run


def submit(sub: Submission) -> str:
    """Write the run folder's Slurm files and submit; return the job id."""
    logs = sub.run_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's folder
    (logs / "job.sbatch").write_text(sub.script)
    done = subprocess.run(sub.sbatch_argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    record = {"job_id": job_id, "run_dir": str(sub.run_dir), "recipe": sub.recipe_name, "words": sub.words,
              "profile": sub.profile.model_dump(), "sbatch": shlex.join(sub.sbatch_argv)}
    (sub.run_dir / "submission.json").write_text(json.dumps(record, indent=1) + "\n")
    return job_id


def cmd_submit(words: list[str]) -> int:
    sub, dry_run = plan(words)
    if dry_run:
        print(sub.script, end="")
        print(f"\n# submitted with:\n#   {shlex.join(sub.sbatch_argv)}\n# each node runs:\n#   {sub.node_preview}")
        return 0
    job_id = submit(sub)
    print(f"[tunefleet] submitted job {job_id}: {sub.recipe_name} on {sub.profile.nodes} node(s); "
          f"run folder {sub.run_dir}; log {sub.run_dir / 'slurm' / f'slurm-{job_id}.out'}")
    return 0
