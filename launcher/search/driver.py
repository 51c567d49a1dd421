"""`tunefleet search`: hyperparameter search with Optuna, each trial an ordinary run in a sweep folder.

    tunefleet search searches/lora.yaml [more words] [search.dir=runs/my-search]
    tunefleet search searches/lora.yaml executor=slurm cluster=NAME [slurm.KEY=VALUE ...]
    tunefleet search runs/my-search          # continue a search whose driver stopped or was cancelled

The search folder is a sweep folder (manifest.json, one run folder per trial), so `tunefleet status`,
`cancel` and `collect` work on it. A detached driver process (this module) asks Optuna for trials,
starts each as `tunefleet run` on this machine or as a single-run Slurm job (N in flight,
launcher.search.trials), asks the scheduler once per poll about them all (a scheduler that does not
answer is waited for, never read as trials ending), feeds every evaluation the run writes to metrics.jsonl
to the pruner, stops a trial the pruner rejects (SIGTERM or scancel: the run checkpoints), and tells
Optuna each finished trial's metric. The study lives in study.journal, Optuna's file journal: plain
appends under a lock file, safe on the shared file systems clusters have, where SQLite is not.

Nothing is lost when the driver dies: the journal has every trial, the manifest every run. Running
`tunefleet search FOLDER` again starts a new driver that adopts runs still alive, restarts runs that
died (train.resume=auto: from their newest checkpoint) and goes on until `trials` are done. Where
the driver runs is recorded with a heartbeat, for commands typed on other hosts (launcher.search.presence).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from launcher.cluster.executor import SchedulerDidNotAnswer
from launcher.cluster.local_executor import RUN_LOG, start_logged
from launcher.cluster.sweep import new_manifest, word_value, write_manifest
from launcher.errors import UserError
from launcher.outputs.run_files import has_submission, is_sweep, metric_points, read_manifest, read_summary
from launcher.search.presence import beat, beat_in_background, clear_stop_request, driver_seen, stop_requested
from launcher.search.space import SearchSpec, check_spec, load_search_file
from launcher.search.trials import EXECUTORS

JOURNAL = "study.journal"
SPEC_COPY = "search.yaml"
POLL_S = 1.0
REFUSALS_TO_HALT = 3  # submissions refused in a row: the cause is not passing (a bad account, a full queue)
REFUSAL_RETRY_S = 10.0  # a refused trial is submitted again after this pause


def sampler_seed(seed: int, trials_so_far: int) -> int:
    """A continued search builds its sampler anew: seeded as the first driver's was, it would suggest
    what the first trials got all over again. Mixing in how many trials the study holds draws new
    values and stays reproducible; a new search uses the file's seed as it is."""
    import numpy as np

    return seed if trials_so_far == 0 else int(np.random.SeedSequence([seed, trials_so_far]).generate_state(1)[0])


