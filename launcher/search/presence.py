"""Whether a search's driver is alive, seen from any host that shares the search folder.

On a cluster the driver runs on one login node and `tunefleet search`/`cancel` may be typed on
another, where its pid means nothing (or names some other process). So the driver records its host
beside its pid in the manifest and touches SWEEP/driver.heartbeat every poll: on its own host the
pid decides, elsewhere the heartbeat's age. A driver on another host is asked to stop through a
file, SWEEP/driver.stop, which it reads every poll (a signal cannot cross hosts).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.distributed.lifetime import alive

HEARTBEAT = "driver.heartbeat"
STOP_REQUEST = "driver.stop"
# A poll may wait 30 s for an squeue that hangs, and hosts' clocks differ by a few seconds: a
# heartbeat younger than this is a driver alive somewhere.
FRESH_S = 120.0


@dataclass(frozen=True)
class DriverSeen:
    """The driver a search's manifest records, as this host can judge it."""

    pid: int | None
    host: str | None  # None: recorded before hosts were (then it ran here)
    heartbeat_age_s: float | None  # None: no heartbeat file

    @property
    def here(self) -> bool:
        return self.host in (None, socket.gethostname())

    @property
    def running(self) -> bool:
        if not self.pid:
            return False
        if self.here:
            return alive(self.pid)
        return self.heartbeat_age_s is not None and self.heartbeat_age_s < FRESH_S

    def describe(self) -> str:
        beat = "" if self.heartbeat_age_s is None else f", last heartbeat {self.heartbeat_age_s:.0f} s ago"
        return f"pid {self.pid} on {self.host or socket.gethostname()}{beat}"


def driver_seen(sweep_dir: Path, manifest: dict) -> DriverSeen:
    heartbeat = Path(sweep_dir) / HEARTBEAT
    age = time.time() - heartbeat.stat().st_mtime if heartbeat.is_file() else None
    return DriverSeen(pid=manifest.get("supervisor_pid"), host=manifest.get("supervisor_host"), heartbeat_age_s=age)


def beat(sweep_dir: Path) -> None:
    (Path(sweep_dir) / HEARTBEAT).touch()


def beat_in_background(sweep_dir: Path, every: float = FRESH_S / 8) -> None:
    """Beat from a thread as long as the driver lives: one poll of the driver can take minutes (an
    squeue that times out, submissions that validate, claim and sbatch), and a heartbeat beaten only
    between polls would look stale to another host, which would then start a second driver."""
    import threading

    def keep_beating() -> None:
        while True:
            try:
                beat(sweep_dir)
            except OSError:
                pass
            time.sleep(every)

    threading.Thread(target=keep_beating, name="driver-heartbeat", daemon=True).start()


def request_stop(sweep_dir: Path) -> None:
    (Path(sweep_dir) / STOP_REQUEST).write_text(f"requested from {socket.gethostname()} at "
                                                f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")


def stop_requested(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / STOP_REQUEST).is_file()


def clear_stop_request(sweep_dir: Path) -> None:
    (Path(sweep_dir) / STOP_REQUEST).unlink(missing_ok=True)
