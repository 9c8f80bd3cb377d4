"""The registry lock, kept in the model registry itself so that every client of one tracking store
(a SQLite file, or a server that clients reach only through ``MLFLOW_TRACKING_URI``) sees it.

It is a ticket lock. A contender creates a version of the registered model
:data:`LOCK_MODEL`: the store numbers versions one after another inside one transaction (the
registered model's row is updated first, which serialises concurrent creations on PostgreSQL
and SQLite alike), so the version number is an atomic ticket. The lowest live ticket holds the
lock; the others wait. Releasing deletes the ticket.

A ticket is *live* while its holder renews it: the holder (and every waiter) rewrites the
ticket's description every quarter of its lease, which makes the store stamp the version's
``last_updated_timestamp``. A ticket whose stamp is older than its lease (the ``lease_s`` tag the
holder wrote, not the reader's setting) belongs to a killed or frozen process: the next contender
deletes it and moves on. All stamps come from one clock, the store's, so machines with skewed
clocks agree on what is stale. Each ticket carries who holds it (actor, host, pid, since).

What this does not cover: a holder that is alive but cannot renew for longer than its lease
(frozen, cut off from the server) loses the lock to the next contender. Its renewal thread then
finds its ticket gone, and :meth:`RegistryLock.ensure_held` (called before every alias move)
raises instead of writing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lightclip.errors import LightclipError

LOCK_MODEL = "lightclip-registry-lock"
#: A model version source the server accepts (absolute, no relative parts) and that points nowhere.
LOCK_SOURCE = "lightclip:/registry-lock"
LOCK_DESCRIPTION = ("The lock that serialises lightclip's alias moves (promote, rollback, register). Each version is a "
                    "ticket of a process waiting for or holding it; the lowest live one holds it. Do not edit.")
TAG_PREFIX = "lightclip.lock."
DEFAULT_LEASE_S = 30.0


class RegistryLockError(LightclipError, RuntimeError):
    """The registry lock could not be taken in time, or was lost while held."""


def _now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


@dataclass(frozen=True)
class Ticket:
    """One contender's ticket, as read back from its version."""

    number: int
    holder: str
    host: str
    pid: str
    since: str
    lease_s: float
    renewed_ms: int  # the store's clock

    @classmethod
    def from_version(cls, version: ModelVersion, default_lease_s: float) -> "Ticket":
        tags = version.tags or {}
        try:
            lease = float(tags.get(f"{TAG_PREFIX}lease_s", default_lease_s))
        except ValueError:
            lease = default_lease_s
        return cls(number=int(version.version), holder=tags.get(f"{TAG_PREFIX}holder", "?"), host=tags.get(f"{TAG_PREFIX}host", "?"),
                   pid=tags.get(f"{TAG_PREFIX}pid", "?"), since=tags.get(f"{TAG_PREFIX}since", "?"), lease_s=lease,
                   renewed_ms=int(version.last_updated_timestamp or version.creation_timestamp or 0))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.holder}) since {self.since}, ticket {self.number}, lease {self.lease_s:g}s"


