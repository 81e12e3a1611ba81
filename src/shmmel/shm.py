"""Create, attach to, and unlink one instance's shared memory and semaphores.

Ownership is plain: the supervisor creates and unlinks; workers and HTTP processes attach and
close. A failed create unlinks what it made and re-raises.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator

import numpy as np
import posix_ipc

from . import layout as L
from .config import Config
from .errors import InstanceError

SHM_DIR = "/dev/shm"


class Shm:
    """One process's view of an instance: control views, payload, semaphores, the lock."""

    def __init__(self, instance: str, ctl: posix_ipc.SharedMemory, data: posix_ipc.SharedMemory,
                 owner: bool) -> None:
        self.instance = instance
        self.owner = owner
        self._ctl_shm, self._data_shm = ctl, data
        self._ctl_map = mmap.mmap(ctl.fd, ctl.size)
        self._data_map = mmap.mmap(data.fd, data.size)
        head = np.frombuffer(self._ctl_map, L.HEADER, 1)[0]
        if bytes(head["magic"]) != L.MAGIC or int(head["version"]) != L.VERSION:
            self._unmap()
            raise InstanceError(f"instance {instance!r}: shared memory has an unknown layout "
                                f"(magic {bytes(head['magic'])!r}, version {int(head['version'])})")
        self.layout = L.CtlLayout(int(head["n_workers"]), int(head["n_slots"]),
                                  L.stream_entries(int(head["max_streams"]),
                                                   int(head["http_workers"])))
        hdr, self.workers, self.http, self.slots, self.streams, self.metrics = \
            self.layout.views(self._ctl_map)
        self.header = hdr[0]
        self.slot_bytes = int(self.header["slot_bytes"])
        self.partitions = int(self.header["partitions"])
        self.payload = np.frombuffer(self._data_map, np.uint8).reshape(self.layout.n_slots,
                                                                       self.slot_bytes)
        self.data_view = memoryview(self._data_map)
        self.ctl_view = memoryview(self._ctl_map)  # for struct reads on hot paths
        # Typed views of the control segment, indexed by byte offset // width. A store through
        # one of them is one aligned store of the word's full width, which is how every word
        # another process may read concurrently is written (never struct.pack_into: it clears
        # its target before writing, so a reader can see 0, a value nobody wrote).
        self.u32 = self.ctl_view.cast("I")
        self.i32 = self.ctl_view.cast("i")
        self.u64 = self.ctl_view.cast("Q")
        self.i64 = self.ctl_view.cast("q")
        self.f64 = self.ctl_view.cast("d")
        self.doorbells = [posix_ipc.Semaphore(L.doorbell_name(instance, k))
                          for k in range(self.layout.n_workers)]
        self.replies = [posix_ipc.Semaphore(L.reply_name(instance, j))
                        for j in range(self.layout.n_slots)]
        self._tlock = threading.Lock()
        self._closed = False

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, config: Config) -> Shm:
        """Create every segment and semaphore of ``config.instance`` (mode 0600)."""
        inst = config.instance
        n_slots = L.slots_for(config.slots, config.http_workers, config.http_threads)
        lay = L.CtlLayout(config.worker_rows, n_slots,
                          L.stream_entries(config.max_streams, config.http_workers))
        made: list[str] = []
        try:
            ctl = posix_ipc.SharedMemory(L.ctl_name(inst), posix_ipc.O_CREX, mode=0o600,
                                         size=lay.size)
            made.append(L.ctl_name(inst))
            data = posix_ipc.SharedMemory(L.data_name(inst), posix_ipc.O_CREX, mode=0o600,
                                          size=L.data_size(n_slots, config.slot_bytes))
            made.append(L.data_name(inst))
            for k in range(config.worker_rows):
                posix_ipc.Semaphore(L.doorbell_name(inst, k), posix_ipc.O_CREX, mode=0o600,
                                    initial_value=0).close()
                made.append(L.doorbell_name(inst, k))
            for j in range(n_slots):
                posix_ipc.Semaphore(L.reply_name(inst, j), posix_ipc.O_CREX, mode=0o600,
                                    initial_value=0).close()
                made.append(L.reply_name(inst, j))
            with mmap.mmap(ctl.fd, ctl.size) as m:
                head = np.frombuffer(m, L.HEADER, 1)
                head["version"] = L.VERSION
                head["n_workers"] = config.worker_rows
                head["n_slots"] = n_slots
                head["partitions"] = L.partitions_for(config.http_workers)
                head["slot_bytes"] = config.slot_bytes
                head["max_streams"] = config.max_streams
                head["port"] = config.port
                head["http_workers"] = config.http_workers
                head["host"] = config.host.encode()[:63]
                head["instance"] = inst.encode()
                slots = np.frombuffer(m, L.SLOT, n_slots, lay.slots_off)
                slots["state"] = L.S_FREE  # no slot state is 0 (see layout)
                del slots
                head["magic"] = L.MAGIC  # last: attachers check it
                del head
            return cls(inst, ctl, data, owner=True)
        except posix_ipc.ExistentialError:
            unlink_names(made)
            raise InstanceError(f"instance {inst!r}: shared memory already exists") from None
        except BaseException:
            unlink_names(made)
            raise

    @classmethod
    def attach(cls, instance: str) -> Shm:
        try:
            ctl = posix_ipc.SharedMemory(L.ctl_name(instance))
        except posix_ipc.ExistentialError:
            raise InstanceError(f"instance {instance!r} is not running "
                                f"(no {SHM_DIR}{L.ctl_name(instance)})") from None
        except posix_ipc.PermissionsError:
            raise InstanceError(f"instance {instance!r}: permission denied on "
                                f"{SHM_DIR}{L.ctl_name(instance)} (owned by another user?)") from None
        try:
            data = posix_ipc.SharedMemory(L.data_name(instance))
        except posix_ipc.Error:
            ctl.close_fd()
            raise InstanceError(f"instance {instance!r}: data segment missing") from None
        try:
            return cls(instance, ctl, data, owner=False)
        except posix_ipc.ExistentialError:
            ctl.close_fd()
            data.close_fd()
            raise InstanceError(f"instance {instance!r}: semaphores missing (stale?)") from None

    # -- worker-row words ---------------------------------------------------------------------
    def worker_word_ref(self, k: int, name: str) -> tuple[memoryview, int]:
        """(typed view, word index) of field ``name`` of worker row ``k``."""
        dtype, off = L.WORKER.fields[name][:2]
        view = {"<u4": self.u32, "<i4": self.i32, "<u8": self.u64, "<i8": self.i64,
                "<f8": self.f64}[dtype.str]
        return view, (self.layout.workers_off + k * L.WORKER.itemsize + off) // dtype.itemsize

    def set_worker_word(self, k: int, name: str, value: float) -> None:
        """Write one field of worker row ``k`` in one aligned store (see ``u32`` above)."""
        view, i = self.worker_word_ref(k, name)
        view[i] = value

    def worker_word(self, k: int, name: str) -> float:
        view, i = self.worker_word_ref(k, name)
        return view[i]

    # -- the instance lock ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Mutual exclusion across threads and processes, for short table edits only.

        A POSIX record lock on byte 0 of the control segment: the kernel drops it when the
        holder dies, so a SIGKILL can never leave it held (unlike a semaphore).
        """
        with self._tlock:
            fcntl.lockf(self._ctl_shm.fd, fcntl.LOCK_EX, 1, 0)
            try:
                yield
            finally:
                fcntl.lockf(self._ctl_shm.fd, fcntl.LOCK_UN, 1, 0)

    # -- teardown --------------------------------------------------------------------------
    def _unmap(self) -> None:
        for m in (self._ctl_map, self._data_map):
            with contextlib.suppress(BufferError, ValueError):
                m.close()

    def close(self) -> None:
        """Release this process's handles; safe to call twice. Does not unlink."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for sem in self.doorbells + self.replies:
            with contextlib.suppress(posix_ipc.Error):
                sem.close()
        # Views into the maps must go before the maps can close.
        self.header = self.workers = self.http = self.slots = self.streams = None  # type: ignore[assignment]
        self.metrics = None  # type: ignore[assignment]
        self.payload = None  # type: ignore[assignment]
        for v in (self.u32, self.i32, self.u64, self.i64, self.f64):
            v.release()
        self.data_view.release()
        self.ctl_view.release()
        self._unmap()
        for s in (self._ctl_shm, self._data_shm):
            with contextlib.suppress(posix_ipc.Error):
                s.close_fd()

    def unlink(self) -> None:
        unlink_instance(self.instance)


def instance_names(instance: str) -> list[str]:
    """Every /dev/shm entry of an instance, as posix_ipc names (segments and semaphores)."""
    pre = L.prefix(instance)
    out = []
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return out
    for e in entries:
        if e.startswith(pre):
            out.append("/" + e)
        elif e.startswith("sem." + pre):
            out.append("/" + e[4:])
    return sorted(out)


def unlink_names(names: list[str]) -> None:
    for n in names:
        tail = n.rsplit(".", 1)[-1]
        is_sem = tail not in ("ctl", "data")
        with contextlib.suppress(posix_ipc.ExistentialError):
            if is_sem:
                posix_ipc.unlink_semaphore(n)
            else:
                posix_ipc.unlink_shared_memory(n)


def unlink_instance(instance: str) -> None:
    unlink_names(instance_names(instance))
