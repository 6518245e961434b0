"""How many jobs may be in flight: learned from the API, not configured.

Scenario caps running jobs per plan (`parallelCustomJobs` for /generate/custom,
`parallelInferences` for /generate/{inferenceType}), and few users know their number. A
generation refused with 429 for concurrency created nothing and bills nothing, so the cap
can be learned safely:

- when the key may read `GET /teams/{teamId}/limits`, that is the cap, and nothing is probed;
- otherwise start at what was learned before for this API key (or `INITIAL`, one submit
  batch: a first wave goes out in one step, not in a round trip per doubling; a plan that
  allows fewer refuses the rest, once per key, for free); each time the API accepts a
  submission that fills the cap (as many jobs running, accepted, as the cap allows) while
  work waits, raise it by half to probe (10, 15, 22, ...); on a refusal drop to one above
  the number of jobs running when it came (about what the API allows). Counting accepted
  jobs, not the ones still being sent, keeps a probe to one step past what the API has
  shown it takes;
- after the first refusal, grow only by one per `ROUNDS_PER_PROBE` full rounds of the cap,
  so probing costs a refusal every hundred jobs or more, not every few.

`PIPELINE_PARALLEL_JOBS`, when set, is a ceiling the cap never passes. The state is one
small JSON value per (API key, pool) in SQL, shared by every worker and kept across runs;
the key is a hash of the API key, never the key.

Everything here is pure except `CapacityStore`, which reads and writes through the
repository's named cursors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

INITIAL = 10  # the cap of an API key we know nothing about: one submit batch
ROUNDS_PER_PROBE = 16  # at a cap of 8: one probe (one free refusal) per 128 jobs
LIMITS_TTL = 24 * 3600.0  # the plan's limits are asked for at most this often per API key
POOLS = ("custom", "inference")


def pool_of(endpoint: str) -> str:
    """Which of the plan's two caps a job counts against."""
    return "custom" if endpoint == "custom" else "inference"


@dataclass(frozen=True)
class Cap:
    """One pool's learned cap."""

    value: int = INITIAL
    known: bool = False  # read from the limits endpoint: never probed
    refused: bool = False  # a refusal was seen: probe slowly from now on
    credit: int = 0  # accepted-at-cap submissions since the last increase
    lowered_at: float | None = None  # when a refusal last lowered the cap (epoch seconds)

    def limit(self, ceiling: int | None) -> int:
        """How many jobs may be in flight now."""
        return max(1, min(self.value, ceiling) if ceiling else self.value)

    def accepted(self, running: int, waiting: bool) -> Cap:
        """A submission was accepted and `running` jobs of the pool (itself included) are
        now accepted and unfinished, with more work `waiting` for a slot (no demand, no
        evidence that more would be accepted). Only a full cap teaches anything."""
        if self.known or not waiting or running < self.value:
            return self
        if not self.refused:
            # Slow start: the API took as many as the cap; probe half as many again.
            return replace(self, value=running + max(1, running // 2))
        credit = self.credit + 1
        if credit >= ROUNDS_PER_PROBE * self.value:
            return replace(self, value=self.value + 1, credit=0)
        return replace(self, credit=credit)

    def refused_at(self, running: int, sent_at: float, now: float) -> Cap:
        """The API refused a submission sent at `sent_at` while `running` jobs ran.

        `running` counts the jobs the API accepted that we have not seen finish and the
        other POSTs out at the time: a little high when some finished unseen, low only in a
        race. So the cap drops to one above it, and by at least one: a cap set one too
        high costs one more refusal, one set too low a slot for many rounds. A submission
        sent before the cap was last lowered was sent under the old cap: its refusal says
        nothing new.
        """
        if self.lowered_at is not None and sent_at < self.lowered_at:
            return self
        value = max(1, min(running + 1, self.value - 1))
        return replace(self, value=value, refused=True, credit=0, known=False, lowered_at=now)

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, text: str | None) -> Cap:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            return cls(
                value=max(1, int(data["value"])),
                known=bool(data.get("known")),
                refused=bool(data.get("refused")),
                credit=max(0, int(data.get("credit", 0))),
                lowered_at=float(data["lowered_at"]) if data.get("lowered_at") else None,
            )
        except (ValueError, KeyError, TypeError):
            return cls()


def cursor_name(api_host: str, api_key: str, pool: str) -> str:
    """The cursor holding one pool's cap for one API key (hashed, never stored plain)."""
    digest = hashlib.sha256(f"{api_host}\0{api_key}".encode()).hexdigest()[:20]
    return f"capacity:{digest}:{pool}"


class Cursors(Protocol):
    def get_cursor(self, name: str) -> str | None: ...

    def get_cursors(self, names: Sequence[str]) -> dict[str, str]: ...

    def set_cursor(self, name: str, value: str) -> None: ...


class CapacityStore:
    """Reads and updates the learned caps of one API key."""

    def __init__(self, cursors: Cursors, api_host: str, api_key: str) -> None:
        self._cursors = cursors
        self._names = {pool: cursor_name(api_host, api_key, pool) for pool in POOLS}
        self._asked = cursor_name(api_host, api_key, "limits-asked-at")

    def limits_due(self, now: float) -> bool:
        """Whether to ask the API for the plan's limits: not in the last LIMITS_TTL.

        A key that may not read them would otherwise pay two refused requests per run; a
        key that may has its caps stored as known, and a refusal still lowers them.
        """
        try:
            asked = float(self._cursors.get_cursor(self._asked) or "-inf")
        except ValueError:
            return True
        return not asked <= now < asked + LIMITS_TTL

    def limits_asked(self, now: float) -> None:
        self._cursors.set_cursor(self._asked, repr(now))

    def get(self, pool: str) -> Cap:
        return Cap.loads(self._cursors.get_cursor(self._names[pool]))

    def get_all(self) -> dict[str, Cap]:
        """Every pool's cap, in one read."""
        values = self._cursors.get_cursors(list(self._names.values()))
        return {pool: Cap.loads(values.get(name)) for pool, name in self._names.items()}

    def put(self, pool: str, cap: Cap) -> None:
        self._cursors.set_cursor(self._names[pool], cap.dumps())

    def known(self, limits: dict[str, int]) -> None:
        """Caps read from the plan's limits: authoritative."""
        for pool, value in limits.items():
            if pool in self._names and value > 0:
                self.put(pool, Cap(value=int(value), known=True))

    def accepted(self, pool: str, in_flight: int, waiting: bool) -> None:
        cap = self.get(pool)
        new = cap.accepted(in_flight, waiting)
        if new != cap:
            self.put(pool, new)

    def refused(self, pool: str, running: int, sent_at: float, now: float) -> None:
        cap = self.get(pool)
        new = cap.refused_at(running, sent_at, now)
        if new != cap:
            self.put(pool, new)