class RegistryLock:
    """An exclusive lock shared by every client of ``client``'s registry (see the module's docstring).

    Not re-entrant and not shared between threads: :class:`~lightclip.registry.aliases.ModelRegistry`
    wraps it in a re-entrant, thread-guarded hold.
    """

    def __init__(self, client: MlflowClient, *, where: str, actor: str, lease_s: float = DEFAULT_LEASE_S,
                 timeout_s: float = 120.0, poll_s: float = 0.1, name: str = LOCK_MODEL) -> None:
        self.client = client
        self.where = where
        self.actor = actor
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.name = name
        self.taken_over: list[Ticket] = []  # stale tickets this lock deleted, for the caller's report
        self.release_error: str | None = None  # why the last ticket could not be deleted, if it could not
        self._ticket: int | None = None
        self._renewed_server_ms = 0  # the store's stamp of our last renewal ...
        self._renewed_mono = 0.0  # ... and our monotonic clock at that moment
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- the ticket --------------------------------------------------------------------------

    def _ensure_model(self) -> None:
        try:
            self.client.create_registered_model(self.name, description=LOCK_DESCRIPTION)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _take_ticket(self) -> None:
        tags = {f"{TAG_PREFIX}holder": self.actor, f"{TAG_PREFIX}host": socket.gethostname(), f"{TAG_PREFIX}pid": str(os.getpid()),
                f"{TAG_PREFIX}since": _now_text(), f"{TAG_PREFIX}lease_s": f"{self.lease_s:g}"}
        try:
            version = self.client.create_model_version(self.name, source=LOCK_SOURCE, tags=tags, description="waiting",
                                                       await_creation_for=0)
        except MlflowException as exc:
            if not _missing(exc):
                raise
            self._ensure_model()
            version = self.client.create_model_version(self.name, source=LOCK_SOURCE, tags=tags, description="waiting",
                                                       await_creation_for=0)
        self._ticket = int(version.version)
        self._stamp(version)

    def _stamp(self, version: ModelVersion) -> None:
        self._renewed_server_ms = int(version.last_updated_timestamp or version.creation_timestamp)
        self._renewed_mono = time.monotonic()

    def _renew(self, state: str) -> bool:
        """Stamp our ticket with the store's clock; False when it is gone (taken over as stale)."""
        try:
            version = self.client.update_model_version(self.name, str(self._ticket), description=f"{state}, renewed at {_now_text()}")
        except MlflowException as exc:
            if _missing(exc):
                return False
            raise
        self._stamp(version)
        return True

    def _server_now_ms(self) -> int:
        """The store's clock, estimated from our last renewal (no call)."""
        return self._renewed_server_ms + int(1000 * (time.monotonic() - self._renewed_mono))

    def _tickets(self) -> list[Ticket]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted((Ticket.from_version(v, self.lease_s) for v in found), key=lambda t: t.number)

    def _drop(self, number: int) -> None:
        try:
            self.client.delete_model_version(self.name, str(number))
        except MlflowException as exc:
            if not _missing(exc):
                raise

    # -- acquire and release -----------------------------------------------------------------

    def acquire(self) -> None:
        """Wait for our ticket to be the lowest live one; raise :class:`RegistryLockError` after ``timeout_s``."""
        if self._ticket is not None:
            raise RegistryLockError(f"{self.where}: the registry lock is already held by this object (ticket {self._ticket})")
        self._take_ticket()
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                tickets = self._tickets()
                if self._ticket not in {t.number for t in tickets}:  # we were judged stale while waiting: queue again
                    self._take_ticket()
                    continue
                ahead = []
                for ticket in tickets:
                    if ticket.number >= self._ticket:
                        break
                    if self._server_now_ms() - ticket.renewed_ms > 1000 * ticket.lease_s:
                        self._drop(ticket.number)  # its holder died or froze past its lease
                        self.taken_over.append(ticket)
                    else:
                        ahead.append(ticket)
                if not ahead:
                    break
                if time.monotonic() > deadline:
                    raise RegistryLockError(f"{self.where}: the registry lock is still held after {self.timeout_s:g}s "
                                            f"(by {ahead[0].describe()}; {len(ahead) - 1} more waiting)")
                time.sleep(self.poll_s)
                if time.monotonic() - self._renewed_mono > self.lease_s / 4 and not self._renew("waiting"):
                    self._take_ticket()
        except BaseException:
            self._withdraw()
            raise
        if not self._renew("held"):
            self._ticket = None
            raise RegistryLockError(f"{self.where}: the registry lock was taken over as stale just as this process got it; try again")
        self._lost = None
        self._stop.clear()
        self._renewer = threading.Thread(target=self._keep_renewing, name="lightclip-registry-lock", daemon=True)
        self._renewer.start()

    def _keep_renewing(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self._renew("held"):
                    self._lost = "its ticket was deleted by another contender that judged it stale"
                    return
            except Exception as exc:  # the server is unreachable: keep trying until the lease runs out
                if time.monotonic() - self._renewed_mono > self.lease_s:
                    self._lost = f"it could not be renewed for longer than its lease ({exc})"

    def ensure_held(self) -> None:
        """Raise when this process no longer holds the lock (its lease ran out): write nothing then."""
        if self._ticket is None:
            raise RegistryLockError(f"{self.where}: the registry lock is not held")
        if self._lost is None and time.monotonic() - self._renewed_mono > self.lease_s:
            self._lost = f"it was not renewed for {time.monotonic() - self._renewed_mono:.1f}s (lease {self.lease_s:g}s)"
        if self._lost is not None:
            raise RegistryLockError(f"{self.where}: this process lost the registry lock (ticket {self._ticket}): {self._lost}; nothing more is written")

    def _withdraw(self) -> None:
        """Delete our ticket if the store answers; never raise (the caller may be failing already).

        A ticket that cannot be deleted (the server is down) is no longer renewed, so the next
        contender takes it over after its lease.
        """
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return
        try:
            self._drop(ticket)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: see the docstring
            self.release_error = f"ticket {ticket} not deleted ({exc}); it expires after its lease ({self.lease_s:g}s)"

    def release(self) -> None:
        """Stop renewing and delete our ticket (see :meth:`_withdraw` when the store does not answer)."""
        if self._ticket is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
            self._renewer = None
        self._withdraw()

    def holders(self) -> list[Ticket]:
        """Every ticket now in the registry (holder first), for a status line."""
        return self._tickets()
