"""What a submitted job needs beyond its words, handed from `tunefleet submit` to the batch process.

`tunefleet submit` writes RUN/slurm/job-settings.json (a sweep: SWEEP/slurm/job-settings.json,
mode 0600) and exports its path as TUNEFLEET_JOB_SETTINGS in the rendered script;
launcher.cluster.job reads it before it starts the training step. A batch script started by hand
has no such file: every setting then has its default. Values in it never pass through a shell: the
environment mapping is set with os.environ, the container words are srun arguments.

A container holds the training step only: the batch process (launcher.cluster.job) runs on the
host, where srun is. pyxis takes the image as srun options; apptainer is a command before python.
Either way the image's own Python runs the node's launcher (profile `python`, default `python`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from launcher.errors import UserError

SETTINGS_ENV = "TUNEFLEET_JOB_SETTINGS"
SETTINGS_FILE = "job-settings.json"


@dataclass(frozen=True)
class Container:
    runtime: str  # "pyxis" or "apptainer"
    image: str
    mounts: tuple[str, ...]  # SRC:DST[:FLAGS]
    workdir: str  # where the step starts inside the image: `tunefleet submit`'s folder
    python: str = "python"  # the image's
    gpus: bool = False  # apptainer --nv: only when GPUs are requested
    mount_home: bool = True  # pyxis: False adds --no-container-mount-home


@dataclass(frozen=True)
class JobSettings:
    env: dict[str, str] = field(default_factory=dict)  # set for the training step on every node (NCCL_*, ...)
    container: Container | None = None
    retries: int = 2  # requeues after an infrastructure failure (launcher.cluster.retry)
    hang_seconds: float = 1800.0  # a step that logs nothing new for this long is ended and retried; 0: never

    def srun_options(self) -> list[str]:
        """Options for the training step's srun (pyxis's --container-image and friends)."""
        box = self.container
        if box is None or box.runtime != "pyxis":
            return []
        return [f"--container-image={box.image}", f"--container-mounts={','.join(box.mounts)}",
                f"--container-workdir={box.workdir}", *([] if box.mount_home else ["--no-container-mount-home"])]

    def command_prefix(self) -> list[str]:
        """Words before `python -m launcher.cluster.node` (`apptainer exec --nv --bind ... IMAGE`)."""
        box = self.container
        if box is None or box.runtime == "pyxis":
            return []
        return ["apptainer", "exec", *(["--nv"] if box.gpus else []), "--bind", ",".join(box.mounts), box.image]

    def python(self, host_python: str) -> str:
        """The Python that runs the node's launcher: the image's inside a container (the batch process's
        own path is a host path that need not exist there), else the batch process's own."""
        return self.container.python if self.container else host_python

    def to_json(self) -> str:
        return json.dumps({"env": self.env, "container": asdict(self.container) if self.container else None,
                           "retries": self.retries, "hang_seconds": self.hang_seconds}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "JobSettings":
        data = json.loads(text)
        box = data.get("container")
        defaults = cls()
        return cls(env=dict(data.get("env") or {}),
                   container=Container(**{**box, "mounts": tuple(box["mounts"])}) if box else None,
                   retries=int(data.get("retries", defaults.retries)),
                   hang_seconds=float(data.get("hang_seconds", defaults.hang_seconds)))

    def write(self, path: Path) -> None:
        """Owner-only (0600) from its first byte, and whole: written under a temporary name, then renamed."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)  # a leftover could have any mode; O_CREAT keeps an existing file's
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)


def load_job_settings(environ: Mapping[str, str] | None = None) -> JobSettings:
    """The settings `tunefleet submit` wrote for this job; defaults for a script started by hand."""
    path = (os.environ if environ is None else environ).get(SETTINGS_ENV)
    if not path:
        return JobSettings()
    try:
        return JobSettings.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{SETTINGS_ENV}={path}: cannot read the job's settings ({err}); submit the run again with "
                        "tunefleet submit, or unset the variable to run with the defaults") from None
