"""What a submitted job needs beyond its words, handed from `tunefleet submit` to the batch process.

`tunefleet submit` writes RUN/slurm/job-settings.json (a sweep: SWEEP/slurm/job-settings.json) and
exports its path as TUNEFLEET_JOB_SETTINGS in the rendered script; launcher.cluster.job reads it
before it starts the training step. A batch script started by hand has no such file: every
setting then has its default. Values in it never pass through a shell: the environment mapping is
set with os.environ, the container words are srun arguments.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

SETTINGS_ENV = "TUNEFLEET_JOB_SETTINGS"
SETTINGS_FILE = "job-settings.json"


@dataclass(frozen=True)
class JobSettings:
    env: dict[str, str] = field(default_factory=dict)  # set for the training step on every node (NCCL_*, ...)

    def srun_options(self) -> list[str]:
        """Options for the training step's srun (e.g. pyxis's --container-image)."""
        return []

    def command_prefix(self) -> list[str]:
        """Words before `python -m launcher.cluster.node` (e.g. `apptainer exec --nv IMAGE`)."""
        return []

    def to_json(self) -> str:
        return json.dumps({"env": self.env}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "JobSettings":
        data = json.loads(text)
        return cls(env=dict(data.get("env") or {}))


def load_job_settings(environ: Mapping[str, str] | None = None) -> JobSettings:
    """The settings `tunefleet submit` wrote for this job; defaults for a script started by hand."""
    path = (os.environ if environ is None else environ).get(SETTINGS_ENV)
    if not path:
        return JobSettings()
    return JobSettings.from_json(Path(path).read_text())
