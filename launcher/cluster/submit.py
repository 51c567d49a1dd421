"""`tunefleet submit`: validate runs, render their batch script, submit them to Slurm.

    tunefleet submit recipe=lora train.lr=2e-4 [cluster=NAME] [slurm.nodes=2 ...] [--dry-run]
    tunefleet submit recipe=lora,qlora train.lr=1e-4,2e-4 [sweep.dir=runs/my-sweep] ...   (a sweep)
    tunefleet submit sweep=sweeps/lr_and_rank.yaml [more words, comma lists cross it] ...

A run's folder is decided here, once (its {time} rendered now), and holds everything of the run:
the rendered script (RUN/slurm/job.sbatch), what the job needs beyond its words
(RUN/slurm/job-settings.json: environment, container), Slurm's log appended across requeues
(RUN/slurm/slurm-JOBID.out) and RUN/submission.json. A sweep is one job array (at most
`array_parallelism` runs at once) over a sweep folder with manifest.json and one folder per run,
and, unless the profile says `collect: false`, a job that runs `tunefleet collect` once the array
has ended. Every run is validated before anything is written or submitted: one typo wastes no
queue slot.

Submitting the same words again continues what did not finish: a run whose job ended (cancelled,
failed, stopped after its last requeue) resumes from its checkpoint (the job's words start with
train.resume=auto); for a sweep (the same words and sweep.dir=), one new job array over the runs
that are neither finished nor still pending or running (`--array=1,3`). A folder whose job still
pends or runs is refused (launcher.cluster.claim); a finished run is never submitted again.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.cluster import sweep as sweeps
from launcher.cluster.claim import claimed, live_jobs
from launcher.cluster.job_settings import SETTINGS_FILE, Container, JobSettings
from launcher.cluster.profiles import ClusterProfile, check_mount, load_profile
from launcher.cluster.render import render, render_collect, safe_job_name, template_for
from launcher.errors import UserError
from launcher.outputs.run_files import is_finished, is_sweep, read_manifest, read_submission, write_submission

# Stands in for the head node while validating at submission; each node gets the real one in the job.
HEAD_PLACEHOLDER = "slurm-head-node"
SWEEP_TASK_FLAG = "--sweep-task"  # the job picks its run from the sweep's manifest by array index
SBATCH_TIMEOUT_S = 120


@dataclass
class Planned:
    name: str  # run folder name (the recipe's for a single run, the differing values in a sweep)
    recipe_name: str
    run_dir: Path
    words: list[str]  # what the job runs: recipe, overrides, where the run lives
    overrides: dict[str, str]  # the values that differ from the sweep's other runs
    finished: bool = False  # a sweep submitted again leaves it out


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
    settings: JobSettings = field(default_factory=JobSettings)
    earlier: dict | None = None  # what the folder's last submission recorded (submission.json, manifest)
    python: str = ""  # the host's Python with tunefleet: the batch process and the collect job run it


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
    if profile.gpu_count:
        layout.append(f"distributed.num_processes={profile.gpu_count}")
    return layout


def _check(words: list[str]):
    """Validate as the job will see it (train.resume=auto, a head node); return (recipe name, recipe)."""
    from launcher.config.load import load_recipe

    return load_recipe(["train.resume=auto", *words, f"distributed.main_process_ip={HEAD_PLACEHOLDER}"])


def _preflight(recipe, name: str, continues: bool) -> None:
    """Paths checked as a fresh run (its folder must be free) or as a continuation (the folder holds it)."""
    from launcher.preflight import preflight

    resume = "auto" if continues else "never"
    preflight(recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume": resume})}), name)


def _same_words(folder: Path, recorded: list[str], words: list[str], how: str) -> None:
    if recorded != words:
        gone = [w for w in recorded if w not in words]
        new = [w for w in words if w not in recorded]
        raise UserError(f"{folder} was submitted with other words ({', '.join(gone) or 'none'} then; "
                        f"{', '.join(new) or 'none'} now). {how}")


def _plan_single(recipe_words: list[str], layout: list[str]) -> tuple[Planned, dict | None]:
    from launcher.outputs.run_dir import check_free, render_dir

    words = [*recipe_words, *layout]
    name, recipe = _check(words)
    run_dir = render_dir(recipe.output.dir, name).resolve()
    words.append(f"output.dir={run_dir}")
    name, recipe = _check(words)
    earlier = read_submission(run_dir)
    if earlier is None:
        check_free(run_dir)
    elif is_finished(run_dir):
        raise UserError(f"output.dir {run_dir} already holds a finished run (job {earlier.get('job_id')}); "
                        "nothing to continue. Choose another output.dir to train again")
    else:
        _same_words(run_dir, earlier.get("words", []), words,
                    "Give the same words to continue it, or choose another output.dir for a new run")
    _preflight(recipe, name, continues=earlier is not None)
    return Planned(run_dir.name, name, run_dir, words, {}), earlier


def _plan_sweep(grid: list[dict[str, str]], layout: list[str], sweep_dir: Path) -> tuple[list[Planned], dict | None]:
    earlier = read_manifest(sweep_dir) if is_sweep(sweep_dir) else None
    if earlier is not None and (earlier.get("executor") != "slurm" or "search" in earlier):
        raise UserError(f"sweep.dir={sweep_dir} already holds a sweep run by executor={earlier.get('executor')}"
                        f"{' (a search)' if 'search' in earlier else ''}; choose another sweep.dir")
    planned, problems = [], []
    varying = sweeps.varying_keys(grid)
    for values, name in zip(grid, sweeps.unique_names(grid)):
        run_dir = sweep_dir / name
        words = [f"{k}={v}" for k, v in values.items()] + layout + [f"output.dir={run_dir}"]
        try:
            recipe_name, recipe = _check(words)
            _preflight(recipe, recipe_name, continues=earlier is not None)
        except UserError as err:
            problems.append((name, str(err)))
            continue
        planned.append(Planned(name, recipe_name, run_dir, words, {k: values[k] for k in varying},
                               finished=earlier is not None and is_finished(run_dir)))
    if problems:
        by_message: dict[str, list[str]] = {}
        for name, message in problems:
            by_message.setdefault(message, []).append(name)
        lines = [f"run(s) {', '.join(names)}: {message}" for message, names in by_message.items()]
        raise UserError(f"{len(problems)} of {len(grid)} runs of the sweep are invalid; nothing was submitted:\n"
                        + "\n".join(lines))
    if earlier is not None:
        _same_words(sweep_dir, [w for r in earlier["runs"] for w in r["words"]], [w for r in planned for w in r.words],
                    "Give the words the sweep was submitted with to continue it, or choose another sweep.dir")
    return planned, earlier


def _plan_runs(recipe_words: list[str], profile: ClusterProfile, options: SubmitOptions, always_sweep: bool
               ) -> tuple[list[Planned], Path | None, dict | None]:
    from launcher.outputs.run_dir import render_dir

    grid = sweeps.expand_grid(recipe_words)
    if options.sweep_file:
        grid = sweeps.cross(sweeps.load_sweep_file(options.sweep_file), grid)
        always_sweep = True
    layout = _layout(profile)
    if len(grid) == 1 and not always_sweep:
        run, earlier = _plan_single(recipe_words, layout)
        return [run], None, earlier
    sweep_dir = render_dir(options.sweep_dir or "runs/sweep-{time}", "sweep", key="sweep.dir").resolve()
    if options.executor == "local" and is_sweep(sweep_dir):
        raise UserError(f"sweep.dir={sweep_dir} already holds a sweep; choose another sweep.dir")
    runs, earlier = _plan_sweep(grid, layout, sweep_dir)
    return runs, sweep_dir, earlier


def _mount_of(path: Path, what: str) -> str:
    try:
        return check_mount(f"{path}:{path}")
    except ValueError:
        raise UserError(f"{what} {path} holds a ',' or ':', which a container mount cannot name; "
                        "use a folder without them") from None


def job_settings(profile: ClusterProfile, folder: Path) -> JobSettings:
    """What the batch process needs beyond the words: the step's environment and its container. The
    container sees `tunefleet submit`'s folder (where the job starts) and the run or sweep folder at
    their own paths, so that the words' paths hold inside it too."""
    box = profile.container
    failures = {"retries": profile.retries, "hang_seconds": profile.hang_minutes * 60}
    if box is None:
        return JobSettings(env=dict(profile.env), **failures)
    workdir = Path.cwd()
    mounts = [_mount_of(workdir, "the working folder")]
    if not folder.is_relative_to(workdir):
        mounts.append(_mount_of(folder, "the run folder"))
    mounts += [m if ":" in m else f"{m}:{m}" for m in box.mounts]
    return JobSettings(env=dict(profile.env), container=Container(
        runtime=box.runtime, image=box.image, mounts=tuple(mounts), workdir=str(workdir),
        python=profile.python or "python", gpus=profile.gpu_count > 0, mount_home=box.mount_home), **failures)