def open_study(sweep_dir: Path, spec: SearchSpec, direction: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(Path(sweep_dir) / JOURNAL)))
    try:
        so_far = len(storage.get_all_trials(storage.get_study_id_from_name("search"), deepcopy=False))
    except KeyError:  # a new study
        so_far = 0
    seed = sampler_seed(spec.seed, so_far)
    sampler = (optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # constant liar: trials in flight
               if spec.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
              "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
              "none": optuna.pruners.NopPruner}[spec.pruner]()
    study = optuna.create_study(study_name="search", storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    if not study.trials:  # a new study: the trials the file asks for first
        by_key = {p.key: p for p in spec.params}
        for entry in spec.enqueue:
            study.enqueue_trial({key: by_key[key].stored(value) for key, value in entry.items()})
    return study


# ---------------------------------------------------------------------------- one trial's run


def final_value(run_dir: Path, metric: str) -> float | None:
    """The trial's result: the best value of the metric the run kept (its artifact), else the last one."""
    summary = read_summary(run_dir)
    if summary is None:
        return None
    if summary.best and summary.best.metric == metric:
        return summary.best.value
    return summary.eval_final.get(metric)


class Driver:
    def __init__(self, sweep_dir: Path):
        self.sweep_dir = Path(sweep_dir)
        self.manifest = read_manifest(self.sweep_dir)
        search = self.manifest["search"]
        self.spec = load_search_file(str(self.sweep_dir / SPEC_COPY))
        self.extra_words, self.metric = search["extra_words"], search["metric"]
        self.study = open_study(self.sweep_dir, self.spec, search["direction"])
        self.executor = EXECUTORS[self.manifest["executor"]](search.get("executor_words", []))
        self.trials: dict[int, object] = {}  # trial number -> optuna Trial, to report to
        self.stopping = False
        self.halted: str | None = None  # why the driver gave up (the manifest records it too)
        self.refusals = 0  # submissions refused in a row
        self.silent_since: float | None = None  # when the scheduler stopped answering

    # -- bookkeeping

    def record(self, number: int) -> dict | None:
        return next((r for r in self.manifest["runs"] if r.get("trial") == number), None)

    def save(self) -> None:
        write_manifest(self.sweep_dir, self.manifest)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%Y-%m-%dT%H:%M:%S')}] {message}", flush=True)  # into search-driver.log

    def started(self) -> int:
        """Trials asked for so far (enqueued ones wait until asked)."""
        from optuna.trial import TrialState

        return sum(t.state != TrialState.WAITING for t in self.study.get_trials(deepcopy=False))

    def in_flight(self) -> list[dict]:
        return [r for r in self.manifest["runs"] if r["state"] in ("running", "pruning")]

    def refused(self) -> list[dict]:
        """Trials asked for whose submission was refused: they wait to be submitted again."""
        return [r for r in self.manifest["runs"] if r["state"] == "refused"]

    # -- runs

    def launch(self, record: dict) -> None:
        """Start the trial's run; a refusal (sbatch said no) leaves the trial open, to be tried again."""
        from launcher.cluster.submit import SchedulerBusy

        try:
            self.executor.start(record)
        except UserError as err:
            # Slurm busy or slow to answer is passing: the trial waits and is submitted again, and only
            # real refusals (a bad account, a full queue) count towards halting the search.
            self.refusals += 0 if isinstance(err, SchedulerBusy) else 1
            record.update(state="refused", error=str(err), refused_at=time.time())
            self.save()
            self.log(f"{record['name']} was not started ({self.refusals} refusal(s) in a row): {err}")
            if self.refusals >= REFUSALS_TO_HALT:
                self.halt(f"{self.refusals} submissions in a row were refused, the last: {err}. Trials already "
                          f"running go on; fix the cause and continue with tunefleet search {self.sweep_dir}")
            return
        self.refusals = 0
        record.update(state="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record.pop("refused_at", None)
        record.pop("error", None)
        self.save()

    def halt(self, reason: str) -> None:
        self.halted = reason
        self.manifest["search"]["stopped"] = reason
        self.save()
        self.log(f"the search stops: {reason}")

    def new_trial(self, trial=None) -> None:
        """Ask for a trial (or start one asked for before: its suggestions return what they stored)."""
        from optuna.trial import TrialState

        trial = trial or self.study.ask()
        values = {p.key: p.suggest(trial) for p in self.spec.params}
        overrides = {key: word_value(value) for key, value in values.items()}  # as a sweep's: command-line text
        name = f"trial-{trial.number:03d}"
        run_dir = self.sweep_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        words = [*self.spec.words_for(values), *self.extra_words, f"output.dir={run_dir}", "train.resume=auto"]
        try:
            from launcher.config.load import load_recipe

            load_recipe(words)  # the ranges were checked at their ends; a combination may still be refused
        except UserError as err:
            (run_dir / RUN_LOG).write_text(f"error: {err}\n")
            self.manifest["runs"].append({"name": name, "trial": trial.number, "run_dir": str(run_dir), "words": words,
                                          "overrides": overrides, "job_id": name, "state": "failed", "error": str(err)})
            self.study.tell(trial, state=TrialState.FAIL)
            self.save()
            return
        self.trials[trial.number] = trial
        record = {"name": name, "trial": trial.number, "run_dir": str(run_dir), "words": words, "overrides": overrides,
                  "job_id": name, "reported_step": -1, "state": "starting"}
        self.manifest["runs"].append(record)
        self.save()  # recorded before it starts: a driver dying in between must not leave it untracked
        self.launch(record)

    def prune(self, record: dict, trial, step: int) -> None:
        """Recorded first, told last: a driver killed in between leaves a record in "pruning" that the
        next one finishes (adopt), never a pruned trial whose record still says running."""
        from optuna.trial import TrialState

        record.update(state="pruning", pruned_at=step)
        self.save()
        self.executor.stop(record)
        self.study.tell(trial, state=TrialState.PRUNED)

    def poll(self, record: dict) -> None:
        from optuna.trial import TrialState

        trial = self.trials.get(record["trial"])  # none for a pruned trial whose run is still stopping
        if record["state"] == "running" and trial is not None:
            for step, value in metric_points(Path(record["run_dir"]), self.metric):
                if step > record["reported_step"]:
                    trial.report(value, step)
                    record["reported_step"] = step
                    if trial.should_prune():
                        self.prune(record, trial, step)
                        break
        if not self.executor.ended(record):
            return
        if record["state"] == "pruning":
            record["state"] = "pruned"
        else:
            value = final_value(Path(record["run_dir"]), self.metric)
            if value is None:
                record["state"] = "failed"
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                record.update(state="finished", value=value)
                self.study.tell(trial, value)
        self.save()

    # -- the loop

    def ask_scheduler(self, records: list[dict]) -> bool:
        """One question to the scheduler about these trials; False when it did not answer (said once in
        the log, and once when it answers again): nothing is known then, so nothing is decided."""
        try:
            self.executor.refresh(records)
        except SchedulerDidNotAnswer as err:
            if self.silent_since is None:
                self.silent_since = time.time()
                self.log(f"the scheduler did not answer ({err}); waiting, trials keep their state")
            return False
        if self.silent_since is not None:
            self.log(f"the scheduler answers again (after {time.time() - self.silent_since:.0f} s)")
            self.silent_since = None
        return True

    def wait_for_scheduler(self, records: list[dict]) -> bool:
        while not self.ask_scheduler(records):
            if self.stop_asked():
                return False
            time.sleep(POLL_S)
        return True

    def stop_asked(self) -> bool:
        """SIGTERM on this host, or a stop request written from any host (tunefleet cancel)."""
        self.stopping = self.stopping or stop_requested(self.sweep_dir)
        return self.stopping

    def reconcile(self) -> None:
        """Make records agree with the study where a driver died between telling Optuna and saving."""
        from optuna.trial import TrialState

        states = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for record in self.manifest["runs"]:
            frozen = states.get(record.get("trial"))
            if frozen is None or record["state"] not in ("starting", "running", "pruning", "refused"):
                continue
            if frozen.state == TrialState.PRUNED and record["state"] != "pruning":  # told, not saved
                steps = sorted(frozen.intermediate_values)
                record.update(state="pruning", pruned_at=record.get("pruned_at", steps[-1] if steps else None))
            elif frozen.state == TrialState.RUNNING and record["state"] == "pruning":  # saved, not told
                self.study.tell(frozen.number, state=TrialState.PRUNED)
            elif frozen.state == TrialState.COMPLETE:
                record.update(state="finished", value=frozen.value)
            elif frozen.state == TrialState.FAIL:
                record["state"] = "failed"

    def adopt(self) -> bool:
        """Take over the trials a previous driver left: keep polling live runs, restart dead ones, submit
        refused ones again. False when stopped while waiting for the scheduler."""
        from optuna.trial import Trial, TrialState

        self.reconcile()
        pruning = [r for r in self.manifest["runs"] if r["state"] == "pruning"]
        for record in pruning:
            self.executor.stop(record)  # idempotent: the previous driver may have died before stopping it
        if not self.wait_for_scheduler(self.in_flight()):  # "did not answer" must not read as "ended"
            return False
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            record = self.record(frozen.number)
            if record is None:  # asked, never started: the driver died in between. Start it now, so
                self.new_trial(Trial(self.study, frozen._trial_id))  # trial-N stays trial N, none lost
                continue
            self.trials[frozen.number] = Trial(self.study, frozen._trial_id)
            if record["state"] == "refused":
                continue  # submitted again by the loop
            if record["state"] == "starting":  # the driver died while starting it
                run_dir = Path(record["run_dir"])
                if not ((run_dir / RUN_LOG).exists() or has_submission(run_dir)):
                    self.launch(record)  # it never started
                    continue
                # It may be running, untracked: starting it again would put two runs in one folder.
                record.update(state="failed", error="the search's driver died while starting this trial")
                self.study.tell(frozen.number, state=TrialState.FAIL)
                continue
            if record["state"] in ("running", "pruning") and not self.executor.ended(record):
                continue
            if final_value(Path(record["run_dir"]), self.metric) is None:
                self.launch(record)  # train.resume=auto: from its newest checkpoint
            else:
                record["state"] = "running"
        for record in pruning:
            if self.executor.ended(record):
                record["state"] = "pruned"
        self.manifest["runs"].sort(key=lambda r: r["trial"])  # runs[N] is trial N, as for a sweep's run N
        self.save()
        return True

    def start_trials(self) -> None:
        """Submit refused trials again (after a pause), then ask for new ones, up to `parallel`."""
        for record in self.refused():
            if self.halted or len(self.in_flight()) >= self.spec.parallel:
                return
            if time.time() - record.get("refused_at", 0) >= REFUSAL_RETRY_S:
                self.launch(record)
        while (not self.halted and len(self.in_flight()) + len(self.refused()) < self.spec.parallel
               and self.started() < self.spec.trials):
            self.new_trial()

    def step(self) -> bool:
        """One poll: the scheduler asked once, every trial in flight read, new ones started. False when
        the search is over (done, cancelled, or halted)."""
        beat(self.sweep_dir)
        if self.stop_asked():
            return False
        in_flight = self.in_flight()
        if not self.ask_scheduler(in_flight):
            return True  # wait: a trial whose state is unknown is neither ended nor replaced
        for record in in_flight:
            self.poll(record)
        self.start_trials()
        return not self.halted and bool(self.in_flight() or self.refused())

    def stop(self) -> None:
        """Cancelled: stop the runs (they checkpoint); their trials stay open, so a resumed search continues them."""
        for record in self.in_flight():
            self.executor.stop(record)
        for record in self.in_flight():
            self.executor.wait(record)
            record["state"] = "cancelled" if record["state"] == "running" else "pruned"
        self.save()
        clear_stop_request(self.sweep_dir)

    def drive(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        self.manifest.update(supervisor_pid=os.getpid(), supervisor_host=socket.gethostname())
        self.manifest["search"].pop("stopped", None)
        beat_in_background(self.sweep_dir)
        if self.adopt():
            while self.step():
                time.sleep(POLL_S)
        if self.stopping:
            self.stop()
        return 1 if self.halted else 0


# ---------------------------------------------------------------------------- the command


def _start_driver(sweep_dir: Path) -> int:
    argv = [sys.executable, "-m", "launcher.search.driver", str(sweep_dir)]
    return start_logged(argv, sweep_dir / "search-driver.log", start_new_session=True).pid


def _split(words: list[str]) -> tuple[str | None, str | None, str, list[str], list[str]]:
    """(search file or folder, search.dir, executor, cluster= and slurm.* words, recipe words)."""
    target, folder, executor, executor_words, rest = None, None, "local", [], []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep and not word.startswith("-") and target is None:
            target = word
        elif key == "search.dir":
            folder = value
        elif key == "executor":
            if value not in EXECUTORS:
                raise UserError(f"executor={value}: use executor=local (the default) or executor=slurm")
            executor = value
        elif key == "cluster" or key.startswith("slurm."):
            executor_words.append(word)
        elif word.startswith("-"):
            raise UserError(f"unknown option {word}; tunefleet search takes SEARCH.yaml, search.dir=, executor=, "
                            "cluster=, slurm.* and recipe words")
        else:
            rest.append(word)
    if executor_words and executor != "slurm":
        raise UserError(f"{executor_words[0]} applies to Slurm: add executor=slurm")
    return target, folder, executor, executor_words, rest


def cmd_search(words: list[str]) -> int:
    target, folder, executor, executor_words, extra_words = _split(words)
    if target is None:
        raise UserError("usage: tunefleet search SEARCH.yaml [recipe words] [search.dir=DIR], "
                        "or tunefleet search SEARCH_DIR to continue one")
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise UserError("tunefleet search needs Optuna: pip install 'tunefleet[search]'")
    path = Path(target)
    if path.is_dir():
        if extra_words or folder or executor_words or executor != "local":
            raise UserError(f"{path} is a search folder: continuing it takes no other words")
        manifest = read_manifest(path)
        if "search" not in manifest:
            raise UserError(f"{path} is a sweep, not a search (no study in its manifest)")
        driver = driver_seen(path, manifest)
        if driver.running:
            raise UserError(f"{path}: its driver ({driver.describe()}) is still running"
                            + ("" if driver.here else "; stop it with tunefleet cancel, from any host"))
        clear_stop_request(path)  # a request the last driver never read: this one is to run
        pid = _start_driver(path)
        print(f"[tunefleet] search continues in {path} (driver pid {pid}); tunefleet status {path}")
        return 0
    spec = load_search_file(target)
    metric, direction = check_spec(spec, extra_words)
    if executor == "slurm":
        from launcher.cluster.profiles import load_profile
        from launcher.cluster.submit import split_submit_words

        options = split_submit_words(executor_words)[1]
        load_profile(options.cluster, options.slurm)  # a bad profile or slurm.* key is named now, not per trial
    sweep_dir = Path(folder or f"runs/search-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if is_sweep(sweep_dir):
        raise UserError(f"{sweep_dir} already holds a sweep or search; continue it with tunefleet search {sweep_dir}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(target, sweep_dir / SPEC_COPY)  # the search continues with the file it started with
    manifest = new_manifest(sweep_dir, [], executor)
    manifest["search"] = {"file": str(Path(target).resolve()), "extra_words": extra_words, "metric": metric,
                          "direction": direction, "executor_words": executor_words}
    write_manifest(sweep_dir, manifest)
    pid = _start_driver(sweep_dir)
    print(f"[tunefleet] searching {len(spec.params)} key(s), {spec.trials} trials ({spec.parallel} at a time on "
          f"{'Slurm' if executor == 'slurm' else 'this machine'}, "
          f"{spec.sampler}, pruner {spec.pruner}), {direction} {metric}")
    print(f"[tunefleet] search folder {sweep_dir} (driver pid {pid}); follow it with tunefleet status {sweep_dir}, "
          f"results with tunefleet collect {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(Driver(Path(sys.argv[1])).drive())
