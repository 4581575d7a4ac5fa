"""The controller: owner of the master tables and coordinator of the agents.

The controller wraps a :class:`~targetvirt.catalog.Catalog` (the single writer of the
master tables) and keeps the agents' volatile copies coherent with it:

* agent requests (:meth:`Controller.handle`): register, attach, fetch, fault, unmap,
  flush, lease renewal -- each answered with a reply or a ``Refused`` error;
* commands pushed to agents, each acknowledged within ``ack_timeout``; an agent that
  does not acknowledge in time is *fenced*: its lease is no longer renewed, its requests
  are refused, and the controller waits until that lease has surely expired (or the
  agent re-registered, which it only does after quiescing) before going on -- unless
  the transport fenced it through the storage (a RADOS blocklist covering every
  container it could write: :class:`~targetvirt.transport.FencingSink`);
* coherence: every mapping change (fault, unmap, migration, flatten, resize...) runs with
  a change recorder on the tables of the vdisk's family; before the change is
  acknowledged to anyone, every *other* agent serving a family member whose entry
  changed has installed the new entry (an ``Update``, which drains I/O using the old
  one).  Mapping changes are serialised by one operation lock, held until those
  acknowledgements are in: nothing can allocate a freed segment while an agent may still
  map it;
* live snapshot / clone / consistency group: freeze (NOWRITE or INVALID, the caller's
  choice) and mark shared (``FreezeShared``) in every agent serving a source and wait
  for the drain, copy the tables durably, thaw, and record the freeze window;
* user freeze/thaw (with an optional timeout, run by :meth:`Controller.tick`), durable:
  a restarted controller (or a standby taking over) keeps them in force; delay and
  cancel, block and unblock (volatile), and rollback / resize / delete / flatten / migrate /
  evacuate performed live;
* a pool reaching its soft threshold: ``SoftThreshold`` to every agent serving a vdisk of
  it (pushed after the fault that allocated, or by :meth:`Controller.tick`, never under
  the catalog lock that the catalog's listener is called with).

A restarted controller refuses to allocate or change mappings until every lease its
predecessor may have granted has expired (the lease duration, plus a margin), unless
every agent it knew (persisted in the store) has registered again.

Lock order: ``_op`` (operations) -> catalog lock -> ``_state`` (registry, acks).  Nothing
calls out to an agent while holding ``_state``; commands are queued, never sent inline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from targetvirt import protocol as p
from targetvirt import table as t
from targetvirt.catalog import COMMIT_EVERY, Catalog, Progress
from targetvirt.clock import Clock, MonotonicClock
from targetvirt.errors import (
    Cancelled,
    ControllerUnreachable,
    InUse,
    InvalidArgument,
    NotFound,
    ProtocolError,
    ReadOnly,
    SessionLost,
    TargetvirtError,
)
from targetvirt.pool import Pool
from targetvirt.transport import CommandSink, FencingSink
from targetvirt.vdisk import Freeze, VDisk

log = logging.getLogger(__name__)

FREEZE_MODES = {"nowrite": t.NOWRITE, "invalid": t.INVALID}
_MODE_OF = {state: mode for mode, state in FREEZE_MODES.items()}
AGENT_RECORD = "agent"
FLATTEN_BATCH = 256


def _no_progress(done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class FreezeWindow:
    """How long writes to some vdisks were held by a live copy (controller clock)."""

    vdisks: tuple[str, ...]
    mode: str
    started: float  # freeze commands queued
    frozen: float  # every agent drained and acknowledged
    thawed: float  # every agent acknowledged the thaw

    @property
    def held(self) -> float:
        return self.thawed - self.started


@dataclass
class Session:
    """One registration of one agent."""

    sid: int
    agent_id: str
    host: str
    vdisks: set[str]
    lease_until: float
    sink: CommandSink | None = None
    backlog: list[p.Command] = field(default_factory=list)
    acks: dict[int, p.Ack] = field(default_factory=dict)
    attached: set[str] = field(default_factory=set)  # vdisks whose blocks/delays it got
    solo: set[str] = field(default_factory=set)  # vdisks it was told it writes alone
    next_seq: int = 1
    fenced: bool = False  # refused from now on; its lease runs out
    gone: bool = False  # the agent registered again (it quiesced first)
    disconnected: bool = False  # its command stream broke

    @property
    def live(self) -> bool:
        return not (self.fenced or self.gone)


@dataclass
class _Exclusion:
    """One agent's COMPARE AND WRITE hold on entries ``[lo, hi)`` of a vdisk."""

    lo: int
    hi: int
    until: float  # controller clock: dropped then, whatever the holder does


@dataclass
class _Freeze:
    state: int
    until: float | None = None  # controller clock
    copying: bool = False  # a live copy is under way: mapped entries are about to be shared

    @property
    def mode(self) -> str:
        return _MODE_OF[self.state]