def array_option(indices: list[int], cap: int | None) -> str:
    """--array over these manifest indices: 0-N for all of them, else a list (1,3)."""
    spread = f"0-{len(indices) - 1}" if indices == list(range(len(indices))) else ",".join(map(str, indices))
    return f"--array={spread}" + (f"%{cap}" if cap else "")


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
    runs, sweep_dir, earlier = _plan_runs(recipe_words, profile, options, always_sweep=local)
    if local:
        return Submission(profile, runs, sweep_dir, "", [], "", options.dry_run, options)
    # In a container the image's Python runs the training step; the batch process stays on the host.
    python = sys.executable if profile.container else (profile.python or sys.executable)
    if sweep_dir is None:
        run = runs[0]
        folder, script_words, name = run.run_dir, run.words, safe_job_name("tf-", run.recipe_name)
        sbatch_options = [f"--output={folder / 'slurm' / 'slurm-%j.out'}"]
    else:
        folder, script_words, name = sweep_dir, [SWEEP_TASK_FLAG, str(sweep_dir)], safe_job_name("tf-sweep-",
                                                                                                sweep_dir.name)
        indices = [i for i, r in enumerate(runs) if not r.finished]
        if not indices:
            raise UserError(f"sweep.dir={sweep_dir}: all {len(runs)} runs have finished; nothing to submit "
                            f"(results: tunefleet collect {sweep_dir})")
        # Each task writes its own run folder's log (launcher.cluster.job); this one only catches what
        # happens before that.
        sbatch_options = [array_option(indices, profile.array_parallelism),
                          f"--output={sweep_dir / 'slurm' / 'array-%A_%a.out'}"]
    settings = job_settings(profile, folder)
    script = render(template_for(profile.nodes), profile, script_words, job_name=name, python=python,
                    settings_file=folder / "slurm" / SETTINGS_FILE)
    sbatch_argv = ["sbatch", "--parsable", *sbatch_options, f"--chdir={Path.cwd()}", str(folder / "slurm" / "job.sbatch")]
    step = shlex.join(["srun", "--ntasks-per-node=1", *settings.srun_options(), *settings.command_prefix(),
                       settings.python(python)])
    node_preview = (f"{step} -m launcher.cluster.node " + shlex.join(["train.resume=auto", *runs[0].words])
                    + " distributed.machine_rank=$SLURM_NODEID distributed.main_process_ip=<first node>"
                      " distributed.main_process_port=<a port free on the first node>")
    return Submission(profile, runs, sweep_dir, script, sbatch_argv, node_preview, options.dry_run, options,
                      settings, earlier, python)


