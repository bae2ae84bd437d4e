"""Stage locks that cannot strand a grid: Prefect's file locks, tied to a live holder.

Prefect's :class:`~prefect.locking.filesystem.FileSystemLockManager` writes ``{"holder", "expiration": null}``; a
process killed inside a stage leaves that file behind and every later run waits on it forever. Here a lock also
records who holds it (host, pid, the process's start time) and carries a lease that a heartbeat thread renews while
the holder lives:

* on the holder's host, a lock whose process is gone (or whose pid now belongs to another process) is broken at
  once, and that is logged;
* anywhere else (a lock folder shared between machines), it is broken when its lease runs out, i.e. at most
  ``LOSA_LOCK_LEASE_S`` seconds (default 300) after its holder stopped renewing it.

A broken lock only means a stage is computed again: stage results are deterministic and every artifact is committed
by an atomic rename, so a duplicate computation is harmless.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pydantic_core
from prefect.locking.filesystem import FileSystemLockManager
from prefect.types._datetime import now

log = logging.getLogger("losa.locks")

HOST = socket.gethostname()


def lease_seconds() -> float:
    return float(os.environ.get("LOSA_LOCK_LEASE_S", "300"))


def identity() -> dict:
    """This process as a lock (or launch) records it: host, pid and start time (a reused pid has another)."""
    return {"host": HOST, "pid": os.getpid(), "started": _started(os.getpid())}


@functools.lru_cache(maxsize=4)
def _started(pid: int) -> float:
    return psutil.Process(pid).create_time()


def holder_alive(info: dict) -> bool | None:
    """Whether the process recorded in a lock still runs: True/False on its own host, None elsewhere (unknown)."""
    if info.get("host") != HOST or "pid" not in info:
        return None
    try:
        proc = psutil.Process(int(info["pid"]))
        # the same pid with another start time is a later process that reused the number
        return abs(proc.create_time() - float(info.get("started", proc.create_time()))) < 1.0 and \
            proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LiveLockManager(FileSystemLockManager):
    """File locks with a holder record and a renewed lease (see the module docstring)."""

    def __init__(self, lock_files_directory: Path, lease: float | None = None) -> None:
        super().__init__(lock_files_directory)
        self.lease = lease_seconds() if lease is None else lease
        self._held: dict[str, str] = {}  # key -> holder, renewed by the heartbeat
        self._guard = threading.Lock()
        self._beat: threading.Thread | None = None

    # Prefect copies task options (and with them this manager); threads and locks are rebuilt per copy
    def __getstate__(self):
        return {"lock_files_directory": self.lock_files_directory, "lease": self.lease}

    def __setstate__(self, state):
        self.__init__(state["lock_files_directory"], state["lease"])

    def __deepcopy__(self, memo):
        return LiveLockManager(self.lock_files_directory, self.lease)

    def _record(self, holder: str) -> tuple[bytes, object]:
        expiration = now("UTC") + timedelta(seconds=self.lease)
        return pydantic_core.to_json({"holder": holder, "expiration": str(expiration), **identity()}), expiration

    def _write(self, key: str, holder: str) -> None:
        """Renew a held lock: the whole record replaced at once, so readers never see half of it."""
        record, expiration = self._record(holder)
        path = self._lock_path_for_key(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(record)
        os.replace(tmp, path)
        self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        # Prefect's version creates an empty file and writes the record after: a kill in between leaves a lock
        # that names no holder and no expiry. Here the record is written first and hard-linked into place, which
        # creates the lock atomically, complete, or fails because it exists.
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                if not self.wait_for_lock(key, acquire_timeout):
                    return False
            record, expiration = self._record(holder)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.new")
            tmp.write_bytes(record)
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                if self.is_lock_holder(key, holder):
                    break
            finally:
                tmp.unlink(missing_ok=True)
        with self._guard:
            self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}
            self._held[key] = holder
            if self._beat is None or not self._beat.is_alive():
                self._beat = threading.Thread(target=self._heartbeat, name="losa-lock-heartbeat", daemon=True)
                self._beat.start()
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            self._held.pop(key, None)
        super().release_lock(key, holder)

    def _heartbeat(self) -> None:
        while True:
            time.sleep(max(self.lease / 3, 0.05))
            with self._guard:
                if not self._held:
                    self._beat = None
                    return
                for key, holder in list(self._held.items()):
                    try:
                        self._write(key, holder)
                    except OSError as e:  # a lock folder that went away: the next acquire reports it
                        log.warning("could not renew lock %s: %s", key[:12], e)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)  # the whole record, host and pid included
        if info is not None and key not in self._held:
            if holder_alive(info) is False:
                log.warning("breaking the lock on stage %s: its holder (pid %s on %s) is gone", key[:12],
                            info.get("pid"), info.get("host"))
                Path(info["path"]).unlink(missing_ok=True)
                self._locks.pop(key, None)
                return False
        return super().is_locked(key, use_cache=use_cache)
