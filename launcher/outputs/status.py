"""RUN/status.json: what state a run is in, for people, `train.resume=auto` and cluster tooling.

States: running (training started), interrupted (a stop signal: a checkpoint was written and the
run can continue with train.resume=auto), finished (final artifacts and metrics.json written),
failed (an error ended it; the message is recorded). Written by the main process only, atomically;
read through launcher.outputs.run_files.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from launcher.outputs.run_files import STATUS_FILE


def write_status(run_dir: Path, state: str, **details) -> None:
    from launcher.outputs.atomic import write_text_atomic

    record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), **details}
    write_text_atomic(Path(run_dir) / STATUS_FILE, json.dumps(record, indent=1) + "\n")