def submit_local(sub: Submission) -> None:
    from launcher.cluster import local_executor

    records = [{"name": r.name, "recipe": r.recipe_name, "overrides": r.overrides, "words": r.words,
                "run_dir": str(r.run_dir), "restarts": 0} for r in sub.runs]
    sub.sweep_dir.mkdir(parents=True, exist_ok=True)
    for run in sub.runs:
        run.run_dir.mkdir(parents=True, exist_ok=True)
    local_executor.submit(sub.sweep_dir, sweeps.new_manifest(sub.sweep_dir, records, "local"), sub.options.parallel)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# What slurmctld says when it is busy or briefly unreachable: worth trying again, not a refusal.
PASSING = re.compile(r"Socket timed out|Unable to contact slurm controller|Resource temporarily unavailable|"
                     r"slurm_receive_msg|try again|Transport endpoint", re.I)


class SchedulerBusy(UserError):
    """sbatch did not answer, or slurmctld was busy: the submission may be tried again as it is."""


def _sbatch(argv: list[str], folder: Path) -> str:
    """Run sbatch; the job id. A time-out may still have created the job: the next submit finds it by
    its script (launcher.cluster.claim), so trying again is safe."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SchedulerBusy(f"sbatch did not answer in {SBATCH_TIMEOUT_S} s; Slurm may have created the job anyway. "
                            f"Submit again: a job already queued for {folder} is found and named") from None
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise (SchedulerBusy if PASSING.search(said) else UserError)(f"sbatch refused the job: {said}")
    return done.stdout.strip().split(";")[0]


def _new_record(run: Planned) -> dict:
    return {"name": run.name, "recipe": run.recipe_name, "overrides": run.overrides, "words": run.words,
            "run_dir": str(run.run_dir), "job_id": None, "state": "submitting", "restarts": 0}


def _again(record: dict) -> dict:
    """A record about to get a new job: the earlier job goes into its history."""
    earlier = {k: record.get(k) for k in ("job_id", "state", "restarts", "submitted")}
    return {**record, "job_id": None, "state": "submitting",
            "earlier_jobs": [*record.get("earlier_jobs", []), earlier]}


def _refuse_live(folder: Path, live: dict[str, str]) -> None:
    jobs = ", ".join(f"{job} ({state})" for job, state in sorted(live.items()))
    raise UserError(f"{folder}: job {jobs} still trains in this folder; a second job would interleave its "
                    f"checkpoints. Wait for it to end, or stop it with `tunefleet cancel {folder}`, then submit "
                    "again to continue")


def _submit_single(sub: Submission) -> str:
    run = sub.runs[0]
    script_path = Path(sub.sbatch_argv[-1])
    earlier = read_submission(run.run_dir)  # read again under the claim: the latest job id
    live = live_jobs(script_path, [(earlier or {}).get("job_id")])
    if live:
        _refuse_live(run.run_dir, live)
    (run.run_dir / "slurm").mkdir(parents=True, exist_ok=True)  # Slurm does not create a log's folder
    write_script(script_path, sub.script)
    sub.settings.write(run.run_dir / "slurm" / SETTINGS_FILE)
    record = {**(_again(earlier) if earlier else _new_record(run)), "executor": "slurm",
              "sbatch": shlex.join(sub.sbatch_argv), "profile": sub.profile.recorded()}
    write_submission(run.run_dir, record)  # before sbatch: the folder names its submission from now on
    try:
        job_id = _sbatch(sub.sbatch_argv, run.run_dir)
    except UserError:
        write_submission(run.run_dir, {**record, "state": "not submitted"})
        raise
    write_submission(run.run_dir, {**record, "job_id": job_id, "state": "submitted", "submitted": _now()})
    return job_id


def _submit_sweep(sub: Submission) -> tuple[str, list[int]]:
    sweep_dir = sub.sweep_dir
    script_path = Path(sub.sbatch_argv[-1])
    if sub.earlier is None:
        manifest = sweeps.new_manifest(sweep_dir, [_new_record(r) for r in sub.runs], "slurm")
        indices = list(range(len(sub.runs)))
    else:
        manifest = read_manifest(sweep_dir)  # read again under the claim: the latest job ids
        records = manifest["runs"]
        live = live_jobs(script_path, [r.get("job_id") for r in records])
        unknown = {job: state for job, state in live.items() if job not in {r.get("job_id") for r in records}}
        if unknown:
            _refuse_live(sweep_dir, unknown)
        indices = [i for i, run in enumerate(sub.runs) if not run.finished and records[i].get("job_id") not in live]
        if not indices:
            raise UserError(f"sweep.dir={sweep_dir}: every run has finished or still pends or runs "
                            f"({', '.join(sorted(live))}); nothing to submit. Stop a run with "
                            f"`tunefleet cancel {sweep_dir}` first to submit it again")
        for i in indices:
            records[i] = _again(records[i])
        manifest["earlier_array_job_ids"] = [*manifest.get("earlier_array_job_ids", []), manifest.get("array_job_id")]
    argv = [w if not w.startswith("--array=") else array_option(indices, sub.profile.array_parallelism)
            for w in sub.sbatch_argv]
    (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
    for run in sub.runs:
        (run.run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    write_script(script_path, sub.script)
    sub.settings.write(sweep_dir / "slurm" / SETTINGS_FILE)
    manifest.update(sbatch=shlex.join(argv), profile=sub.profile.recorded())
    sweeps.write_manifest(sweep_dir, manifest)  # written first: an array task reads its words from it
    array_id = _sbatch(argv, sweep_dir)
    for i in indices:
        manifest["runs"][i].update(job_id=f"{array_id}_{i}", state="submitted", submitted=_now())
    manifest.update(array_job_id=array_id, collect_job_id=None)
    sweeps.write_manifest(sweep_dir, manifest)
    if sub.profile.collect:
        manifest["collect_job_id"] = submit_collect(sub, array_id)
        sweeps.write_manifest(sweep_dir, manifest)
    return array_id, indices


def submit_collect(sub: Submission, array_id: str) -> str | None:
    """A job that runs `tunefleet collect SWEEP` once every task of the array has ended, however it ended
    (afterany); a dependency Slurm can never satisfy cancels it instead of leaving it queued."""
    logs = sub.sweep_dir / "slurm"
    script = logs / "collect.sbatch"
    script.write_text(render_collect(sub.profile, sub.sweep_dir, sub.python))
    argv = ["sbatch", "--parsable", f"--dependency=afterany:{array_id}", "--kill-on-invalid-dep=yes",
            f"--output={logs / 'collect-%j.out'}", f"--chdir={Path.cwd()}", str(script)]
    try:
        return _sbatch(argv, sub.sweep_dir)
    except UserError as err:  # the array is submitted: say so, do not fail the submit
        print(f"[tunefleet] warning: the collect job was not submitted ({err}); collect by hand with "
              f"tunefleet collect {sub.sweep_dir}", file=sys.stderr)
        return None


def write_script(path: Path, script: str) -> None:
    """The batch script, readable by its owner alone: the profile's setup lines are shell the user wrote,
    and an `export TOKEN=...` among them must not be readable by everyone on a shared file system."""
    path.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(script)


def submit(sub: Submission) -> str:
    """Write the Slurm files and the record, submit under the folder's claim; return the (array) job id."""
    folder = sub.sweep_dir or sub.runs[0].run_dir
    with claimed(folder):
        if sub.sweep_dir is None:
            return _submit_single(sub)
        return _submit_sweep(sub)[0]


