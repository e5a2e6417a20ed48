"""Small durable files beside the store's records: the publication journal and the store's lock.

`Journal` is an append-only file of JSON lines, each carrying a CRC-32 of its body and made durable (fsync)
before `append` returns. A crash can tear only the last line; `load` returns the longest valid prefix, so a
torn line counts as never written. The store uses it to publish a step's units one by one between two
manifests (see store.py).

`StoreLock` is an exclusive `flock` on a file in the store: one process at a time owns a store (a second
run on the same SSD paths, or a restarted SSD actor while its killed predecessor still exits, waits for it
and then fails with a clear error). The kernel drops the lock when its process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(body: Mapping[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({"crc": zlib.crc32(text.encode()), "body": text}, separators=(",", ":")) + "\n"


def _decode(line: str) -> dict[str, Any] | None:
    try:
        outer = json.loads(line)
        text = outer["body"]
        if zlib.crc32(text.encode()) != outer["crc"]:
            return None
        body = json.loads(text)
    except (ValueError, KeyError, TypeError):
        return None
    return body if isinstance(body, dict) else None


class Journal:
    """An append-only, fsync'd, checksummed log of JSON objects in one file. Not thread-safe by itself."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        """Every entry up to the first torn or corrupted line (a crash mid-append tears only the last)."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text(errors="replace").splitlines():
            body = _decode(line)
            if body is None:
                break
            entries.append(body)
        return entries

    def append(self, body: Mapping[str, Any]) -> None:
        """Add one entry; durable when this returns."""
        new = not self.path.exists()
        with open(self.path, "a") as f:
            f.write(_encode(body))
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.path.parent)

    def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replace the file by `entries` atomically (drops a torn tail before anything is appended)."""
        if not entries:
            self.remove()
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(_encode(e) for e in entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()
            fsync_dir(self.path.parent)


class StoreLockedError(RuntimeError):
    """Another live process owns the store (raised as a StoreError subclass by the store)."""


class StoreLock:
    """An exclusive advisory lock on `path`, held from `acquire` to `release` (or the process's death)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout_s: float) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = _lock_holder(fd)
                    os.close(fd)
                    raise StoreLockedError(
                        f"{self.path.parent} is in use by another process (pid {owner}): another fuyou-ray "
                        "run, or a tool reading the store, has it open; stop it or use other ssd.paths"
                    ) from None
                time.sleep(0.05)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_holder(fd: int) -> str:
    """The pid holding an flock on `fd`'s file, from /proc/locks ("unknown" where that is unavailable)."""
    st = os.fstat(fd)
    suffix = f":{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(suffix):
                return fields[4]
    return "unknown"
