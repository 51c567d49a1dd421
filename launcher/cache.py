"""Build-once caches outside the checkout (converted models, tokenized data sets).

Everything slow to rebuild lives under `$TUNEFLEET_CACHE` (default ~/.cache/tunefleet); tokenized
data sets under `$TUNEFLEET_DATA_CACHE` (default `$TUNEFLEET_CACHE/datasets`), so tests and
throw-away experiments can keep them apart from the converted models worth keeping. Entries
are built in a temporary folder and renamed into place, so a crash never leaves a half-built
entry that a later run would use. A file lock makes other processes on the same machine wait for
the builder: no collective is involved, so a slow build can never trip a distributed timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("TUNEFLEET_CACHE", Path.home() / ".cache" / "tunefleet"))


def data_cache_root() -> Path:
    """Where tokenized data sets (and the Arrow copies of local data files) are cached."""
    configured = os.environ.get("TUNEFLEET_DATA_CACHE")
    return Path(configured) if configured else cache_root() / "datasets"


# (path, size, mtime_ns, ctime_ns, inode) -> sha256. The ctime and inode change on every write or
# replacement, even one that restores the mtime, so a hit is safe within one process.
_FILE_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (data files can be far larger than memory)."""
    stat = path.stat()
    identity = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if identity not in _FILE_HASHES:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        _FILE_HASHES[identity] = sha.hexdigest()
    return _FILE_HASHES[identity]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` unless `target` exists, then publish it atomically."""
    from filelock import FileLock

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
