"""Cluster profiles: where and how a recipe runs on a cluster, in a small YAML file.

    tunefleet submit recipe=lora cluster=mycluster slurm.nodes=2 slurm.time=02:00:00

`cluster=NAME` picks `slurm/clusters/NAME.yaml` (or a path); `slurm.KEY=VALUE` overrides one field
(`slurm.container.image=...`, `slurm.env.NCCL_SOCKET_IFNAME=ib0` for nested ones). Values are read
as the text the user wrote, as Slurm wants them: YAML would read `time: 24:00:00` as the number
86400 and `account: 12345` as an int; numbers the schema wants are converted by it. An empty value,
`~` or `null` unsets an optional field.

Values that become #SBATCH directives are checked here: they are not shell code, but a newline or
a quote in one could start a new directive or a command, so only plain characters are accepted.
`setup` lines are the one place meant for shell code (module loads, activating an environment):
they are written into the batch script as the user wrote them, and kept out of every record
(manifest.json, submission.json), as is `env`, since either may hold a secret. `env` never passes
through a shell: the job sets it for the training step itself (launcher.cluster.job_settings).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launcher.config.assets import named_yaml_files, search_path
from launcher.errors import UserError

# What a directive value may hold: letters, digits and the punctuation Slurm values use
# (partition lists, gres specs, times, memory sizes, feature expressions).
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=+@%/\-\[\]()&|*]+$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
UNSET = ("", "~", "null", "Null", "NULL")  # what YAML means by no value, read as text
# Kept out of manifest.json and submission.json: shell lines and environment values may hold secrets.
NOT_RECORDED = {"setup", "env"}


class ContainerProfile(BaseModel):
    """Where the training step runs: an image, through pyxis (srun options) or apptainer (a command
    before python). The batch process itself stays on the host (see slurm/README.md)."""

    model_config = ConfigDict(extra="forbid")

    runtime: Literal["pyxis", "apptainer"] = Field(description="pyxis: srun --container-image; "
                                                               "apptainer: apptainer exec IMAGE python ...")
    image: str = Field(description="The image: a pyxis/enroot name (nvcr.io#nvidia/pytorch:24.05-py3) or a .sif "
                                   "file. It needs tunefleet installed.")
    mounts: list[str] = Field(default_factory=list, description="More SRC:DST folders to mount (SRC alone: the same "
                                                                "path); `tunefleet submit`'s folder and the run "
                                                                "folder are always mounted at their own paths.")
    mount_home: bool = Field(True, description="pyxis: false adds --no-container-mount-home.")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip() or any(c in value for c in "\n\r\0 "):
            raise ValueError(f"{value!r}: give one image name or path, without spaces")
        return value

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, values: list[str]) -> list[str]:
        for mount in values:
            check_mount(mount)
        return values


def check_mount(mount: str) -> str:
    """A SRC[:DST[:FLAGS]] mount as both runtimes read it: absolute paths, no comma (their list separator)."""
    parts = mount.split(":")
    if "," in mount or any(c in mount for c in "\n\r\0") or len(parts) > 3 or not all(
            p.startswith("/") for p in parts[:2]):
        raise ValueError(f"{mount!r} is not a mount: give SRC or SRC:DST with absolute paths and no commas "
                         "(e.g. /shared/data:/data)")
    return mount


def time_limit_seconds(value: str) -> int | None:
    """Slurm's --time in seconds (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for no limit or
    a form this does not know (Slurm itself judges it at sbatch)."""
    days, _, clock = value.rpartition("-") if "-" in value else ("0", "", value)
    parts = clock.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    numbers = [int(p) for p in parts]
    if days != "0" or "-" in value:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
    else:  # MM, MM:SS, HH:MM:SS
        hours, minutes, seconds = ([0] * (3 - len(numbers)) + numbers) if len(numbers) == 3 else \
            (0, numbers[0], numbers[1] if len(numbers) == 2 else 0)
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds


# --gpus-per-node takes a count or TYPE:COUNT (a site's gres type names, e.g. h100, a100_80g).
GPU_REQUEST = re.compile(r"^(?:([A-Za-z0-9_.-]+):)?(\d+)$")


class ClusterProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    description: str = Field("", description="What this cluster is.")
    partition: Optional[str] = Field(None, description="Slurm partition (--partition).")
    account: Optional[str] = Field(None, description="Account charged for the job (--account).")
    qos: Optional[str] = Field(None, description="Quality of service (--qos).")
    nodes: int = Field(1, ge=1, description="Nodes per run (--nodes); becomes distributed.num_machines.")
    gpus_per_node: str = Field("0", description="GPUs per node (--gpus-per-node), a count or TYPE:COUNT such as "
                                                 "h100:8; also the processes per node. 0: a CPU cluster, processes "
                                                 "per node from the recipe.")
    cpus_per_task: Optional[int] = Field(None, ge=1, description="CPU cores for each node's launcher and its processes.")
    mem: Optional[str] = Field(None, description="Memory per node (--mem), e.g. 200G; 0: all of the node's.")
    time: str = Field("04:00:00", description="Time limit (--time); the run checkpoints and requeues before it.")
    constraint: Optional[str] = Field(None, description="Node features (--constraint).")
    signal_seconds: int = Field(120, ge=10, description="Seconds before the time limit at which the job checkpoints "
                                                         "(--signal=B:USR1@N); one step plus a checkpoint must fit.")
    max_restarts: int = Field(3, ge=0, description="How often a job that checkpointed may requeue itself.")
    retries: int = Field(2, ge=0, description="How often a run that failed for a reason not its own (NCCL, GPU, "
                                               "network or node failure, a hang) is requeued, without the node it "
                                               "failed on. A user error is never retried.")
    hang_minutes: float = Field(30, ge=0, description="A run that logs no new step for this long is ended and "
                                                       "retried (longer than log_every steps plus an evaluation); "
                                                       "0: never.")
    device_memory: Optional[str] = Field(None, description="Memory of one GPU, e.g. 80GiB: `tunefleet plan` checks "
                                                          "the run fits it.")
    array_parallelism: Optional[int] = Field(None, ge=1, description="A sweep's runs at most running at once "
                                                                     "(the %N of its job array); unset: no cap.")
    collect: bool = Field(True, description="After a sweep's job array ends, a dependent job runs `tunefleet collect` "
                                            "(log in SWEEP/slurm/collect-JOBID.out); false: collect by hand.")
    python: Optional[str] = Field(None, description="The Python with tunefleet installed on the nodes (default: the "
                                                    "one running `tunefleet submit`); with a container, the image's "
                                                    "(default: python).")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before training (module load, "
                                                               "source venv/bin/activate, export VAR=...).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the training step on every node "
                                                                  "(NCCL_SOCKET_IFNAME: ib0); set without a shell.")
    container: Optional[ContainerProfile] = Field(None, description="Run the training step in an image "
                                                                    "(runtime, image, mounts, mount_home).")
    sbatch: list[str] = Field(default_factory=list, description="Extra #SBATCH options, e.g. --exclusive or "
                                                                "--mail-type=END.")

    @field_validator("partition", "account", "qos", "mem", "time", "constraint", "python")
    @classmethod
    def _plain(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not SAFE_VALUE.match(value):
            raise ValueError(f"{value!r} holds characters a #SBATCH value may not (spaces, quotes, $, ;, newlines)"
                             if value else "is empty; give a value or leave the key out")
        return value

    @model_validator(mode="after")
    def _warning_inside_the_time_limit(self) -> "ClusterProfile":
        limit = time_limit_seconds(self.time)
        if limit is not None and self.signal_seconds >= limit:
            raise ValueError(f"signal_seconds={self.signal_seconds} is not shorter than the time limit {self.time} "
                             f"({limit} s): the job would be warned as it starts; lower signal_seconds or raise time")
        return self

    @field_validator("gpus_per_node")
    @classmethod
    def _gpus(cls, value: str) -> str:
        if not GPU_REQUEST.match(value):
            raise ValueError(f"{value!r} is not a GPU count (8) or TYPE:COUNT (h100:8)")
        return value

    @property
    def gpu_count(self) -> int:
        """GPUs per node, whatever their type: the processes per node."""
        return int(GPU_REQUEST.match(self.gpus_per_node).group(2))

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
        if any("\n" in line or "\r" in line for line in values):
            raise ValueError("each setup entry is one shell line (no newlines inside)")
        return values

    @field_validator("env")
    @classmethod
    def _env(cls, values: dict[str, str]) -> dict[str, str]:
        for name, value in values.items():
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name (letters, digits and _, "
                                 "not starting with a digit)")
            if "\0" in value:
                raise ValueError(f"{name}: a value cannot hold a NUL character")
        return values

    def recorded(self) -> dict:
        """The profile as manifest.json and submission.json keep it: without setup lines and env."""
        return self.model_dump(exclude=NOT_RECORDED)


def available_profiles() -> dict[str, Path]:
    """Every profile on the search path (launcher.config.assets): a user's folders, then the shipped ones."""
    return named_yaml_files("clusters")


