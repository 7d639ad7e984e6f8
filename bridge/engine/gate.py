"""When writers should NOTIFY (pure decision logic; the caller runs the statements).

A transaction that ran NOTIFY takes a cluster-wide lock at commit, so the capture triggers
notify only while `runtime.sleeping` is true and its expiry (`sleeping_until`) has not passed.

- Idle, or lightly loaded: the flag is on, so a new event wakes the daemon at once. The daemon
  renews the expiry at most once per poll interval, so a dead daemon stops costing writers.
- Draining a backlog (a pass found more work than it could take): the flag goes off, so writers
  skip NOTIFY while the daemon keeps coming back on its own.
- Back to idle: the flag goes on again; a writer that read the old value may have skipped its
  NOTIFY, so the daemon polls once more after every transaction open at that moment has ended
  (`snapshot`).

The flag changes only at those transitions, not per event: flipping a one-row table twice per
event made every writer's trigger walk a chain of dead row versions (the latency stalls of the
first engine).
"""

from __future__ import annotations

from bridge.clock import Clock


def snapshot_has_writers(snapshot: str) -> bool:
    """A pg_snapshot's text is xmin:xmax:xip,xip,...; writers were in progress if xip is set."""
    parts = snapshot.split(":")
    return len(parts) == 3 and parts[2] != ""


class NotifyGate:
    def __init__(self, poll_interval: float, clock: Clock) -> None:
        self.poll_interval = poll_interval
        self.clock = clock
        self.on: bool | None = None  # None: unknown (start, or after a database error)
        self.renewed = 0.0
        self.snapshot: str | None = None  # writers to wait for before polling once more

    @property
    def expiry(self) -> float:
        """How long writers keep notifying without a renewal: a few polls."""
        return 3 * self.poll_interval + 5

    def backlog(self) -> bool:
        """A pass left work behind: True when the caller must turn the flag off."""
        if self.on is False:
            return False
        self.on = False
        self.snapshot = None
        return True

    def idle(self) -> bool:
        """Nothing to do: True when the caller must set the flag on (or renew its expiry),
        then report the snapshot with `flag_set`."""
        fresh = self.on and self.clock.monotonic() - self.renewed < self.poll_interval
        return not fresh

    def flag_set(self, snapshot: str) -> bool:
        """The flag is on as of `snapshot`; True when the caller must poll once more now."""
        fresh = self.on is not True
        self.on = True
        self.renewed = self.clock.monotonic()
        if fresh and snapshot_has_writers(snapshot):
            self.snapshot = snapshot
        return fresh

    def settled(self) -> None:
        """Every writer of the snapshot has ended: poll once more, then forget it."""
        self.snapshot = None

    def unknown(self) -> None:
        """After a database error the flag's state is unknown: assert it again."""
        self.on = None
        self.snapshot = None
