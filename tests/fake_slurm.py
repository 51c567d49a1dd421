"""Stand-in Slurm commands for fault-injection tests: squeue, sbatch, scancel, scontrol and sacct on
PATH, answering from a JSON file the test edits, and recording every call.

    slurm = FakeSlurm(tmp_path)            # puts its commands first on PATH (monkeypatch)
    slurm.set_job("101_0", "RUNNING", nodes="node[1-2]")
    slurm.squeue_down = True               # squeue now fails as a controller that does not answer
    slurm.calls()                          # [["squeue", "-h", ...], ...]

Jobs are as `squeue -t all` lists them: a job absent from the file is one Slurm has forgotten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path

COMMANDS = ("squeue", "sbatch", "scancel", "scontrol", "sacct")
LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED")


@contextlib.contextmanager
def locked(folder: Path):
    """The test and the commands both change state.json: one at a time."""
    with (Path(folder) / "state.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class FakeSlurm:
    def __init__(self, folder: Path, monkeypatch):
        self.folder = Path(folder)
        self.state_file = self.folder / "state.json"
        self.calls_file = self.folder / "calls.jsonl"
        bin_dir = self.folder / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for command in COMMANDS:
            script = bin_dir / command
            script.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {command} "
                              f"{self.folder} \"$@\"\n")
            script.chmod(0o755)
        self._write({"jobs": {}, "squeue_down": False, "sbatch_refuses": False, "next_id": 100})
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def _read(self) -> dict:
        return json.loads(self.state_file.read_text())

    def _write(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def set_job(self, job: str, state: str, reason: str = "None", nodes: str = "", restarts: int = 0,
                exit_code: str = "0") -> None:
        with locked(self.folder):
            data = self._read()
            data["jobs"][job] = {"state": state, "reason": reason, "nodes": nodes, "restarts": restarts,
                                 "exit": exit_code}
            self._write(data)

    def jobs(self) -> dict:
        return self._read()["jobs"]

    def _flag(self, name: str, value: bool) -> None:
        with locked(self.folder):
            data = self._read()
            data[name] = value
            self._write(data)

    squeue_down = property(lambda self: self._read()["squeue_down"], lambda self, v: self._flag("squeue_down", v))
    sbatch_refuses = property(lambda self: self._read()["sbatch_refuses"],
                              lambda self, v: self._flag("sbatch_refuses", v))

    def calls(self, command: str | None = None) -> list[list[str]]:
        if not self.calls_file.is_file():
            return []
        calls = [json.loads(line) for line in self.calls_file.read_text().splitlines()]
        return [c for c in calls if command is None or c[0] == command]

    def clear_calls(self) -> None:
        self.calls_file.unlink(missing_ok=True)


def _option(argv: list[str], short: str) -> str:
    return argv[argv.index(short) + 1] if short in argv else ""


def main(command: str, folder: Path, argv: list[str]) -> int:
    with locked(folder):
        return answer(command, folder, argv)


def answer(command: str, folder: Path, argv: list[str]) -> int:
    with (folder / "calls.jsonl").open("a") as f:
        f.write(json.dumps([command, *argv]) + "\n")
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text())
    jobs = state["jobs"]
    if command == "squeue":
        if state["squeue_down"]:
            print("slurm_load_jobs error: Unable to contact slurm controller (connect failure)", file=sys.stderr)
            return 1
        wanted = set(_option(argv, "-j").split(",")) if "-j" in argv else None  # else: all of them
        known = {job: info for job, info in jobs.items() if wanted is None or job.split("_")[0] in wanted}
        if wanted and not known:
            print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
            return 1
        for job, info in known.items():
            if "all" not in _option(argv, "-t") and info["state"] not in LIVE:
                continue  # without -t all, squeue lists the queue only
            if "-O" in argv:  # the fields launcher.cluster.slurm_executor asks for
                print(f"{job}|{info['state']}|{info['reason']}|{info['nodes']}|{info['restarts']}|{info['exit']}|")
            else:  # -o with %i, %T, %r, %N, %o (no command is known: empty)
                line = _option(argv, "-o")
                for code, value in (("%i", job), ("%T", info["state"]), ("%r", info["reason"]),
                                    ("%N", info["nodes"]), ("%o", "")):
                    line = line.replace(code, value)
                print(line)
        return 0
    if command == "sbatch":
        if state["sbatch_refuses"]:
            print("sbatch: error: Batch job submission failed: Invalid account or account/partition combination "
                  "specified", file=sys.stderr)
            return 1
        job = str(state["next_id"])
        state["next_id"] += 1
        jobs[job] = {"state": "PENDING", "reason": "Priority", "nodes": "", "restarts": 0, "exit": "0"}
        state_file.write_text(json.dumps(state))
        print(job)
        return 0
    if command == "scancel":
        for job in (a for a in argv if not a.startswith("-")):
            if job in jobs:
                jobs[job]["state"] = "CANCELLED"
        state_file.write_text(json.dumps(state))
        return 0
    if command == "sacct":
        print("Slurm accounting storage is disabled", file=sys.stderr)
        return 1
    return 1  # scontrol: not needed by what is tested


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