def _as_text(raw: str):
    """One YAML value as text (lists and mappings keep their shape, every scalar stays a string)."""
    return yaml.load(raw, Loader=yaml.BaseLoader) if raw.strip() else ""


def _unset_blanks(data: dict, schema: type[BaseModel]) -> dict:
    """Empty, ~ and null unset a field: None where the field may be None, its default for a list or mapping.
    Left as they are elsewhere, so that `time:` is refused by name rather than silently defaulted."""
    out = {}
    for key, value in data.items():
        field = schema.model_fields.get(key)
        if field is not None and isinstance(value, str) and value in UNSET:
            if field.default_factory is not None:
                continue
            if field.default is None and not field.is_required():
                value = None
        elif key == "container" and isinstance(value, dict):
            value = _unset_blanks(value, ContainerProfile)
        out[key] = value
    return out


def _apply_override(data: dict, key: str, raw: str) -> None:
    """`slurm.KEY=VALUE`, `slurm.container.KEY=VALUE` or `slurm.env.NAME=VALUE` onto the profile's data."""
    top, _, sub = key.partition(".")
    if top not in ClusterProfile.model_fields:
        raise UserError(f"slurm.{key}: unknown key; valid keys: {', '.join(ClusterProfile.model_fields)}")
    if not sub:
        data[top] = _as_text(raw)
    elif top == "env":
        data["env"] = {**(data.get("env") or {}), sub: raw}  # an environment value is text as given, never YAML
    elif top == "container":
        if sub not in ContainerProfile.model_fields:
            raise UserError(f"slurm.{key}: unknown key; valid keys: "
                            + ", ".join(f"container.{k}" for k in ContainerProfile.model_fields))
        container = data.get("container")
        data["container"] = {**(container if isinstance(container, dict) else {}), sub: _as_text(raw)}
    else:
        raise UserError(f"slurm.{key}: slurm.{top} has no parts; give slurm.{top}=VALUE")


def load_profile(name: str | None, overrides: list[tuple[str, str]]) -> ClusterProfile:
    """The profile `cluster=NAME` picks (none: all defaults), with `slurm.KEY=VALUE` overrides applied."""
    data: dict = {}
    if name:
        path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) else available_profiles().get(name)
        if path is None or not path.is_file():
            folders = ", ".join(str(p) for p in search_path("clusters"))
            raise UserError(f"cluster={name}: no such profile (available: {', '.join(available_profiles()) or 'none'}, "
                            f"searched {folders}; or give a path to a .yaml file)")
        try:
            data = yaml.load(path.read_text(), Loader=yaml.BaseLoader) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a cluster profile is a mapping of keys to values")
    for key, raw in overrides:
        _apply_override(data, key, raw)
    try:
        return ClusterProfile(**_unset_blanks(data, ClusterProfile))
    except ValidationError as err:
        problems = [f"slurm.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                    for e in err.errors()]
        raise UserError("cluster profile: " + "; ".join(problems)) from None