class Controller:
    """The controller role around one catalog.

    (It is the :class:`~targetvirt.manage.manager.Operations` the management layer uses:
    ``live`` says that changes to served vdisks reach their agents coherently.)

    While agents serve vdisks, every operation that changes an existing table goes
    through the controller (snapshot, clone, rollback, resize, delete, flatten, migrate,
    evacuate...): it keeps the agents coherent.  ``catalog`` itself is for what changes no
    served table: creating pools, containers and vdisks, usage, checks.
    """

    live = True

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Clock | None = None,
        lease_seconds: float = 15.0,
        ack_timeout: float = 5.0,
        lease_margin: float = 1.0,
        authority: Callable[[], bool] | None = None,
    ) -> None:
        """``authority()``: whether this controller still owns its (shared) store; when
        it says no, every agent request is refused as if the controller were unreachable
        (a fenced controller must not renew leases: a standby has taken over)."""
        self.catalog = catalog
        self._authority = authority
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.lease_seconds = lease_seconds
        self.ack_timeout = ack_timeout
        self.lease_margin = lease_margin
        self._op = threading.RLock()
        self._state = threading.Condition()
        self._sessions: dict[int, Session] = {}
        self._by_agent: dict[str, Session] = {}
        self._frozen: dict[str, _Freeze] = {}
        self._holds: dict[str, set[int]] = {}  # entries held NOWRITE by a migration
        # vdisk -> session -> its COMPARE AND WRITE hold (NOWRITE in every other agent)
        self._exclusions: dict[str, dict[int, _Exclusion]] = {}
        self._delays: dict[str, float] = {}
        self._unrecorded: set[str] = set()  # thawed at their timeout, the store not told yet
        self._blocked: set[str] = set()
        self.windows: deque[FreezeWindow] = deque(maxlen=4096)
        self.fenced: list[str] = []  # agent ids, in fencing order (for operators and tests)
        self._closed = False
        self._timer: threading.Thread | None = None
        known = catalog.records(AGENT_RECORD)
        self._crossed: list[str] = []  # pools that reached their soft threshold, to announce
        catalog.threshold_listeners.append(self._threshold_reached)
        self._agent_keys = {str(b["agent_id"]): k for k, b in known.items()}
        self._awaiting = set(self._agent_keys)
        prior = max((float(b.get("lease_seconds", 0)) for b in known.values()), default=0.0)
        # a predecessor's agents may still write through their tables until their leases end
        grace = max(prior, lease_seconds) + lease_margin
        self._grace_until = self.clock.now() + grace if self._awaiting else -math.inf
        # The restart hold: until the predecessor's agents are all back (each drains before
        # it registers) or their leases ran out, every entry handed out is NOWRITE.  One of
        # them may be in the middle of a COMPARE AND WRITE that its controller's volatile
        # Solo or Exclusive allowed; nobody else may write those blocks meanwhile, and which
        # blocks they are died with that controller.  Reads go on; writes wait (at most the
        # grace, below the agents' frozen timeout).
        self._restart_hold = bool(self._awaiting)
        self._restore_freezes()

    def _restore_freezes(self) -> None:
        """Put the users' freezes the store holds back in force (no agent has registered
        yet: each one's fetches will carry them), each with what is left of its timeout;
        one whose timeout ran out while no controller ran is thawed now, durably."""
        now, wall = self.clock.now(), self.catalog.wallclock()
        expired: dict[str, Freeze | None] = {}
        with self.catalog.lock:
            for v in self.catalog.vdisks.values():
                f = v.freeze
                if f is None:
                    continue
                if f.until is not None and f.until <= wall:
                    expired[v.name] = None
                    continue
                until = None if f.until is None else now + (f.until - wall)
                self._frozen[v.name] = _Freeze(FREEZE_MODES[f.mode], until)
        if self._frozen:
            log.warning("still frozen from before the restart: %s", ", ".join(sorted(self._frozen)))
        if expired:
            log.warning("thawed (their timeouts passed while no controller ran): %s",
                        ", ".join(sorted(expired)))  # fmt: skip
            self.catalog.set_freezes(expired)

    # --- agent requests ------------------------------------------------------------------

    def handle(self, request: p.Request) -> p.Reply:
        """Answer one agent request; errors come back as ``Refused``."""
        try:
            if self._closed:
                raise ControllerUnreachable("the controller is stopped")
            if self._authority is not None and not self._authority():
                raise ControllerUnreachable(
                    "this controller no longer holds the metadata store (another took over)"
                )
            return self._dispatch(request)
        except TargetvirtError as e:
            return p.refusal(e)
        finally:
            if self._crossed and isinstance(request, p.Fault | p.Unmap):
                self._announce()

    # --- soft threshold --------------------------------------------------------------------

    def _threshold_reached(self, pool: Pool) -> None:
        """Catalog listener (under the catalog lock): note it; :meth:`_announce` tells."""
        with self._state:
            if pool.name not in self._crossed:
                self._crossed.append(pool.name)

    def _announce(self) -> None:
        """Tell every agent serving a vdisk of a pool that reached its soft threshold."""
        with self._state:
            pools, self._crossed = self._crossed, []
        if pools:
            names = [v.name for v in list(self.catalog.vdisks.values()) if v.pool.name in pools]
            self._push(self._to_servers(names, lambda n: p.SoftThreshold(0, n)))

    def _dispatch(self, r: p.Request) -> p.Reply:
        if isinstance(r, p.Fetch):
            return self._fetch(r)
        if isinstance(r, p.Fault):
            return self._fault(r)
        if isinstance(r, p.LeaseRenew):
            return self._renew(r)
        if isinstance(r, p.Flush):
            self._session(r.agent_id, r.session)
            self.catalog.commit()
            return p.Done()
        if isinstance(r, p.Unmap):
            return self._unmap(r)
        if isinstance(r, p.Register):
            return self._register(r)
        if isinstance(r, p.Attach):
            return self._attach(r)
        if isinstance(r, p.Describe):
            self._session(r.agent_id, r.session)
            with self.catalog.lock:
                return self._info(self.catalog.vdisk(r.vdisk))
        if isinstance(r, p.Detach):
            return self._detach(r)
        if isinstance(r, p.ContainerFailure):
            return self._container_failure(r)
        if isinstance(r, p.Exclusive):
            return self._exclusive(r)
        if isinstance(r, p.EndExclusive):
            return self._end_exclusive(r)
        raise ProtocolError(f"{type(r).__name__} is not a request the controller answers")

    def _session(self, agent_id: str, sid: int) -> Session:
        with self._state:
            s = self._sessions.get(sid)
            if s is None or s.agent_id != agent_id or not s.live:
                raise SessionLost(f"agent {agent_id}: session {sid:#x} is not current")
            return s

    @staticmethod
    def _serving(s: Session, name: str) -> None:
        if name not in s.vdisks:
            raise InvalidArgument(f"agent {s.agent_id} does not serve {name!r}; attach it first")

    def _register(self, r: p.Register) -> p.Registered:
        with self._state:
            old = self._by_agent.get(r.agent_id)
            if old is not None:
                # The agent quiesced before registering again: its old session is over,
                # and anyone waiting for it (an ack, a fence) may go on.
                old.gone = True
                self._state.notify_all()
        if old is not None and old.sink is not None:
            old.sink.close()
        with self._op:
            vdisks = {v for v in r.vdisks if v in self.catalog.vdisks}
            s = Session(secrets.randbits(63) | 1, r.agent_id, r.host, vdisks, 0.0)
            # Before the newcomer exists (it can fetch nothing, write nothing), any agent
            # that was writing these vdisks alone gives that up and finishes its local
            # COMPARE AND WRITE (the drain of Solo(False)).
            self._push([pair for n in sorted(vdisks) for pair in self._solo(n, s, tell=False)])
            with self._state:
                s.lease_until = self.clock.now() + self.lease_seconds
                self._sessions[s.sid] = s
                self._by_agent[r.agent_id] = s
                if old is not None:
                    self._sessions.pop(old.sid, None)
                self._awaiting.discard(r.agent_id)
                self._state.notify_all()
            if r.agent_id not in self._agent_keys:
                self._remember(r.agent_id)
            self._end_restart_hold(joining=s)
        log.info("agent %s registered (session %#x, %d vdisks)", r.agent_id, s.sid, len(vdisks))
        return p.Registered(s.sid, self.lease_seconds)

    def _remember(self, agent_id: str) -> None:
        """Persist the agent id: a restarted controller waits for it (or its lease)."""
        key = max(self._agent_keys.values(), default=0) + 1
        body = {"agent_id": agent_id, "lease_seconds": self.lease_seconds}
        self.catalog.put_record(AGENT_RECORD, key, body)
        self.catalog.commit()
        self._agent_keys[agent_id] = key

    def forget_agent(self, agent_id: str) -> None:
        """An agent that will never come back: a restart no longer waits for it."""
        with self._op:
            key = self._agent_keys.pop(agent_id, None)
            if key is not None:
                self.catalog.put_record(AGENT_RECORD, key, None)
                self.catalog.commit()
            with self._state:
                self._awaiting.discard(agent_id)
                self._state.notify_all()
            self._end_restart_hold()

    def _attach(self, r: p.Attach) -> p.VDiskInfo:
        """Describe a vdisk to an agent, which serves it from now on.

        An agent attaches each vdisk before it opens the gate of its copy, after its
        command stream is up; so this is where it gets the block or delay in force (its
        fetches carry the freezes).  Not at registration: the stream is not open yet.
        """
        s = self._session(r.agent_id, r.session)
        with self._op:
            v = self.catalog.vdisk(r.vdisk)
            # as in _register: the others stop writing alone before this one may fetch
            self._push(self._solo(r.vdisk, s))
            with self._state:
                s.vdisks.add(r.vdisk)
                first = r.vdisk not in s.attached
                s.attached.add(r.vdisk)
            if first:
                self._push(self._replay(s, r.vdisk))
            return self._info(v)

    def _replay(self, s: Session, name: str) -> list[tuple[Session, p.Command]]:
        pairs: list[tuple[Session, p.Command]] = []
        if name in self._blocked:
            pairs.append((s, p.Block(0, name)))
        until = self._delays.get(name)
        now = self.clock.now()
        if until is not None and until > now:
            pairs.append((s, p.Delay(0, name, until - now)))
        return pairs

    def _detach(self, r: p.Detach) -> p.Done:
        s = self._session(r.agent_id, r.session)
        with self._op:
            with self._state:
                s.vdisks.discard(r.vdisk)
                s.attached.discard(r.vdisk)
                s.solo.discard(r.vdisk)
            # the agent drained and dropped the vdisk before detaching: one left may be alone
            self._push(self._solo(r.vdisk, None))
        return p.Done()

    def _container_failure(self, r: p.ContainerFailure) -> p.Done:
        """An agent met a medium error: mark the container failed (no _op: the agent may
        be holding I/O in flight that an operation waits to drain)."""
        self._session(r.agent_id, r.session)
        with self.catalog.lock:
            pool = next((q for q in self.catalog.pools.values() if q.uuid == r.pool_uuid), None)
            if pool is None or r.cid not in pool.containers:
                raise InvalidArgument(f"pool {r.pool_uuid} has no container {r.cid}")
            self.catalog.mark_failed(pool.name, r.cid, f"{r.error} (agent {r.agent_id})")
        return p.Done()

    def _info(self, v: VDisk) -> p.VDiskInfo:
        containers = tuple(
            p.ContainerInfo(
                c.cid,
                c.path,
                c.kind,
                v.pool.uuid,
                c.uuid,
                c.segment_size,
                c.nsegments,
                c.preallocated,
            )
            for c in v.pool.containers.values()
        )
        return p.VDiskInfo(v.name, v.size, v.segment_size, v.readonly, containers, v.uuid)

    def _renew(self, r: p.LeaseRenew) -> p.LeaseGrant:
        with self._state:
            s = self._sessions.get(r.session)
            if s is None or s.agent_id != r.agent_id or not s.live:
                raise SessionLost(f"agent {r.agent_id}: session {r.session:#x} is not current")
            s.lease_until = self.clock.now() + self.lease_seconds
        return p.LeaseGrant(self.lease_seconds)

    def _fetch(self, r: p.Fetch) -> p.TableRange:
        # No op lock: a fetch only reads, and the agent discards a reply that a later
        # command overtook.  The catalog lock gives a consistent read.
        s = self._session(r.agent_id, r.session)
        self._serving(s, r.vdisk)
        with self.catalog.lock:
            v = self.catalog.vdisk(r.vdisk)
            n = len(v.table)
            if r.start > n:
                raise InvalidArgument(f"{r.vdisk} has {n} entries; cannot fetch from {r.start}")
            return p.TableRange(r.vdisk, r.start, self._annotate(v, r.start, r.count, s.sid))

    def _writer(self, agent_id: str, session: int, vdisk: str) -> tuple[Session, VDisk]:
        """Under ``_op``: the session of an agent that serves ``vdisk``, and the vdisk,
        which must be writable (faults, unmaps and CAW holds all write)."""
        s = self._session(agent_id, session)
        self._serving(s, vdisk)
        v = self.catalog.vdisk(vdisk)
        if v.readonly:
            raise ReadOnly(f"{v.name} is a snapshot and cannot be written")
        return s, v

    def _fault(self, r: p.Fault) -> p.FaultReply:
        self._wait_ready()
        self._end_restart_hold()
        with self._op:
            s, v = self._writer(r.agent_id, r.session, r.vdisk)
            if not 0 <= r.index < len(v.table):
                raise InvalidArgument(f"{v.name} has no entry {r.index}")
            if not self._writable(v.name, r.index, s.sid):
                # frozen or held: change nothing; the agent waits on the NOWRITE it gets
                return p.FaultReply(v.name, r.index, self._annotate_one(v, r.index, s.sid))
            with self._recording(v.family.members) as changed:
                self.catalog.fault(v, r.index, r.covered)
            self._push(self._coherence(changed, skip=(s.sid, v.name)))
            return p.FaultReply(v.name, r.index, self._annotate_one(v, r.index, s.sid))

    def _unmap(self, r: p.Unmap) -> p.TableRange:
        self._wait_ready()
        with self._op:
            s, v = self._writer(r.agent_id, r.session, r.vdisk)
            end = r.start + r.count
            if end > len(v.table):
                raise InvalidArgument(f"{v.name} has {len(v.table)} entries; cannot unmap to {end}")
            held = any(a < end and r.start < b for a, b in self._excluded(v.name, s.sid))
            if not held and all(self._writable(v.name, i) for i in (r.start, end - 1)):
                with self._recording(v.family.members) as changed:
                    self.catalog.drop_entries(v, range(r.start, end))
                # the requester too: its own in-flight I/O on freed segments must drain
                self._push(self._coherence(changed, skip=None))
            return p.TableRange(v.name, r.start, self._annotate(v, r.start, r.count, s.sid))

    # --- COMPARE AND WRITE across agents -------------------------------------------------
    #
    # A COMPARE AND WRITE (VMFS's ATS) must be atomic against every write to its blocks
    # through any gateway.  An agent alone on a vdisk needs nobody else: its local lock
    # does it (Solo).  Otherwise it asks for an Exclusive hold on the segments it covers:
    # NOWRITE on them in every other agent, drained, like a migration's hold; it compares
    # and writes under its local lock, then ends the hold.  The hold is a lease: it lasts
    # at most lease_seconds (the agent counts from when it asked, so it stops first), so a
    # holder that dies, is fenced or loses its EndExclusive cannot hold the others for
    # longer; re-registering (after quiescing) ends it at once.

    def _solo(
        self, name: str, joining: Session | None, *, tell: bool = True
    ) -> list[tuple[Session, p.Command]]:
        """The Solo commands that make the servers of ``name`` (and ``joining``) know
        whether they write it alone.  Alone needs one server, no fenced session whose
        lease may still run, and no predecessor's agent that may still write (``ready``).
        ``tell=False``: nothing for ``joining`` (its stream is not open yet; it starts not
        alone anyway).  Recorded as sent: a lost Solo(True) costs round trips, never
        safety; a Solo(False) not acknowledged fences the agent as any command does."""
        now = self.clock.now()
        with self._state:
            servers = [s for s in self._sessions.values() if s.live and name in s.vdisks]
            if joining is not None and joining not in servers:
                servers.append(joining)
            lingering = any(
                not s.live and not s.gone and name in s.vdisks
                and now < s.lease_until + self.lease_margin
                for s in self._sessions.values()
            )  # fmt: skip
            ready = not self._awaiting or now >= self._grace_until
            alone = len(servers) == 1 and not lingering and ready
            pairs: list[tuple[Session, p.Command]] = []
            for s in servers:
                if (name in s.solo) == alone or (s is joining and not tell):
                    continue
                if alone:
                    s.solo.add(name)
                else:
                    s.solo.discard(name)
                pairs.append((s, p.Solo(0, name, alone)))
            return pairs

    def _exclusive(self, r: p.Exclusive) -> p.LeaseGrant:
        # a predecessor's agents cannot be held: wait until none may still write
        self._wait_ready()
        lo, hi = r.start, r.start + r.count
        while True:
            with self._op:
                s, v = self._writer(r.agent_id, r.session, r.vdisk)
                if hi > len(v.table):
                    raise InvalidArgument(f"{v.name} has {len(v.table)} entries; not {hi}")
                self._expire_exclusions()
                with self._state:
                    held = self._exclusions.setdefault(v.name, {})
                    rival = self._rival(v.name, lo, hi, s.sid)
                    if rival is None:
                        # (an agent runs one COMPARE AND WRITE per vdisk at a time: a hold
                        # it still has is a leftover, e.g. of a lost EndExclusive)
                        old = held.pop(s.sid, None)
                        held[s.sid] = _Exclusion(lo, hi, math.inf)
                if rival is None:
                    others = [o for o in self._servers(v.name) if o.sid != s.sid]
                    pairs: list[tuple[Session, p.Command]] = [
                        (o, p.SetState(0, v.name, lo, r.count, t.NOWRITE)) for o in others
                    ]
                    if old is not None:
                        pairs += self._lift(v.name, old.lo, old.hi, {o.sid for o in others})
                    self._push(pairs)
                    with self._state:
                        until = self.clock.now() + self.lease_seconds + self.lease_margin
                        held[s.sid].until = until
                        self._state.notify_all()
                    return p.LeaseGrant(self.lease_seconds)
            # Another agent holds an overlapping range: wait (without _op: its COMPARE
            # AND WRITE may need a fault) until it ends, or its hold runs out.
            with self._state:
                if self._rival(r.vdisk, lo, hi, r.session) is rival:
                    self.clock.wait(self._state, None if math.isinf(rival.until) else rival.until)

    def _rival(self, name: str, lo: int, hi: int, sid: int) -> _Exclusion | None:
        """Under ``_state``: another session's hold overlapping ``[lo, hi)``."""
        for other, x in self._exclusions.get(name, {}).items():
            if other != sid and x.lo < hi and lo < x.hi:
                return x
        return None

    def _end_exclusive(self, r: p.EndExclusive) -> p.Done:
        s = self._session(r.agent_id, r.session)
        with self._op:
            self._drop_exclusions(lambda name, sid: name == r.vdisk and sid == s.sid)
        return p.Done()

    def _expire_exclusions(self) -> None:
        """Under ``_op``: drop the holds that ran out, or whose holder re-registered."""
        now = self.clock.now()

        def dead(name: str, sid: int) -> bool:
            x, s = self._exclusions[name][sid], self._sessions.get(sid)
            if now >= x.until or s is None or s.gone:
                return True
            return not s.live and now >= s.lease_until + self.lease_margin  # fenced, lapsed

        self._drop_exclusions(dead)

    def _drop_exclusions(self, which: Callable[[str, int], bool]) -> None:
        """Under ``_op``: end the holds ``which`` selects; lift them in the other agents
        (but where something else still holds writes)."""
        ended: list[tuple[str, int, _Exclusion]] = []
        with self._state:
            for name, held in self._exclusions.items():
                for sid in [sid for sid in held if which(name, sid)]:
                    ended.append((name, sid, held.pop(sid)))
            self._state.notify_all()
        pairs: list[tuple[Session, p.Command]] = []
        for name, sid, x in ended:
            if name in self.catalog.vdisks:
                others = {o.sid for o in self._servers(name) if o.sid != sid}
                pairs += self._lift(name, x.lo, min(x.hi, len(self.catalog.vdisk(name).table)),
                                    others)  # fmt: skip
        self._push(pairs)

    def _excluded(self, name: str, sid: int | None) -> list[tuple[int, int]]:
        """The ranges of ``name`` another session than ``sid`` holds for its COMPARE AND
        WRITE (``sid`` None: every hold)."""
        with self._state:
            held = self._exclusions.get(name, {})
            return sorted((x.lo, x.hi) for other, x in held.items() if other != sid)

    def _lift(
        self, name: str, lo: int, hi: int, sids: set[int] | None
    ) -> list[tuple[Session, p.Command]]:
        """SetState(NORMAL) on ``[lo, hi)`` for the servers of ``name`` (those in ``sids``
        if given), leaving out what must stay NOWRITE for each: a freeze (everything), a
        migration's hold, another agent's COMPARE AND WRITE hold."""
        if name in self._frozen or self._restart_hold or lo >= hi:
            return []
        pairs: list[tuple[Session, p.Command]] = []
        for s in self._servers(name):
            if sids is not None and s.sid not in sids:
                continue
            keep = [(i, i + 1) for i in self._holds.get(name, ())] + self._excluded(name, s.sid)
            pos = lo
            for a, b in [*sorted(keep), (hi, hi)]:
                if a > pos:
                    end = min(a, hi)
                    pairs.append((s, p.SetState(0, name, pos, end - pos, t.NORMAL)))
                pos = max(pos, b)
                if pos >= hi:
                    break
        return pairs

    # --- command stream (transports) ---------------------------------------------------

    def connect_commands(self, agent_id: str, sid: int, sink: CommandSink) -> None:
        """A transport opened the command stream of a session: deliver to ``sink``."""
        with self._state:
            s = self._sessions.get(sid)
            if s is None or s.agent_id != agent_id or not s.live or self._closed:
                raise SessionLost(f"agent {agent_id}: session {sid:#x} is not current")
            s.sink, s.disconnected = sink, False
            backlog, s.backlog = s.backlog, []
            for cmd in backlog:
                if not sink.deliver(cmd):
                    s.disconnected = True
            self._state.notify_all()

    def disconnected(self, sid: int, sink: CommandSink) -> None:
        """A transport lost the command stream of a session: its pending acks fail now."""
        with self._state:
            s = self._sessions.get(sid)
            if s is not None and s.sink is sink:
                s.disconnected = True
                self._state.notify_all()

    def acknowledge(self, sid: int, ack: p.Ack) -> None:
        with self._state:
            s = self._sessions.get(sid)
            if s is not None and ack.seq in s.acks:
                s.acks[ack.seq] = ack
                self._state.notify_all()

    # --- pushing commands ----------------------------------------------------------------

    def _servers(self, name: str) -> list[Session]:
        with self._state:
            return [s for s in self._sessions.values() if s.live and name in s.vdisks]

    def _push(self, pairs: Sequence[tuple[Session, p.Command]]) -> None:
        """Send every command (in list order per agent), wait for the acks, fence laggards."""
        self._settle(self._send(pairs))

    def _send(self, pairs: Sequence[tuple[Session, p.Command]]) -> list[tuple[Session, int]]:
        """Queue the commands; returns what :meth:`_settle` must wait for."""
        waiting: list[tuple[Session, int]] = []
        with self._state:
            for s, cmd in pairs:
                if not s.live:
                    continue
                seq = s.next_seq
                s.next_seq += 1
                s.acks[seq] = _PENDING
                waiting.append((s, seq))
                sent = dataclasses.replace(cmd, seq=seq)
                if s.sink is None:
                    s.backlog.append(sent)
                elif not s.sink.deliver(sent):
                    s.disconnected = True
        return waiting

    def _settle(self, waiting: list[tuple[Session, int]]) -> None:
        """Wait for the acks of sent commands; fence the agents that fail to give them."""
        if waiting:
            for s in self._await(waiting, self.clock.now() + self.ack_timeout):
                self._fence(s)

    def _await(self, waiting: list[tuple[Session, int]], deadline: float) -> list[Session]:
        """Wait for the acks; returns the sessions that failed (no ack, or a refusal)."""
        with self._state:
            while self.clock.now() < deadline and any(
                s.live and not s.disconnected and s.acks.get(seq) is _PENDING for s, seq in waiting
            ):
                self.clock.wait(self._state, deadline)
            failed: dict[int, Session] = {}
            for s, seq in waiting:
                ack = s.acks.pop(seq, _PENDING)
                if s.live and (ack is _PENDING or not ack.ok):
                    if ack is not _PENDING:
                        log.warning("agent %s refused command %d: %s", s.agent_id, seq, ack.error)
                    failed[s.sid] = s
            return list(failed.values())

    def _fence(self, s: Session) -> None:
        """Stop renewing ``s``'s lease and wait until it has surely run out -- or not,
        if its transport fenced it through the storage (see FencingSink)."""
        with self._state:
            if not s.live:
                return
            s.fenced = True
            self.fenced.append(s.agent_id)
            sink, s.sink = s.sink, None
            vdisks = sorted(s.vdisks)
        log.warning("agent %s did not acknowledge in time: fenced", s.agent_id)
        if sink is not None:
            sink.close()
            if isinstance(sink, FencingSink) and sink.fence(vdisks):
                return  # the storage refuses it from now on: its lease need not run out
        with self._state:
            until = s.lease_until + self.lease_margin
            while not s.gone and self.clock.now() < until:
                self._raise_if_closed()
                self.clock.wait(self._state, until)

    def _wait_ready(self) -> None:
        """After a restart: no mapping change while a predecessor's lease may still run."""
        with self._state:
            while self._awaiting and self.clock.now() < self._grace_until:
                self._raise_if_closed()
                self.clock.wait(self._state, self._grace_until)
            self._awaiting.clear()

    def _raise_if_closed(self) -> None:
        """A wait for a lease to run out ends when the controller stops: the operation
        behind it is abandoned (refused to its requester), not carried out, and close()
        does not hang behind it waiting for the operation lock."""
        if self._closed:
            raise ControllerUnreachable("the controller is stopped")

    def _end_restart_hold(self, joining: Session | None = None) -> None:
        """Once ready, lift the restart hold in every agent (``joining`` has fetched
        nothing yet: its fetches come without it)."""
        if not self._restart_hold:  # (it only ever goes from True to False)
            return
        with self._op:
            with self._state:
                if not self._restart_hold or (
                    self._awaiting and self.clock.now() < self._grace_until
                ):
                    return
                self._restart_hold = False
                names = sorted({n for s in self._sessions.values() if s.live for n in s.vdisks})
            pairs: list[tuple[Session, p.Command]] = []
            for name in names:
                try:
                    entries = len(self.catalog.vdisk(name).table)
                except NotFound:  # deleted meanwhile: nothing to lift
                    continue
                others = {s.sid for s in self._servers(name) if s is not joining}
                pairs += self._lift(name, 0, entries, others)
            # A session whose command stream is not open yet gets the lift from its backlog
            # when it opens; waiting for that ack here would fence an agent still saying
            # hello (and hold up the registration that ended the hold).
            sent = self._send(pairs)
            self._settle([(s, seq) for s, seq in sent if s.sink is not None])
        log.info("restart hold lifted: writes go on")

    @property
    def ready(self) -> bool:
        with self._state:
            return not self._awaiting or self.clock.now() >= self._grace_until

    # --- annotation and coherence ----------------------------------------------------------

    def _copying(self, name: str) -> bool:
        freeze = self._frozen.get(name)
        return freeze is not None and freeze.copying

    def _writable(self, name: str, index: int, sid: int | None = None) -> bool:
        """Whether session ``sid`` may write entry ``index`` (None: any session; a
        COMPARE AND WRITE hold leaves its holder writable, nobody else)."""
        if self._restart_hold or name in self._frozen or index in self._holds.get(name, ()):
            return False
        return not any(a <= index < b for a, b in self._excluded(name, sid))

    def _annotate_one(self, v: VDisk, index: int, sid: int | None = None) -> int:
        e = v.table[index]
        if e & t.MAPPED and (v.pool.refcount(e) > 1 or self._copying(v.name)):
            e |= t.SHARED
        if not self._writable(v.name, index, sid):
            e |= t.NOWRITE_BIT
        return e

    def _annotate(self, v: VDisk, start: int, count: int, sid: int | None = None) -> array[int]:
        """Entries as session ``sid`` must hold them: SHARED where another table maps the
        segment, NOWRITE where a freeze, a migration or another agent's COMPARE AND WRITE
        holds writes."""
        view = v.table.view()[start : start + count]
        out = view.copy()
        mapped = np.flatnonzero(view & np.uint64(t.MAPPED))
        if mapped.size:
            entries = view[mapped]
            cids = (entries >> np.uint64(t.CID_SHIFT)) & np.uint64(t.CID_MASK)
            psegs = (entries & np.uint64(t.PSEG_MASK)).astype(np.intp)
            shared = np.zeros(mapped.size, dtype=bool)
            for cid in np.unique(cids).tolist():
                sel = cids == cid
                shared[sel] = v.pool.refs_view(int(cid))[psegs[sel]] > 1
            out[mapped[shared]] |= np.uint64(t.SHARED)
        with self._state:
            frozen = v.name in self._frozen or self._restart_hold
            holds = sorted(self._holds.get(v.name, ()))
        if self._copying(v.name):
            out[mapped] |= np.uint64(t.SHARED)
        if frozen:
            out |= np.uint64(t.NOWRITE_BIT)
        for index in holds:
            if start <= index < start + len(out):
                out[index - start] |= np.uint64(t.NOWRITE_BIT)
        for lo, hi in self._excluded(v.name, sid):
            a, b = max(lo, start) - start, min(hi, start + len(out)) - start
            if a < b:
                out[a:b] |= np.uint64(t.NOWRITE_BIT)
        return array("Q", out.tobytes())

    @contextlib.contextmanager
    def _recording(self, vdisks: Sequence[VDisk]) -> Iterator[dict[str, set[int]]]:
        """Record which entries of these tables change inside the block."""
        tables = [(v.name, v.table) for v in vdisks]
        for _, table in tables:
            table.changes = set()
        changed: dict[str, set[int]] = {}
        try:
            yield changed
        finally:
            for name, table in tables:
                if table.changes:
                    changed[name] = table.changes
                table.changes = None

    def _coherence(
        self, changed: dict[str, set[int]], skip: tuple[int, str] | None
    ) -> list[tuple[Session, p.Command]]:
        """Updates for every agent serving a changed table (but ``skip``: the requester,
        which installs the reply itself)."""
        pairs: list[tuple[Session, p.Command]] = []
        for name, indexes in sorted(changed.items()):
            v = self.catalog.vdisks.get(name)
            if v is None:
                continue
            idx = sorted(i for i in indexes if i < len(v.table))
            if not idx:
                continue
            held = bool(self._excluded(name, None))  # then annotated per session
            update = self._update(v, idx, None)
            pairs += [
                (s, self._update(v, idx, s.sid) if held else update)
                for s in self._servers(name) if (s.sid, name) != skip
            ]  # fmt: skip
        return pairs

    def _update(self, v: VDisk, idx: list[int], sid: int | None) -> p.Update:
        entries = array("Q", [self._annotate_one(v, i, sid) for i in idx])
        return p.Update(0, v.name, array("Q", idx), entries)

    def _state_all(self, names: Sequence[str], state: int) -> list[tuple[Session, p.Command]]:
        pairs: list[tuple[Session, p.Command]] = []
        for name in names:
            n = len(self.catalog.vdisk(name).table)
            if state == t.NORMAL:
                pairs += self._lift(name, 0, n, None)  # but what still holds writes
            else:
                pairs += [(s, p.SetState(0, name, 0, n, state)) for s in self._servers(name)]
        return pairs

    def _to_servers(
        self, names: Sequence[str], make: Callable[[str], p.Command]
    ) -> list[tuple[Session, p.Command]]:
        return [(s, make(name)) for name in names for s in self._servers(name)]

    # --- freeze, live copies ---------------------------------------------------------------

    def _freeze_now(self, names: Sequence[str], state: int) -> None:
        with self._state:
            for name in names:
                self._frozen[name] = _Freeze(state)
        self._push(self._state_all(names, state))

    def _thaw_now(self, names: Sequence[str], first: list[tuple[Session, p.Command]]) -> None:
        with self._state:
            for name in names:
                self._frozen.pop(name, None)
        self._push(first + self._state_all(names, t.NORMAL))

    def _live_copy(
        self, sources: Sequence[str], mode: str, make: Callable[[], list[VDisk]]
    ) -> list[VDisk]:
        state = _freeze_state(mode)
        self._wait_ready()
        with self._op:
            for name in sources:
                self.catalog.vdisk(name)
            self.catalog.commit()  # the sources are durable: the commit in the freeze is small
            fresh = [n for n in sources if n not in self._frozen]  # a user freeze stays
            started = self.clock.now()
            with self._state:
                for name in sources:
                    self._frozen.setdefault(name, _Freeze(state)).copying = True
            # Agents mark every mapped entry SHARED with the freeze (one FreezeShared
            # command each: one message and one ack, not two, in the window), a source a
            # user already froze by a MarkShared alone.  Early marks are safe: nothing
            # writes while frozen, fetches meanwhile come annotated SHARED (see _copying),
            # and a failed copy leaves marks that only cost a fault that changes nothing.
            freeze = self._send(
                self._to_servers(fresh, lambda n: p.FreezeShared(0, n, state))
                + self._to_servers(
                    [n for n in sources if n not in fresh], lambda n: p.MarkShared(0, n)
                )
            )
            self._settle(freeze)  # drained: the copy sees everything acknowledged, no more
            frozen = self.clock.now()
            made: list[VDisk] = []
            try:
                made = make()  # durable before anyone may write again
            finally:
                with self._state:
                    for name in sources:
                        self._frozen[name].copying = False
                        if name in fresh:
                            del self._frozen[name]
                self._settle(self._send(self._state_all(fresh, t.NORMAL)))
            window = FreezeWindow(tuple(sources), mode, started, frozen, self.clock.now())
            self.windows.append(window)
            return made

    def snapshot(self, source: str, snap: str, *, mode: str = "nowrite") -> VDisk:
        """A snapshot of a vdisk that agents may be writing: ``source@snap``."""
        return self._live_copy([source], mode, lambda: [self.catalog.snapshot(source, snap)])[0]

    def clone(self, source: str, name: str, *, mode: str = "nowrite") -> VDisk:
        return self._live_copy([source], mode, lambda: [self.catalog.clone(source, name)])[0]

    def group_snapshot(
        self, sources: Sequence[str], snap: str, *, mode: str = "nowrite"
    ) -> list[VDisk]:
        """Snapshots of several vdisks frozen together: one instant for all of them."""
        return self._live_copy(
            list(sources), mode, lambda: self.catalog.group_snapshot(list(sources), snap)
        )

    def freeze(
        self, names: Sequence[str], *, mode: str = "nowrite", timeout: float | None = None
    ) -> None:
        """Hold writes (``nowrite``) or every use of the table (``invalid``) until
        :meth:`thaw`, or until ``timeout`` seconds have passed (see :meth:`tick`).  A vdisk
        already frozen keeps its mode and takes the new timeout.

        The freeze is durable before any agent hears of it: once this returns, a
        controller restart keeps it (:meth:`_restore_freezes`).  The timeout is counted
        on this controller's clock and stored as a wall-clock deadline (see
        :class:`~targetvirt.vdisk.Freeze`); a wall-clock step (NTP) moves it only for a
        successor, by that step.
        """
        state = _freeze_state(mode)
        with self._op:
            for name in names:
                self.catalog.vdisk(name)
            # (no live copy runs while we hold _op: _frozen holds user freezes only)
            deadline = None if timeout is None else self.catalog.wallclock() + timeout
            self.catalog.set_freezes(
                {n: Freeze(self._frozen[n].mode if n in self._frozen else mode, deadline)
                 for n in names}
            )  # fmt: skip
            self._freeze_now([n for n in names if n not in self._frozen], state)
            until = None if timeout is None else self.clock.now() + timeout
            with self._state:
                for name in names:
                    self._frozen[name].until = until
                self._state.notify_all()

    def thaw(self, names: Sequence[str]) -> None:
        """Thaw, durably first: a restart after this returns finds the vdisks thawed."""
        with self._op:
            frozen = [n for n in names if n in self._frozen]
            self.catalog.set_freezes({n: None for n in frozen if n in self.catalog.vdisks})
            self._thaw_now(frozen, [])

    def _thaw_due(self) -> None:
        """Thaw the freezes whose timeout passed (checked under ``_op``: a freeze may just
        have been given a new timeout).  If the store cannot record it, they thaw all the
        same: the deadline it holds has passed, so a restart would thaw them too."""
        with self._op:
            now = self.clock.now()
            due = [n for n, f in self._frozen.items() if f.until is not None and now >= f.until]
            try:
                self.catalog.set_freezes({n: None for n in due if n in self.catalog.vdisks})
            except TargetvirtError as e:
                log.warning("thawing %s at its timeout, not yet recorded: %s", ", ".join(due), e)
                self._unrecorded.update(due)  # tick() tries again
            self._thaw_now(due, [])

    def _record_thaws(self) -> None:
        """Tell the store of the thaws it could not record at their timeout (unless the
        vdisk was frozen again or deleted since)."""
        with self._op:
            names = [
                n for n in sorted(self._unrecorded)
                if n not in self._frozen and n in self.catalog.vdisks
            ]  # fmt: skip
            try:
                self.catalog.set_freezes({n: None for n in names})
            except TargetvirtError as e:
                log.warning("the thaws of %s are still not recorded: %s", ", ".join(names), e)
                return
            self._unrecorded.clear()

    def frozen(self, name: str) -> bool:
        return name in self._frozen

    # --- block, delay --------------------------------------------------------------------

    def block(self, names: Sequence[str]) -> None:
        """Queue new I/O to the vdisks in every agent and drain what is in flight."""
        with self._op:
            self._blocked.update(names)
            self._push(self._to_servers(names, lambda n: p.Block(0, n)))

    def unblock(self, names: Sequence[str]) -> None:
        with self._op:
            self._blocked.difference_update(names)
            self._push(self._to_servers(names, lambda n: p.Unblock(0, n)))

    def delay(self, name: str, seconds: float) -> None:
        """Hold all I/O to a vdisk for ``seconds``; the agents release it by themselves.

        Volatile, unlike a freeze, and on purpose: a delay holds I/O for *at most* its
        time (an agent that re-registers -- after a controller restart, say -- releases
        it early), so losing it breaks no promise, while a freeze promises that no write
        lands until the thaw (a consistent backup underneath relies on it).  A delay is
        short and bounded, and making it durable would add a metadata commit to
        something meant to be cheap."""
        with self._op:
            self.catalog.vdisk(name)
            self._delays[name] = self.clock.now() + seconds
            self._push(self._to_servers([name], lambda n: p.Delay(0, n, seconds)))

    def cancel_delay(self, name: str) -> None:
        with self._op:
            self._delays.pop(name, None)
            self._push(self._to_servers([name], lambda n: p.CancelDelay(0, n)))

    def delayed(self, name: str) -> bool:
        """Whether a delay of ``name`` is running (its agents release it by themselves at
        the deadline; :meth:`tick` forgets it then)."""
        until = self._delays.get(name)
        return until is not None and self.clock.now() < until

    # --- live table changes ----------------------------------------------------------------

    @contextlib.contextmanager
    def _blocking(self, name: str) -> Iterator[list[tuple[Session, p.Command]]]:
        """Block the vdisk in its agents around a whole-table change; the caller adds the
        commands that bring them up to date, sent (then Unblock) before the block ends."""
        self._push(self._to_servers([name], lambda n: p.Block(0, n)))
        after: list[tuple[Session, p.Command]] = []
        try:
            yield after
        finally:
            unblock = [] if name in self._blocked else self._to_servers([name], _unblock)
            self._push(after + unblock)

    def rollback(self, name: str, snap: str) -> None:
        self._wait_ready()
        with self._op:
            v = self.catalog.vdisk(name)
            old_size = v.size
            with self._blocking(name) as after:
                try:
                    self.catalog.rollback(name, snap)
                finally:
                    v = self.catalog.vdisk(name)
                    if v.size != old_size:
                        after.extend(self._to_servers([name], lambda n: p.Resize(0, n, v.size)))
                    # the whole table changed: agents fetch it again as they use it
                    after.extend(self._state_all([name], t.INVALID))

    def resize(self, name: str, size: int) -> None:
        self._wait_ready()
        with self._op:
            v = self.catalog.vdisk(name)
            with self._blocking(name) as after:
                changed: dict[str, set[int]] = {}
                try:
                    with self._recording(v.family.members) as changed:
                        self.catalog.resize(name, size)
                finally:
                    after.extend(self._to_servers([name], lambda n: p.Resize(0, n, v.size)))
                    after.extend(self._coherence(changed, skip=None))

    def delete(self, name: str, *, recursive: bool = False) -> None:
        self._wait_ready()
        with self._op:
            v = self.catalog.vdisk(name)
            snaps = self.catalog.snapshots_of(v)
            if snaps and not recursive:
                raise InUse(
                    f"{name} has snapshots ({', '.join(s.name for s in snaps[:3])}); "
                    "delete them first or delete recursively"
                )
            names = [s.name for s in snaps] + [name]
            # agents drop (and drain) first: no I/O may use segments the delete frees
            self._push(self._to_servers(names, lambda n: p.DropVDisk(0, n)))
            with self._state:
                for s in self._sessions.values():
                    s.vdisks.difference_update(names)
            self.catalog.delete(name, recursive=recursive)
            with self._state:
                for n in names:
                    self._frozen.pop(n, None)
                    self._delays.pop(n, None)
                    self._holds.pop(n, None)
                    self._exclusions.pop(n, None)
                    self._blocked.discard(n)

    def flatten(self, name: str, progress: Progress = _no_progress) -> int:
        """Give a vdisk private copies of its shared segments, a batch at a time.

        Within a batch, agents keep the old (shared) entries until the batch's updates:
        that is safe because both segments hold the same data and nothing can write the
        new one before the operation lock is released (writes to shared entries fault).
        """
        self._wait_ready()
        with self._op:
            v = self.catalog.vdisk(name)
            if v.readonly:
                raise ReadOnly(f"{name} is a snapshot; clone it and flatten the clone")
            work = [i for i, e in v.table.iter_mapped() if v.pool.refcount(e) > 1]
        for done in range(0, len(work), FLATTEN_BATCH):
            with self._op:
                if self.catalog.vdisks.get(name) is not v:
                    raise Cancelled(f"{name} was deleted while being flattened")
                with self._recording(v.family.members) as changed:
                    for index in work[done : done + FLATTEN_BATCH]:
                        if index < len(v.table):
                            self.catalog.unshare(v, index)
                self._push(self._coherence(changed, skip=None))
            progress(min(done + FLATTEN_BATCH, len(work)), len(work))
        self.catalog.commit()
        return len(work)

    def migrate(self, name: str, index: int, dst: int | None = None) -> int:
        """Move one segment to another container while agents use it; returns the entry."""
        self._wait_ready()
        with self._op:
            return self._migrate_live(self.catalog.vdisk(name), index, dst, commit=True)

    def _migrate_live(self, v: VDisk, index: int, dst: int | None, *, commit: bool) -> int:
        if not 0 <= index < len(v.table) or not v.table[index] & t.MAPPED:
            raise InvalidArgument(f"{v.name} entry {index} is not allocated")
        old = t.location(v.table[index])
        sharers = [
            m.name for m in v.family.members
            if index < len(m.table) and t.location(m.table[index]) == old
        ]  # fmt: skip
        # We *hold* writes to the segment while it is copied, rather than re-copying what
        # raced with the copy: every agent mapping it gets NOWRITE on that one entry
        # (reads go on from the old copy), the catalog copies and repoints, and each
        # agent's update carries the new entry in the normal state.  The hold lasts one
        # segment copy; re-copying would need dirty tracking in every agent.
        with self._state:
            for m in sharers:
                self._holds.setdefault(m, set()).add(index)
        changed: dict[str, set[int]] = {}
        try:
            self._push(self._to_servers(sharers, lambda n: p.SetState(0, n, index, 1, t.NOWRITE)))
            with self._recording(v.family.members) as changed:
                new = self.catalog.migrate(v, index, dst, commit=commit)
        finally:
            with self._state:
                for m in sharers:
                    self._holds.get(m, set()).discard(index)
            release = [
                pair
                for m in sharers
                if m not in changed
                for pair in self._lift(m, index, index + 1, None)
            ]  # a failed copy leaves entries as they were: just lift the hold
            self._push(self._coherence(changed, skip=None) + release)
        return new

    def evacuate(self, pool: str, cid: int, progress: Progress = _no_progress) -> int:
        """Move every segment out of container ``cid``, live; returns how many moved."""
        self._wait_ready()
        with self._op:
            work = self.catalog.begin_evacuation(pool, cid)
        moved = 0
        for n, (v, index) in enumerate(work, 1):
            with self._op:
                e = v.table[index] if index < len(v.table) else 0
                if self.catalog.vdisks.get(v.name) is v and e & t.MAPPED and t.cid_of(e) == cid:
                    self._migrate_live(v, index, None, commit=False)
                    moved += 1
                    if moved % COMMIT_EVERY == 0:
                        self.catalog.commit()
            progress(n, len(work))
        self.catalog.commit()
        return moved

    # --- time ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Do what is due: thaw freezes whose timeout passed, drop expired sessions."""
        now = self.clock.now()
        if any(f.until is not None and now >= f.until for f in list(self._frozen.values())):
            self._thaw_due()
        with self._state:
            for s in self._sessions.values():
                if s.live and now >= s.lease_until + self.lease_margin:
                    s.fenced = True  # silent past its lease: it can no longer write
                    self.fenced.append(s.agent_id)
            for name in [n for n, until in self._delays.items() if now >= until]:
                del self._delays[name]
        if self._unrecorded:
            self._record_thaws()
        if self._restart_hold and now >= self._grace_until:
            self._end_restart_hold()
        if self._exclusions_due(now):
            with self._op:
                self._expire_exclusions()
        if self._crossed:
            self._announce()

    def _exclusions_due(self, now: float) -> bool:
        with self._state:
            return any(
                now >= x.until or sid not in self._sessions or not self._sessions[sid].live
                for held in self._exclusions.values()
                for sid, x in held.items()
            )

    def _next_due(self) -> float:
        times = [f.until for f in self._frozen.values() if f.until is not None]
        times += [s.lease_until + self.lease_margin for s in self._sessions.values() if s.live]
        times += [x.until for held in self._exclusions.values() for x in held.values()]
        if self._restart_hold:
            times.append(self._grace_until)
        return min(times, default=self.clock.now() + 1.0)

    def start(self) -> None:
        """Run :meth:`tick` in a thread whenever something falls due."""
        if self._timer is None:
            self._timer = threading.Thread(target=self._run_timer, name="controller-timer")
            self._timer.daemon = True
            self._timer.start()

    def _run_timer(self) -> None:
        while not self._closed:
            with self._state:
                self.clock.wait(self._state, min(self._next_due(), self.clock.now() + 1.0))
            if self._closed:
                return
            try:
                self.tick()
            except TargetvirtError as e:  # pragma: no cover - logged, retried next round
                log.warning("controller timer: %s", e)

    # --- inspection, shutdown --------------------------------------------------------------

    def sessions(self) -> list[Session]:
        with self._state:
            return [s for s in self._sessions.values() if s.live]

    def servers(self, name: str) -> list[str]:
        """Agent ids serving a vdisk."""
        return sorted(s.agent_id for s in self._servers(name))

    def agents(self) -> list[dict[str, object]]:
        """The live agent sessions, for operators: id, host, lease left, vdisks served."""
        now = self.clock.now()
        return [
            {"id": s.agent_id, "kind": f"host {s.host}", "host": s.host, "session": f"{s.sid:#x}",
             "lease": f"{max(0.0, s.lease_until - now):.1f} s left",
             "vdisks": sorted(s.vdisks)}
            for s in sorted(self.sessions(), key=lambda s: s.agent_id)
        ]  # fmt: skip

    def close(self) -> None:
        """Stop (agents will find their sessions gone at the next controller)."""
        self._closed = True
        with self._state:
            sinks = [s.sink for s in self._sessions.values() if s.sink is not None]
            self._state.notify_all()
        for sink in sinks:
            sink.close()
        if self._timer is not None:
            self._timer.join(timeout=5)
        with self._op:
            self.catalog.close()


_PENDING = p.Ack(0, False, "pending")


def _unblock(name: str) -> p.Command:
    return p.Unblock(0, name)


def _freeze_state(mode: str) -> int:
    try:
        return FREEZE_MODES[mode]
    except KeyError:
        raise InvalidArgument(
            f"freeze mode {mode!r} is not one of {', '.join(FREEZE_MODES)}"
        ) from None