def cmd_submit(words: list[str]) -> int:
    sub = plan(words)
    if sub.profile.gpu_count and sub.profile.cpus_per_task is None and sub.options.executor == "slurm":
        print("[tunefleet] note: slurm.gpus_per_node without slurm.cpus_per_task: each node gets the site's default "
              "CPUs for its one task (often 1, shared by every rank and data loader); set slurm.cpus_per_task",
              file=sys.stderr)
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
        if sub.settings.env:
            print(f"# the training step's environment adds (job-settings.json): {', '.join(sub.settings.env)}")
        if sub.sweep_dir is not None:
            print(f"# {len(sub.runs)} runs in {sub.sweep_dir}:")
            for i, run in enumerate(sub.runs):
                print(f"#   [{i}] {run.name}: " + ("finished, left out" if run.finished else shlex.join(run.words)))
            if sub.profile.collect:
                print(f"# then a job collects the results: sbatch --dependency=afterany:ARRAY {sub.sweep_dir}"
                      "/slurm/collect.sbatch")
        return 0
    if sub.sweep_dir is None:
        job_id = submit(sub)
        run = sub.runs[0]
        again = f" (continues it: train.resume=auto; earlier job {sub.earlier.get('job_id')})" if sub.earlier else ""
        print(f"[tunefleet] submitted job {job_id}: {run.recipe_name} on {sub.profile.nodes} node(s); "
              f"run folder {run.run_dir}{again}; log {run.run_dir / 'slurm' / f'slurm-{job_id}.out'}")
        return 0
    with claimed(sub.sweep_dir):
        job_id, indices = _submit_sweep(sub)
    which = f"runs {','.join(map(str, indices))} of {len(sub.runs)}" if sub.earlier else f"{len(sub.runs)} runs"
    manifest = read_manifest(sub.sweep_dir)
    collect = (f"; job {manifest['collect_job_id']} collects the results when it ends"
               if manifest.get("collect_job_id") else "")
    print(f"[tunefleet] submitted job array {job_id} with {which}; sweep folder {sub.sweep_dir} "
          f"(tunefleet status {sub.sweep_dir}){collect}")
    return 0
