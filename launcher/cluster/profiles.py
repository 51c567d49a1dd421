"""Cluster profiles: where and how a recipe runs on a cluster, in a small YAML file.

    tunefleet submit recipe=lora cluster=mycluster slurm.nodes=2 slurm.time=02:00:00

`cluster=NAME` picks `slurm/clusters/NAME.yaml` (or a path); `slurm.KEY=VALUE` overrides one field.
A recipe run then needs no hand-edited sbatch file. Values that become #SBATCH directives are
checked here: they are not shell code, but a newline or a quote in one could start a new directive
or a command, so only plain characters are accepted. `setup` lines are the one place meant for
shell code (module loads, activating an environment): they are written as the user wrote them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from launcher.errors import UserError

PROFILES_DIR = Path(__file__).resolve().parents[2] / "slurm" / "clusters"
# What a directive value may hold: letters, digits and the punctuation Slurm values use
# (partition lists, gres specs, times, memory sizes, feature expressions).
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=+@%/\-\[\]()&|*]+$")


class ClusterProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    description: str = Field("", description="What this cluster is.")
    partition: Optional[str] = Field(None, description="Slurm partition (--partition).")
    account: Optional[str] = Field(None, description="Account charged for the job (--account).")
    qos: Optional[str] = Field(None, description="Quality of service (--qos).")
    nodes: int = Field(1, ge=1, description="Nodes per run (--nodes); becomes distributed.num_machines.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (--gpus-per-node); also the processes per node. "
                                                    "0: a CPU cluster, processes per node from the recipe.")
    cpus_per_task: Optional[int] = Field(None, ge=1, description="CPU cores for each node's launcher and its processes.")
    mem: Optional[str] = Field(None, description="Memory per node (--mem), e.g. 200G.")
    time: str = Field("04:00:00", description="Time limit (--time); the run checkpoints and requeues before it.")
    constraint: Optional[str] = Field(None, description="Node features (--constraint).")
    signal_seconds: int = Field(120, ge=10, description="Seconds before the time limit at which the job checkpoints "
                                                         "(--signal=B:USR1@N); one step plus a checkpoint must fit.")
    max_restarts: int = Field(3, ge=0, description="How often a job that checkpointed may requeue itself.")
    device_memory: Optional[str] = Field(None, description="Memory of one GPU, e.g. 80GiB: `tunefleet plan` checks "
                                                          "the run fits it.")
    array_parallelism: Optional[int] = Field(None, ge=1, description="A sweep's runs at most running at once "
                                                                     "(the %N of its job array); unset: no cap.")
    python: Optional[str] = Field(None, description="The Python with tunefleet installed on the nodes "
                                                    "(default: the one running `tunefleet submit`).")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before training (module load, "
                                                               "source venv/bin/activate, export VAR=...).")
    sbatch: list[str] = Field(default_factory=list, description="Extra #SBATCH options, e.g. --exclusive or "
                                                                "--mail-type=END.")

    @field_validator("partition", "account", "qos", "mem", "time", "constraint", "python")
    @classmethod
    def _plain(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not SAFE_VALUE.match(value):
            raise ValueError(f"{value!r} holds characters a #SBATCH value may not (spaces, quotes, $, ;, newlines)")
        return value

    @field_validator("sbatch")
    @classmethod
    def _options(cls, values: list[str]) -> list[str]:
        for option in values:
            if not re.match(r"^--?[A-Za-z][A-Za-z0-9-]*(=.+)?$", option) or (
                    "=" in option and not SAFE_VALUE.match(option.split("=", 1)[1])):
                raise ValueError(f"{option!r} is not a plain #SBATCH option such as --exclusive or --mail-type=END")
        return values

    @field_validator("setup")
    @classmethod
    def _lines(cls, values: list[str]) -> list[str]:
        if any("\n" in line for line in values):
            raise ValueError("each setup entry is one shell line (no newlines inside)")
        return values


def available_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.yaml"))}


def load_profile(name: str | None, overrides: list[tuple[str, str]]) -> ClusterProfile:
    """The profile `cluster=NAME` picks (none: all defaults), with `slurm.KEY=VALUE` overrides applied."""
    data: dict = {}
    if name:
        path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise UserError(f"cluster={name}: no such profile (shipped: {', '.join(available_profiles())}; "
                            "or give a path to a .yaml file)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: a cluster profile is a mapping of keys to values")
    for key, raw in overrides:
        if key not in ClusterProfile.model_fields:
            raise UserError(f"slurm.{key}: unknown key; valid keys: {', '.join(ClusterProfile.model_fields)}")
        data[key] = yaml.safe_load(raw) if raw else raw
    try:
        return ClusterProfile(**data)
    except ValidationError as err:
        problems = [f"slurm.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                    for e in err.errors()]
        raise UserError("cluster profile: " + "; ".join(problems)) from None
