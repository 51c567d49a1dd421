"""`tunefleet submit`: validate runs, render their batch script, submit them to Slurm.

    tunefleet submit recipe=lora train.lr=2e-4 [cluster=NAME] [slurm.nodes=2 ...] [--dry-run]
    tunefleet submit recipe=lora,qlora train.lr=1e-4,2e-4 [sweep.dir=runs/my-sweep] ...   (a sweep)
    tunefleet submit sweep=sweeps/lr_and_rank.yaml [more words, comma lists cross it] ...

A run's folder is decided here, once (its {time} rendered now), and holds everything of the run:
the rendered script (RUN/slurm/job.sbatch), Slurm's log appended across requeues
(RUN/slurm/slurm-JOBID.out) and RUN/submission.json. A sweep is one job array (at most
`array_parallelism` runs at once) over a sweep folder with manifest.json and one folder per run.
Every run is validated before anything is written or submitted: one typo wastes no queue slot.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.cluster import sweep as sweeps
from launcher.cluster.profiles import ClusterProfile, load_profile
from launcher.cluster.render import render, template_for
from launcher.errors import UserError

# Stands in for the head node while validating at submission; each node gets the real one in the job.
HEAD_PLACEHOLDER = "slurm-head-node"
SWEEP_TASK_FLAG = "--sweep-task"  # the job picks its run from the sweep's manifest by array index


@dataclass
class Planned:
    name: str  # run folder name (the recipe's for a single run, the differing values in a sweep)
    recipe_name: str
    run_dir: Path
    words: list[str]  # what the job runs: recipe, overrides, where the run lives
    overrides: dict[str, str]  # the values that differ from the sweep's other runs


@dataclass
class Submission:
    profile: ClusterProfile
    runs: list[Planned]
    sweep_dir: Path | None
    script: str
    sbatch_argv: list[str]
    node_preview: str  # what each node runs (head and rank filled in at run time)
    dry_run: bool
    options: SubmitOptions


@dataclass
class SubmitOptions:
    cluster: str | None = None
    slurm: list[tuple[str, str]] = field(default_factory=list)  # slurm.KEY=VALUE overrides of the profile
    sweep_dir: str | None = None
    sweep_file: str | None = None  # a sweep YAML (grid and paired values)
    executor: str = "slurm"  # or local: this machine, `parallel` runs at a time
    parallel: int = 1
    dry_run: bool = False


def split_submit_words(words: list[str]) -> tuple[list[str], SubmitOptions]:
    """(recipe words, how to submit them)."""
    recipe_words, options = [], SubmitOptions()
    for word in words:
        key, _, value = word.partition("=")
        if word == "--dry-run":
            options.dry_run = True
        elif key == "executor":
            if value not in ("slurm", "local"):
                raise UserError(f"executor={value}: use executor=slurm (the default) or executor=local")
            options.executor = value
        elif key == "local.parallel":
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"local.parallel={value}: give how many runs may train at once (1, 2, ...)")
            options.parallel = int(value)
        elif key == "cluster":
            options.cluster = value
        elif key == "sweep.dir":
            options.sweep_dir = value
        elif key == "sweep":
            options.sweep_file = value
        elif key.startswith("slurm."):
            options.slurm.append((key.removeprefix("slurm."), value))
        elif word.startswith("-"):
            raise UserError(f"unknown option {word}; tunefleet submit takes --dry-run and key=value words")
        else:
            recipe_words.append(word)
    return recipe_words, options


def _layout(profile: ClusterProfile) -> list[str]:
    layout = [f"distributed.num_machines={profile.nodes}"]
    if profile.gpus_per_node:
        layout.append(f"distributed.num_processes={profile.gpus_per_node}")
    return layout


def _check(words: list[str]):
    """Validate as the job will see it (train.resume=auto, a head node); return (recipe name, recipe)."""
    from launcher.config.load import load_recipe

    return load_recipe(["train.resume=auto", *words, f"distributed.main_process_ip={HEAD_PLACEHOLDER}"])


def _plan_runs(recipe_words: list[str], profile: ClusterProfile, options: SubmitOptions, always_sweep: bool
               ) -> tuple[list[Planned], Path | None]:
    from launcher.config.preflight import preflight
    from launcher.outputs.run_dir import check_free, render_dir

    grid = sweeps.expand_grid(recipe_words)
    if options.sweep_file:
        grid = sweeps.cross(sweeps.load_sweep_file(options.sweep_file), grid)
        always_sweep = True
    sweep_dir_text = options.sweep_dir
    layout = _layout(profile)
    if len(grid) == 1 and not always_sweep:
        words = [*recipe_words, *layout]
        name, recipe = _check(words)
        run_dir = render_dir(recipe.output.dir, name).resolve()
        words.append(f"output.dir={run_dir}")
        name, recipe = _check(words)
        check_free(run_dir)
        preflight(recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume": "never"})}), name)
        return [Planned(run_dir.name, name, run_dir, words, {})], None
    sweep_dir = render_dir(sweep_dir_text or "runs/sweep-{time}", "sweep").resolve()
    if (sweep_dir / sweeps.MANIFEST).exists():
        raise UserError(f"sweep.dir={sweep_dir} already holds a sweep; choose another sweep.dir")
    planned, problems = [], []
    varying = sweeps.varying_keys(grid)
    for values, name in zip(grid, sweeps.unique_names(grid)):
        run_dir = sweep_dir / name
        words = [f"{k}={v}" for k, v in values.items()] + layout + [f"output.dir={run_dir}"]
        try:
            recipe_name, recipe = _check(words)
            preflight(recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume": "never"})}),
                      recipe_name)
        except UserError as err:
            problems.append((name, str(err)))
            continue
        planned.append(Planned(name, recipe_name, run_dir, words, {k: values[k] for k in varying}))
    if problems:
        by_message: dict[str, list[str]] = {}
        for name, message in problems:
            by_message.setdefault(message, []).append(name)
        lines = [f"run(s) {', '.join(names)}: {message}" for message, names in by_message.items()]
        raise UserError(f"{len(problems)} of {len(grid)} runs of the sweep are invalid; nothing was submitted:\n"
                        + "\n".join(lines))
    return planned, sweep_dir


def plan(words: list[str]) -> Submission:
    """Everything `submit` would do, validated, without touching the cluster or the disk."""
    recipe_words, options = split_submit_words(words)
    if not any(w.startswith("recipe=") for w in recipe_words) and not options.sweep_file:
        raise UserError("no recipe given: add recipe=NAME (or recipe=a,b for a sweep)")
    local = options.executor == "local"
    if local and (options.cluster or options.slurm):
        raise UserError("executor=local runs on this machine: cluster= and slurm.* do not apply")
    profile = load_profile(options.cluster, options.slurm)
    # The local executor keeps its runs in a sweep folder even for one run: the manifest is its record.
    runs, sweep_dir = _plan_runs(recipe_words, profile, options, always_sweep=local)
    if local:
        return Submission(profile, runs, sweep_dir, "", [], "", options.dry_run, options)
    python = profile.python or sys.executable
    if sweep_dir is None:
        run = runs[0]
        script_words, job_name = run.words, f"tf-{run.recipe_name}"
        logs = run.run_dir / "slurm"
        sbatch_options = [f"--output={logs / 'slurm-%j.out'}"]
        script_path = logs / "job.sbatch"
    else:
        script_words, job_name = [SWEEP_TASK_FLAG, str(sweep_dir)], f"tf-sweep-{sweep_dir.name}"
        cap = f"%{profile.array_parallelism}" if profile.array_parallelism else ""
        # Each task writes its own run folder's log (launcher.cluster.job); this one only catches what
        # happens before that.
        sbatch_options = [f"--array=0-{len(runs) - 1}{cap}", f"--output={sweep_dir / 'slurm' / 'array-%A_%a.out'}"]
        script_path = sweep_dir / "slurm" / "job.sbatch"
    script = render(template_for(profile.nodes), profile, script_words, job_name=job_name[:64], python=python)
    sbatch_argv = ["sbatch", "--parsable", *sbatch_options, f"--chdir={Path.cwd()}", str(script_path)]
    node_preview = (f"srun --ntasks-per-node=1 {shlex.quote(python)} -m launcher.cluster.node "
                    + shlex.join(["train.resume=auto", *runs[0].words])
                    + " distributed.machine_rank=$SLURM_NODEID distributed.main_process_ip=<first node>"
                      " distributed.main_process_port=<20000 + job id % 20000>")
    return Submission(profile, runs, sweep_dir, script, sbatch_argv, node_preview, options.dry_run, options)


def submit_local(sub: Submission) -> None:
    from launcher.cluster import local_executor

    records = [{"name": r.name, "recipe": r.recipe_name, "overrides": r.overrides, "words": r.words,
                "run_dir": str(r.run_dir), "restarts": 0} for r in sub.runs]
    sub.sweep_dir.mkdir(parents=True, exist_ok=True)
    for run in sub.runs:
        run.run_dir.mkdir(parents=True, exist_ok=True)
    local_executor.submit(sub.sweep_dir, sweeps.new_manifest(sub.sweep_dir, records, "local"), sub.options.parallel)


def submit(sub: Submission) -> str:
    """Write the Slurm files and the manifest, submit; return the (array) job id."""
    script_path = Path(sub.sbatch_argv[-1])
    script_path.parent.mkdir(parents=True, exist_ok=True)  # Slurm does not create a log's folder
    for run in sub.runs:
        (run.run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script_path.write_text(sub.script)
    records = [{"name": r.name, "recipe": r.recipe_name, "overrides": r.overrides, "words": r.words,
                "run_dir": str(r.run_dir), "job_id": None, "state": "submitting", "restarts": 0} for r in sub.runs]
    if sub.sweep_dir is not None:  # written first: an array task reads its words from it
        sweeps.write_manifest(sub.sweep_dir, sweeps.new_manifest(sub.sweep_dir, records, "slurm"))
    done = subprocess.run(sub.sbatch_argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    for i, record in enumerate(records):
        record.update(job_id=f"{job_id}_{i}" if sub.sweep_dir is not None else job_id, state="submitted",
                      submitted=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if sub.sweep_dir is not None:
        manifest = sweeps.new_manifest(sub.sweep_dir, records, "slurm")
        manifest.update(array_job_id=job_id, sbatch=shlex.join(sub.sbatch_argv),
                        profile=sub.profile.model_dump())
        sweeps.write_manifest(sub.sweep_dir, manifest)
    else:
        record = {**records[0], "executor": "slurm", "sbatch": shlex.join(sub.sbatch_argv),
                  "profile": sub.profile.model_dump()}
        (sub.runs[0].run_dir / "submission.json").write_text(json.dumps(record, indent=1) + "\n")
    return job_id


def cmd_submit(words: list[str]) -> int:
    sub = plan(words)
    if sub.options.executor == "local":
        if sub.dry_run:
            for run in sub.runs:
                print(f"{run.name}: tunefleet run {shlex.join(run.words)}")
            return 0
        submit_local(sub)
        print(f"[tunefleet] {len(sub.runs)} run(s) started on this machine, {sub.options.parallel} at a time; "
              f"sweep folder {sub.sweep_dir} (tunefleet status {sub.sweep_dir})")
        return 0
    if sub.dry_run:
        print(sub.script, end="")
        print(f"\n# submitted with:\n#   {shlex.join(sub.sbatch_argv)}\n# each node runs:\n#   {sub.node_preview}")
        if sub.sweep_dir is not None:
            print(f"# {len(sub.runs)} runs in {sub.sweep_dir}:")
            for i, run in enumerate(sub.runs):
                print(f"#   [{i}] {run.name}: {shlex.join(run.words)}")
        return 0
    job_id = submit(sub)
    if sub.sweep_dir is None:
        run = sub.runs[0]
        print(f"[tunefleet] submitted job {job_id}: {run.recipe_name} on {sub.profile.nodes} node(s); "
              f"run folder {run.run_dir}; log {run.run_dir / 'slurm' / f'slurm-{job_id}.out'}")
    else:
        print(f"[tunefleet] submitted job array {job_id} with {len(sub.runs)} runs; sweep folder {sub.sweep_dir} "
              f"(tunefleet status {sub.sweep_dir})")
    return 0
