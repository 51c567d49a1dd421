"""Start (installing where missing) the local two-node Slurm of slurm/local-cluster.sh for tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local-cluster.sh"


def ensure_cluster() -> tuple[dict[str, str], bool]:
    """Start the cluster (idempotent); return the environment its client commands need, and whether
    this call started it (a cluster someone already runs is left running afterwards)."""
    done = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"could not start the local Slurm cluster:\n{done.stdout}\n{done.stderr}")
    conf = next(line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("export SLURM_CONF="))
    os.environ["SLURM_CONF"] = conf  # the launcher's own squeue/scontrol calls from this process too
    return {"SLURM_CONF": conf}, "already running" not in done.stdout


def stop_cluster() -> None:
    subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
