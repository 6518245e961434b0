"""Every write, and the work queries, of the lineage database. One transaction per method.

The repository decides nothing about a node's life: `pipeline.nodes.decide` does. It loads
the facts a decision needs, persists the resulting `Change` with one conditional UPDATE
(guarded by the state the decision was made in, and by the claim where the change says so)
and answers queries. Reports (`run_report`, `lineage`) live in `pipeline.reports`.

Concurrency rules (they hold on SQLite and PostgreSQL alike):
- Only the sweeper (one holder of the `sweeper` lease at a time) hands nodes to tasks.
- A task acts on a node only after claiming it with a conditional UPDATE; a second delivery
  of the same message finds the claim taken and drops out.
- A claim that expires (a worker died) makes the node due again for the sweeper.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, Table, and_, case, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline import nodes
from pipeline.db import insert_many, make_sessionmaker, translate_errors
from pipeline.keys import compute_step_key
from pipeline.models import (
    FINAL_ITEM_STATUSES,
    AssetRole,
    AssetRow,
    CursorRow,
    ItemInputRow,
    ItemRow,
    ItemStatus,
    JobRow,
    LeaseRow,
    ManifestRow,
    NodeRow,
    ObjectRow,
    RunRow,
    RunStatus,
    utcnow,
)
from pipeline.nodes import Change, Event, Facts, Guard, Inc, NodeState, Policy
from pipeline.scenario import Job, JobStatus

T = TypeVar("T")

ACTIVE_JOB_STATUSES = [s for s in JobStatus if not s.terminal]
# Tables for Core bulk inserts (executemany; the ORM's bulk path prepares rows one by one).
ITEMS = cast(Table, ItemRow.__table__)
NODES = cast(Table, NodeRow.__table__)
ITEM_INPUTS = cast(Table, ItemInputRow.__table__)
# The varying columns of a new run's rows (pipeline.db.insert_many); the rest are constants.
NEW_ITEM_COLUMNS = (
    "manifest_item_id",
    "line",
    "item_key",
    "prompt",
    "seed",
    "model",
    "trained_model",
    "params",
    "recipe",
    "status",
    "skipped_from_id",
    "finished_at",
)
FRESH_NODE_COLUMNS = (
    "item_id",
    "node_key",
    "model",
    "endpoint",
    "body",
    "expected_outputs",
    "output_template",
    "final",
)


@dataclass(frozen=True)
class NewItem:
    """An item to record in a new run, already expanded from the manifest."""

    manifest_item_id: str
    line: int
    item_key: str
    prompt: str | None
    seed: int
    model: str
    trained_model: str | None
    params: dict[str, Any]
    # The first node: the generation.
    endpoint: str
    body: dict[str, Any]
    generation_key: str
    generation_outputs: int
    # {"steps": [{model, endpoint, params, prompt, output, expected_outputs}], "output": ...}
    recipe: dict[str, Any]
    inputs: Sequence[tuple[str, str, str, int | None]] = ()  # (role, path, sha256, asset row id)
    skipped_from_id: int | None = None


@dataclass(frozen=True)
class SubmitWork:
    """What a submit task needs, read under its claim."""

    node_id: int
    run_id: str
    model: str
    endpoint: str
    body: dict[str, Any]
    attempts: int
    max_attempts: int
    open_intent_id: int | None
    open_intent_at: datetime | None


@dataclass(frozen=True)
class InFlightJob:
    """A submitted job the poller is watching."""

    row_id: int
    scenario_job_id: str
    node_id: int
    model: str
    job_type: str
    polls: int
    accepted_at: datetime
    due_at: datetime | None
    expected_outputs: int
    status: JobStatus | None = None


@dataclass(frozen=True)
class CollectWork:
    """One succeeded node whose outputs must be stored."""

    node_id: int
    run_id: str
    manifest_name: str
    manifest_item_id: str
    item_key: str
    seed: int
    model: str
    trained_model: str | None
    step: int
    branch: int
    expected_outputs: int
    final: bool
    node_key: str
    input_asset: str | None
    output_template: str
    overwrite: bool
    scenario_job_id: str
    asset_ids: tuple[str, ...]
    stored: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (key, sha256)

    def index_of(self, output: int) -> int:
        """The item-wide index (the `{index}` of keys) of this node's output number `output`."""
        return self.branch * self.expected_outputs + output


@dataclass(frozen=True)
class StoredOutput:
    """A verified stored object of an item, as the skip check needs it."""

    item_id: int
    index: int
    key: str
    sha256: str


@dataclass(frozen=True)
class KeyOwner:
    """Who wrote the newest object at a storage key."""

    manifest: str
    item: str
    item_key: str
    asset_id: str | None


def new_run_id() -> str:
    """A sortable, unique run id: run_<utc timestamp>_<random>."""
    return "run_" + utcnow().strftime("%Y%m%dT%H%M%S") + "_" + uuid.uuid4().hex[:8]


class Repository:
    """Loads, persists and queries the lineage database."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = utcnow,
        policy: Policy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self._sessions = make_sessionmaker(engine)
        self.now = clock
        self.policy = policy or Policy()
        self.rng = rng or random.Random()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with translate_errors(), self._sessions.begin() as session:
            yield session

    def session(self) -> Any:
        """A read transaction for report builders (`pipeline.reports`)."""
        return self._tx()

    # -- runs -----------------------------------------------------------------------------

    def find_stored_outputs(self, item_keys: Iterable[str]) -> dict[str, list[StoredOutput]]:
        """For each item_key, the final objects of the newest item that succeeded with it."""
        keys = list(set(item_keys))
        found: dict[str, list[StoredOutput]] = {}
        with self._tx() as s:
            for chunk in _chunks(keys, 500):
                rows = s.execute(
                    select(ItemRow.id, ItemRow.item_key)
                    .where(ItemRow.item_key.in_(chunk), ItemRow.status == ItemStatus.SUCCEEDED)
                    .order_by(ItemRow.id.desc())
                ).all()
                newest: dict[str, int] = {}
                for item_id, item_key in rows:
                    newest.setdefault(item_key, item_id)
                if not newest:
                    continue
                objects = s.execute(
                    select(ObjectRow).where(
                        ObjectRow.item_id.in_(list(newest.values())), ObjectRow.final.is_(True)
                    )
                ).scalars()
                by_item: dict[int, list[StoredOutput]] = {}
                for o in objects:
                    by_item.setdefault(o.item_id, []).append(
                        StoredOutput(o.item_id, o.output_index, o.key, o.sha256)
                    )
                for item_key, item_id in newest.items():
                    if by_item.get(item_id):
                        found[item_key] = sorted(by_item[item_id], key=lambda o: o.index)
        return found

    def key_owners(self, keys: Iterable[str]) -> dict[str, KeyOwner]:
        """For stored keys among `keys`: the item whose output the newest object there is."""
        wanted = list(set(keys))
        owners: dict[str, KeyOwner] = {}
        with self._tx() as s:
            for chunk in _chunks(wanted, 500):
                rows = s.execute(
                    select(ObjectRow.key, ManifestRow.name, ItemRow.manifest_item_id)
                    .add_columns(ItemRow.item_key, AssetRow.scenario_asset_id)
                    .join(ItemRow, ObjectRow.item_id == ItemRow.id)
                    .join(RunRow, ItemRow.run_id == RunRow.id)
                    .join(ManifestRow, RunRow.manifest_id == ManifestRow.id)
                    .join(AssetRow, ObjectRow.asset_id == AssetRow.id)
                    .where(ObjectRow.key.in_(chunk))
                    .order_by(ObjectRow.id)
                ).all()
                for key, manifest, item, item_key, asset in rows:
                    owners[key] = KeyOwner(manifest, item, item_key, asset)
        return owners

    def record_run(
        self,
        *,
        manifest_name: str,
        manifest_path: str,
        manifest_sha256: str,
        manifest_body: str,
        items: Sequence[NewItem],
        trigger: str = "run",
        force: bool = False,
        sandbox: bool = False,
        storage_url: str,
        api_host: str | None,
        git_sha: str | None = None,
        deadline_at: datetime | None = None,
        max_attempts: int = 2,
        budget: float | None = None,
    ) -> str:
        """Record the manifest, a run, its items and their first nodes in one transaction."""
        run_id = new_run_id()
        now = self.now()
        with self._tx() as s:
            manifest = s.execute(
                select(ManifestRow).where(
                    ManifestRow.name == manifest_name, ManifestRow.sha256 == manifest_sha256
                )
            ).scalar_one_or_none()
            if manifest is None:
                manifest = ManifestRow(
                    name=manifest_name,
                    path=manifest_path,
                    sha256=manifest_sha256,
                    body=manifest_body,
                    created_at=now,
                )
                s.add(manifest)
                s.flush()
            run = RunRow(
                id=run_id,
                manifest_id=manifest.id,
                trigger=trigger,
                status=RunStatus.RUNNING,
                force=force,
                sandbox=sandbox,
                git_sha=git_sha,
                api_host=api_host,
                storage_url=storage_url,
                created_at=now,
                deadline_at=deadline_at,
                budget_cu=budget,
            )
            s.add(run)
            s.flush()
            # Bulk inserts: a 100,000-item manifest is recorded in seconds, not minutes.
            item_ids = self._insert_items(s, run_id, items, force, max_attempts, now)
            inputs = [
                {"item_id": item_id, "role": role, "path": path, "sha256": sha, "asset_id": row}
                for spec, item_id in zip(items, item_ids, strict=True)
                for role, path, sha, row in spec.inputs
            ]
            if inputs:
                s.connection().execute(insert(ITEM_INPUTS), inputs)
            todo = [
                (spec, i)
                for spec, i in zip(items, item_ids, strict=True)
                if not spec.skipped_from_id
            ]
            reusable = {} if force else self._reusable(s, [spec.generation_key for spec, _ in todo])
            fresh = []
            for spec, item_id in todo:
                steps = spec.recipe.get("steps", [])
                template = None if steps else spec.recipe.get("output")
                reused = reusable.get(spec.generation_key)
                if reused is not None:  # rare: its chain is created node by node
                    item = s.get(ItemRow, item_id)
                    assert item is not None
                    self._add_node(
                        s,
                        item,
                        parent=None,
                        step=0,
                        branch=0,
                        parent_output=None,
                        node_key=spec.generation_key,
                        model=spec.model,
                        endpoint=spec.endpoint,
                        body=spec.body,
                        input_asset=None,
                        expected=spec.generation_outputs,
                        template=template,
                        final=not steps,
                        reused=reused,
                        now=now,
                    )
                    self._refresh_item(s, item_id, now)
                    continue
                fresh.append(
                    (
                        item_id,
                        spec.generation_key,
                        spec.model,
                        spec.endpoint,
                        spec.body,
                        spec.generation_outputs,
                        template,
                        not steps,
                    )
                )
            state, values = nodes.born(reused_outputs=None, stores_outputs=False, now=now)
            insert_many(
                s.connection(),
                NODES,
                FRESH_NODE_COLUMNS,
                fresh,
                {
                    "run_id": run_id,
                    "parent_id": None,
                    "step": 0,
                    "branch": 0,
                    "parent_output": None,
                    "input_asset": None,
                    "state": state,
                    "attempts": 0,
                    "max_attempts": max_attempts,
                    "tries": 0,
                    "created_at": now,
                    "updated_at": now,
                    **values,
                },
            )
            _refresh_run_status(s, run, now)
        return run_id

    @staticmethod
    def _insert_items(
        s: Session,
        run_id: str,
        items: Sequence[NewItem],
        force: bool,
        max_attempts: int,
        now: datetime,
    ) -> list[int]:
        """Insert a run's items in bulk; their ids, in order."""
        rows = (
            (
                spec.manifest_item_id,
                spec.line,
                spec.item_key,
                spec.prompt,
                spec.seed,
                spec.model,
                spec.trained_model,
                spec.params,
                spec.recipe | {"force": force, "max_attempts": max_attempts},
                ItemStatus.SKIPPED if spec.skipped_from_id else ItemStatus.PENDING,
                spec.skipped_from_id,
                now if spec.skipped_from_id else None,
            )
            for spec in items
        )
        constants = {"run_id": run_id, "created_at": now, "updated_at": now}
        insert_many(s.connection(), ITEMS, NEW_ITEM_COLUMNS, rows, constants)
        # Ids by the (run, item id) unique key: an INSERT ... RETURNING that keeps the
        # rows' order runs row by row on SQLite.
        found = dict(
            s.execute(
                select(ItemRow.manifest_item_id, ItemRow.id).where(ItemRow.run_id == run_id)
            ).all()
        )
        return [found[spec.manifest_item_id] for spec in items]

    def _reusable(self, s: Session, node_keys: Sequence[str]) -> dict[str, tuple[int, list[str]]]:
        """For node keys that succeeded before: (newest node id, its output asset ids)."""
        found: dict[str, tuple[int, list[str]]] = {}
        for chunk in _chunks(list(set(node_keys)), 500):
            rows = s.execute(
                select(NodeRow.node_key, NodeRow.id, NodeRow.outputs)
                .where(
                    NodeRow.node_key.in_(chunk),
                    NodeRow.state == NodeState.SUCCEEDED,
                    NodeRow.outputs.is_not(None),
                )
                .order_by(NodeRow.id.desc())
            ).all()
            for key, node_id, outputs in rows:
                ids = list((outputs or {}).get("ids") or [])
                if ids and key not in found:
                    found[key] = (node_id, ids)
        return found

    def _add_node(
        self,
        s: Session,
        item: ItemRow,
        *,
        parent: NodeRow | None,
        step: int,
        branch: int,
        parent_output: int | None,
        node_key: str,
        model: str,
        endpoint: str,
        body: dict[str, Any],
        input_asset: str | None,
        expected: int,
        template: str | None,
        final: bool,
        reused: tuple[int, list[str]] | None,
        now: datetime,
    ) -> NodeRow:
        """Insert one node; a reused one (its key succeeded before) spawns its children too."""
        state, values = nodes.born(
            reused_outputs=tuple(reused[1]) if reused else None,
            stores_outputs=template is not None,
            now=now,
        )
        node = NodeRow(
            run_id=item.run_id,
            item_id=item.id,
            parent_id=parent.id if parent else None,
            step=step,
            branch=branch,
            parent_output=parent_output,
            node_key=node_key,
            model=model,
            endpoint=endpoint,
            body=body,
            input_asset=input_asset,
            expected_outputs=expected,
            output_template=template,
            final=final,
            state=state,
            max_attempts=int(item.recipe.get("max_attempts", 2)),
            reused_from_id=reused[0] if reused else None,
            created_at=now,
            updated_at=now,
            **values,
        )
        s.add(node)
        s.flush()
        if reused:
            self._spawn(s, item, node, now)
        return node

    def _spawn(self, s: Session, item: ItemRow, node: NodeRow, now: datetime) -> None:
        """Create the recipe's next step: one node on each output of `node`."""
        steps: list[dict[str, Any]] = item.recipe.get("steps", [])
        if node.step >= len(steps):
            return
        spec = steps[node.step]
        number = node.step + 1
        last = number == len(steps)
        outputs = list((node.outputs or {}).get("ids") or [])
        keys = {
            asset: compute_step_key(
                model=spec["model"],
                endpoint=spec["endpoint"],
                params=spec["params"],
                prompt=spec.get("prompt"),
                input_asset=asset,
            )
            for asset in outputs
        }
        reusable = {} if item.recipe.get("force") else self._reusable(s, list(keys.values()))
        for index, asset in enumerate(outputs):
            body = dict(spec["params"])
            if spec.get("prompt") is not None:
                body["prompt"] = spec["prompt"]
            if spec["endpoint"] != "custom":
                body["modelId"] = spec["model"]
            body["image"] = asset
            self._add_node(
                s,
                item,
                parent=node,
                step=number,
                branch=node.branch * node.expected_outputs + index,
                parent_output=index,
                node_key=keys[asset],
                model=spec["model"],
                endpoint=spec["endpoint"],
                body=body,
                input_asset=asset,
                expected=int(spec["expected_outputs"]),
                template=item.recipe.get("output") if last else spec.get("output"),
                final=last,
                reused=reusable.get(keys[asset]),
                now=now,
            )

    def latest_run_id(self) -> str | None:
        """The id of the newest run, if any."""
        with self._tx() as s:
            return s.execute(
                select(RunRow.id).order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(1)
            ).scalar_one_or_none()

    def run_exists(self, run_id: str) -> bool:
        with self._tx() as s:
            return s.get(RunRow, run_id) is not None

    def reopen_items(
        self, run_id: str, manifest_item_ids: Sequence[str] | None, extra_attempts: int
    ) -> list[str]:
        """Put a run's failed or canceled items back to work as new attempts.

        Only their failed or canceled nodes run again: a node whose job succeeded but whose
        outputs were not stored goes back to collecting, without paying for a new job.
        Returns the manifest item ids reopened.
        """
        now = self.now()
        reopened: list[str] = []
        with self._tx() as s:
            run = s.get(RunRow, run_id)
            if run is None:
                return []
            query = select(ItemRow).where(
                ItemRow.run_id == run_id,
                ItemRow.status.in_([ItemStatus.FAILED, ItemStatus.CANCELED]),
            )
            if manifest_item_ids:
                query = query.where(ItemRow.manifest_item_id.in_(list(manifest_item_ids)))
            for item in s.execute(query).scalars():
                for node in s.execute(
                    select(NodeRow).where(
                        NodeRow.item_id == item.id,
                        NodeRow.state.in_([NodeState.FAILED, NodeState.CANCELED]),
                    )
                ).scalars():
                    collected_before = bool((node.outputs or {}).get("ids"))
                    node.state = NodeState.COLLECTING if collected_before else NodeState.PENDING
                    node.max_attempts = node.attempts + extra_attempts
                    node.tries = 0
                    node.error = None
                    node.hint = None
                    node.claim_owner = None
                    node.claimed_until = None
                    node.due_at = now
                    node.finished_at = None
                    node.updated_at = now
                item.status = ItemStatus.PENDING
                item.error = None
                item.hint = None
                item.finished_at = None
                item.updated_at = now
                reopened.append(item.manifest_item_id)
            if reopened:
                run.status = RunStatus.RUNNING
                run.finished_at = None
                run.error = None
                run.deadline_at = None
        return reopened

    def set_deadline(self, run_id: str, deadline_at: datetime | None) -> None:
        with self._tx() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(deadline_at=deadline_at))

    def run_progress(self, run_id: str) -> dict[str, int]:
        """Item counts by status for one run (cheap; used by --wait)."""
        with self._tx() as s:
            rows = s.execute(
                select(ItemRow.status, func.count())
                .where(ItemRow.run_id == run_id)
                .group_by(ItemRow.status)
            ).all()
        return {str(status): int(n) for status, n in rows}

    def run_status(self, run_id: str) -> RunStatus | None:
        with self._tx() as s:
            run = s.get(RunRow, run_id)
            return run.status if run else None

    # -- leases and cursors ---------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the named lease; True if `holder` now holds it."""
        now = self.now()
        until = now + timedelta(seconds=ttl)
        with self._tx() as s:
            taken = s.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == name,
                    or_(
                        LeaseRow.holder == holder,
                        LeaseRow.expires_at.is_(None),
                        LeaseRow.expires_at < now,
                    ),
                )
                .values(holder=holder, expires_at=until)
            ).rowcount  # type: ignore[attr-defined]  # CursorResult for DML
            if taken:
                return True
            if s.get(LeaseRow, name) is not None:
                return False
        try:
            with self._tx() as s:
                s.add(LeaseRow(name=name, holder=holder, expires_at=until))
            return True
        except IntegrityError:
            return False

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as s:
            s.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, LeaseRow.holder == holder)
                .values(holder=None, expires_at=None)
            )

    def get_cursor(self, name: str) -> str | None:
        with self._tx() as s:
            row = s.get(CursorRow, name)
            return row.value if row else None

    def set_cursor(self, name: str, value: str) -> None:
        """Set a named value; safe when several threads or workers set it at once."""
        with self._tx() as s:
            changed = s.execute(
                update(CursorRow)
                .where(CursorRow.name == name)
                .values(value=value, updated_at=self.now())
            ).rowcount  # type: ignore[attr-defined]  # CursorResult for DML
        if changed:
            return
        try:
            with self._tx() as s:
                s.add(CursorRow(name=name, value=value, updated_at=self.now()))
        except IntegrityError:  # another writer created it first: overwrite theirs
            with self._tx() as s:
                s.execute(
                    update(CursorRow)
                    .where(CursorRow.name == name)
                    .values(value=value, updated_at=self.now())
                )

    # -- node transitions -----------------------------------------------------------------

    def transition(self, node_id: int, event: Event) -> bool:
        """Apply one event to one node; False if it did not apply or another writer won."""
        now = self.now()
        with self._tx() as s:
            node = s.get(NodeRow, node_id)
            if node is None:
                return False
            return self._apply(s, node, event, now)

    def _apply(self, s: Session, node: NodeRow, event: Event, now: datetime) -> bool:
        facts = _facts(node)
        change = nodes.decide(facts, event, now, self.policy, self.rng)
        if change is None:
            return False
        if not self._persist(s, node, facts.state, change, now):
            return False
        if change.spawn or change.state != facts.state:
            s.refresh(node)
            if change.spawn:
                item = s.get(ItemRow, node.item_id)
                assert item is not None
                self._spawn(s, item, node, now)
            self._refresh_item(s, node.item_id, now)
        return True

    def _persist(
        self, s: Session, node: NodeRow, from_state: NodeState, change: Change, now: datetime
    ) -> bool:
        """One conditional UPDATE: the row must still be as the decision saw it."""
        conditions = [NodeRow.id == node.id, NodeRow.state == from_state, *_guard(change, now)]
        values = _values(change) | {"updated_at": now}
        result = s.execute(
            update(NodeRow)
            .where(*conditions)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]  # CursorResult for DML

    def _refresh_item(self, s: Session, item_id: int, now: datetime) -> None:
        """Derive an item's status from its nodes' states."""
        item = s.get(ItemRow, item_id)
        if item is None or item.status == ItemStatus.SKIPPED:
            return
        rows = s.execute(
            select(NodeRow.state, NodeRow.error, NodeRow.hint)
            .where(NodeRow.item_id == item_id)
            .order_by(NodeRow.id)
        ).all()
        status = ItemStatus(nodes.item_status(state for state, _, _ in rows))
        if status == item.status:
            return
        item.status = status
        item.updated_at = now
        if status.final:
            item.finished_at = now
            failed = [(e, h) for state, e, h in rows if state != NodeState.SUCCEEDED and e]
            item.error, item.hint = failed[0] if failed else (None, None)
        else:
            item.finished_at = None

    def running_in_pool(self, pool: str) -> int:
        """Nodes whose job the API accepted and we have not yet seen finish."""
        return self._count_in_pool([NodeState.RUNNING], pool)

    def sent_in_pool(self, pool: str) -> int:
        """Running nodes plus those whose POST is out (an intent written, no answer
        recorded yet): what the API may count as ours right now."""
        posting = (
            select(JobRow.id)
            .where(
                JobRow.node_id == NodeRow.id,
                JobRow.scenario_job_id.is_(None),
                JobRow.finished_at.is_(None),
            )
            .exists()
        )
        either = or_(
            NodeRow.state == NodeState.RUNNING,
            and_(NodeRow.state == NodeState.SUBMITTING, posting),
        )
        with self._tx() as s:
            query = select(func.count()).select_from(NodeRow).where(either, *_in_pool(pool))
            return int(s.execute(query).scalar_one())

    def slots_by_pool(self) -> dict[str, int]:
        """Nodes holding a parallel-job slot, per pool (one query)."""
        pool = case((NodeRow.endpoint == "custom", "custom"), else_="inference")
        with self._tx() as s:
            rows = s.execute(
                select(pool, func.count())
                .where(NodeRow.state.in_([NodeState.SUBMITTING, NodeState.RUNNING]))
                .group_by(pool)
            ).all()
        return {str(name): int(count) for name, count in rows}

    def waiting_in_pool(self, pool: str) -> bool:
        """Whether pending nodes of the pool wait for a slot."""
        with self._tx() as s:
            query = select(NodeRow.id).where(NodeRow.state == NodeState.PENDING, *_in_pool(pool))
            return s.execute(query.limit(1)).first() is not None

    def _count_in_pool(self, states: list[NodeState], pool: str | None) -> int:
        with self._tx() as s:
            query = select(func.count()).select_from(NodeRow).where(NodeRow.state.in_(states))
            return int(s.execute(query.where(*_in_pool(pool))).scalar_one())

    def dispatch_pending(self, limit: int, pool: str | None = None) -> list[int]:
        """Hand up to `limit` due pending nodes (of one pool) to submit tasks; their ids."""
        if limit <= 0:
            return []
        now = self.now()
        change = nodes.decide(Facts(NodeState.PENDING), nodes.Dispatch(), now, self.policy)
        assert change is not None
        with self._tx() as s:
            rows = s.execute(
                select(NodeRow.id, NodeRow.item_id)
                .where(
                    NodeRow.state == NodeState.PENDING,
                    or_(NodeRow.due_at.is_(None), NodeRow.due_at <= now),
                    *_in_pool(pool),
                )
                .order_by(NodeRow.due_at, NodeRow.id)
                .limit(limit)
            ).all()
            ids = [node_id for node_id, _ in rows]
            if ids:
                s.execute(
                    update(NodeRow)
                    .where(NodeRow.id.in_(ids), NodeRow.state == NodeState.PENDING)
                    .values(**_values(change), updated_at=now)
                    .execution_options(synchronize_session=False)
                )
                s.execute(
                    update(ItemRow)
                    .where(
                        ItemRow.id.in_({item_id for _, item_id in rows}),
                        ItemRow.status == ItemStatus.PENDING,
                    )
                    .values(status=ItemStatus.RUNNING, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
        return ids

    def due_for_tasks(self, state: NodeState) -> list[int]:
        """Hand out again submitting/collecting nodes that are due or whose task vanished.

        A node handed out `policy.max_tries` times fails with its last real error.
        """
        now = self.now()
        handed: list[int] = []
        with self._tx() as s:
            rows = s.execute(
                select(NodeRow).where(NodeRow.state == state, *_guard_redispatchable(now))
            ).scalars()
            for node in list(rows):
                if self._apply(s, node, nodes.Redispatch(), now):
                    s.refresh(node)
                    if node.state == state:
                        handed.append(node.id)
        return handed

    def collecting_waiting(self) -> int:
        """Finished nodes waiting for company before their collect task is sent."""
        with self._tx() as s:
            query = select(func.count()).select_from(NodeRow).where(*_gathering(self.now()))
            return int(s.execute(query).scalar_one())

    def pending_waits(self) -> bool:
        """Whether any node waits to be submitted (now or after a backoff)."""
        with self._tx() as s:
            query = select(NodeRow.id).where(NodeRow.state == NodeState.PENDING).limit(1)
            return s.execute(query).first() is not None

    def collect_now(self) -> None:
        """Make every collecting node that waits for company due now."""
        now = self.now()
        with self._tx() as s:
            s.execute(update(NodeRow).where(*_gathering(now)).values(due_at=now))

    def in_flight_jobs(self) -> list[InFlightJob]:
        """Every submitted job of a running node that has not reached a terminal status."""
        with self._tx() as s:
            rows = s.execute(
                select(JobRow, NodeRow.due_at, NodeRow.expected_outputs)
                .join(NodeRow, JobRow.node_id == NodeRow.id)
                .where(
                    JobRow.scenario_job_id.is_not(None),
                    JobRow.status.in_(ACTIVE_JOB_STATUSES),
                    NodeRow.state == NodeState.RUNNING,
                )
            ).all()
            return [
                InFlightJob(
                    row_id=j.id,
                    scenario_job_id=j.scenario_job_id or "",
                    node_id=j.node_id,
                    model=j.model,
                    job_type=j.job_type or "custom",
                    polls=j.polls,
                    accepted_at=j.accepted_at or j.intent_at,
                    due_at=due_at,
                    expected_outputs=expected,
                    status=j.status,
                )
                for j, due_at, expected in rows
            ]

    def expected_duration(self, model: str, sample: int = 20) -> float | None:
        """Median seconds from creation to success of this model's recent jobs.

        Measured on Scenario's own timestamps (createdAt to the updatedAt of success), not
        on when we happened to look: a duration inflated by our polling would push the
        next first poll later, and the one after later still.
        """
        with self._tx() as s:
            rows = s.execute(
                select(JobRow.remote_created_at, JobRow.remote_updated_at)
                .where(
                    JobRow.model == model,
                    JobRow.status == JobStatus.SUCCESS,
                    JobRow.remote_created_at.is_not(None),
                    JobRow.remote_updated_at.is_not(None),
                )
                .order_by(JobRow.id.desc())
                .limit(sample)
            ).all()
        durations = sorted((f - a).total_seconds() for a, f in rows if a and f)
        return durations[len(durations) // 2] if durations else None

    def schedule_polls(self, schedule: dict[tuple[int, int], datetime]) -> None:
        """Set the next look at running jobs: {(job row id, node id): when} (a poll counted)."""
        with self._tx() as s:
            now = self.now()
            for (row_id, node_id), when in schedule.items():
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == row_id)
                    .values(polls=JobRow.polls + 1)
                    .execution_options(synchronize_session=False)
                )
                s.execute(
                    update(NodeRow)
                    .where(NodeRow.id == node_id, NodeRow.state == NodeState.RUNNING)
                    .values(due_at=when, updated_at=now)
                    .execution_options(synchronize_session=False)
                )

    def apply_job(self, row_id: int, job: Job, *, collect_now: bool = False) -> NodeState | None:
        """Record what Scenario says of a job; on a terminal status, move its node on.

        Returns the node's new state when it changed, else None.
        """
        now = self.now()
        with self._tx() as s:
            row = s.get(JobRow, row_id)
            if row is None or (row.status is not None and row.status.terminal):
                return None
            row.status = job.status
            row.progress = job.progress
            row.remote_updated_at = job.updated_at or row.remote_updated_at
            if job.cost is not None:
                row.cost_cu = job.cost
            if not job.status.terminal:
                return None
            row.finished_at = now
            node = s.get(NodeRow, row.node_id)
            if node is None:
                return None
            event: Event
            if job.status == JobStatus.SUCCESS:
                ids = tuple(job.asset_ids)
                if len(ids) > node.expected_outputs and node.output_template is not None:
                    event = nodes.Fail(
                        f"job {job.id} returned {len(ids)} outputs where {node.expected_outputs} "
                        "were expected; their storage keys would collide"
                    )
                else:
                    self._record_output_assets(s, node, row, ids)
                    event = nodes.Succeeded(ids, collect_now=collect_now)
            elif job.status == JobStatus.CANCELED:
                event = nodes.JobCanceled(job.error or f"job {job.id} was canceled")
            else:
                row.error = nodes.cut(job.error)
                row.hint = nodes.cut(job.hint)
                event = nodes.JobFailed(job.error or f"job {job.id} failed", job.hint)
            before = node.state
            if self._apply(s, node, event, now):
                s.refresh(node)
                return node.state if node.state != before else None
            return None

    def _record_output_assets(
        self, s: Session, node: NodeRow, job: JobRow, asset_ids: Sequence[str]
    ) -> None:
        """Asset rows for a job's outputs, each linked to the asset it was made from."""
        parent_id = None
        if node.input_asset:
            parent_id = s.execute(
                select(AssetRow.id).where(AssetRow.scenario_asset_id == node.input_asset)
            ).scalar_one_or_none()
        existing = set(
            s.execute(
                select(AssetRow.scenario_asset_id).where(
                    AssetRow.scenario_asset_id.in_(list(asset_ids))
                )
            ).scalars()
        )
        for index, asset_id in enumerate(asset_ids):
            if asset_id not in existing:
                s.add(
                    AssetRow(
                        scenario_asset_id=asset_id,
                        role=AssetRole.OUTPUT,
                        job_id=job.id,
                        output_index=index,
                        parent_id=parent_id,
                    )
                )

    def refresh_runs(self) -> list[str]:
        """Derive the status of running runs from their items; return runs that finished."""
        now = self.now()
        finished = []
        with self._tx() as s:
            for run in s.execute(
                select(RunRow).where(RunRow.status == RunStatus.RUNNING)
            ).scalars():
                if _refresh_run_status(s, run, now):
                    finished.append(run.id)
        return finished

    def running_run_ids(self) -> list[str]:
        with self._tx() as s:
            return list(
                s.execute(select(RunRow.id).where(RunRow.status == RunStatus.RUNNING)).scalars()
            )

    def overdue_runs(self) -> list[str]:
        """Running runs whose deadline has passed."""
        now = self.now()
        with self._tx() as s:
            return list(
                s.execute(
                    select(RunRow.id).where(
                        RunRow.status == RunStatus.RUNNING,
                        RunRow.deadline_at.is_not(None),
                        RunRow.deadline_at < now,
                    )
                ).scalars()
            )

    def cancel_run_nodes(self, run_id: str, reason: str) -> list[str]:
        """Cancel every unfinished node of a run; return the Scenario job ids still in flight."""
        return self._end_run_nodes(run_id, nodes.Cancel(reason))

    def fail_run(self, run_id: str, message: str) -> None:
        """Stop a run: every unfinished node fails with `message` (e.g. bad credentials)."""
        with self._tx() as s:
            run = s.get(RunRow, run_id)
            if run is not None:
                run.error = message
        self._end_run_nodes(run_id, nodes.Fail(message))

    def _end_run_nodes(self, run_id: str, event: nodes.Cancel | nodes.Fail) -> list[str]:
        now = self.now()
        remote: list[str] = []
        with self._tx() as s:
            unfinished = s.execute(
                select(NodeRow).where(
                    NodeRow.run_id == run_id, NodeRow.state.in_(list(nodes.UNFINISHED_STATES))
                )
            ).scalars()
            for node in list(unfinished):
                for job in s.execute(
                    select(JobRow).where(
                        JobRow.node_id == node.id,
                        JobRow.scenario_job_id.is_not(None),
                        JobRow.status.in_(ACTIVE_JOB_STATUSES),
                    )
                ).scalars():
                    remote.append(job.scenario_job_id or "")
                    job.status = JobStatus.CANCELED
                    job.finished_at = now
                self._apply(s, node, event, now)
            for item in s.execute(
                select(ItemRow).where(
                    ItemRow.run_id == run_id, ItemRow.status.not_in(list(FINAL_ITEM_STATUSES))
                )
            ).scalars():
                # An item whose nodes were never created (or all finished) is settled here.
                self._refresh_item(s, item.id, now)
                if not item.status.final:
                    failed = isinstance(event, nodes.Fail)
                    item.status = ItemStatus.FAILED if failed else ItemStatus.CANCELED
                    item.error = event.reason
                    item.finished_at = now
        return remote

    # -- submit ---------------------------------------------------------------------------

    def next_due(self) -> dict[NodeState, datetime]:
        """The earliest timer per state the sweeper acts on (pending, running, collecting)."""
        with self._tx() as s:
            rows = s.execute(
                select(NodeRow.state, func.min(NodeRow.due_at))
                .where(
                    NodeRow.state.in_([NodeState.PENDING, NodeState.RUNNING, NodeState.COLLECTING]),
                    NodeRow.claimed_until.is_(None),
                    NodeRow.due_at.is_not(None),
                )
                .group_by(NodeRow.state)
            ).all()
        return {NodeState(state): due for state, due in rows if due is not None}

    def submit_work(self, node_id: int) -> SubmitWork | None:
        with self._tx() as s:
            node = s.get(NodeRow, node_id)
            if node is None:
                return None
            intent = s.execute(
                select(JobRow)
                .where(
                    JobRow.node_id == node_id,
                    JobRow.scenario_job_id.is_(None),
                    JobRow.finished_at.is_(None),
                )
                .order_by(JobRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return SubmitWork(
                node_id=node.id,
                run_id=node.run_id,
                model=node.model,
                endpoint=node.endpoint,
                body=dict(node.body),
                attempts=node.attempts,
                max_attempts=node.max_attempts,
                open_intent_id=intent.id if intent else None,
                open_intent_at=intent.intent_at if intent else None,
            )

    def note_error(self, node_id: int, error: str) -> None:
        """Record why a task on an unfinished node went wrong, without moving it."""
        with self._tx() as s:
            s.execute(
                update(NodeRow)
                .where(NodeRow.id == node_id, NodeRow.state.in_(list(nodes.UNFINISHED_STATES)))
                .values(error=nodes.cut(error), updated_at=self.now())
            )

    def last_error(self, node_id: int) -> str | None:
        """The newest error recorded for a node or its jobs (a failure's real cause)."""
        with self._tx() as s:
            node = s.get(NodeRow, node_id)
            if node is None:
                return None
            job_error = s.execute(
                select(JobRow.error)
                .where(JobRow.node_id == node_id, JobRow.error.is_not(None))
                .order_by(JobRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return node.error or job_error

    def record_intent(self, node_id: int, owner: str) -> int | None:
        """Write the intent to submit (before the POST) under our claim; the job row id."""
        now = self.now()
        with self._tx() as s:
            taken = s.execute(
                update(NodeRow)
                .where(
                    NodeRow.id == node_id,
                    NodeRow.state == NodeState.SUBMITTING,
                    NodeRow.claim_owner == owner,
                )
                .values(attempts=NodeRow.attempts + 1, updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if not taken:
                return None
            node = s.get(NodeRow, node_id)
            assert node is not None
            # Job rows number every POST, refused ones too (a 429 leaves its row behind and
            # does not count as an attempt), so the number is not `attempts`.
            number = s.execute(
                select(func.coalesce(func.max(JobRow.attempt), 0)).where(JobRow.node_id == node_id)
            ).scalar_one()
            job = JobRow(node_id=node_id, attempt=number + 1, model=node.model, intent_at=now)
            s.add(job)
            s.flush()
            return job.id

    def known_job_ids(self, scenario_job_ids: Iterable[str]) -> set[str]:
        ids = list(scenario_job_ids)
        known: set[str] = set()
        with self._tx() as s:
            for chunk in _chunks(ids, 500):
                known.update(
                    s.execute(
                        select(JobRow.scenario_job_id).where(JobRow.scenario_job_id.in_(chunk))
                    ).scalars()  # type: ignore[arg-type]
                )
        return known

    def record_accepted(self, row_id: int, job: Job, cost: float | None, first_poll: float) -> None:
        """The POST answered (or reconciliation found the job): the node is running."""
        now = self.now()
        with self._tx() as s:
            row = s.get(JobRow, row_id)
            assert row is not None
            row.scenario_job_id = job.id
            row.job_type = job.job_type or "custom"
            row.status = JobStatus.PENDING if job.status.terminal else job.status
            row.cost_cu = cost if cost is not None else job.cost
            row.accepted_at = now
            row.remote_created_at = job.created_at
            node = s.get(NodeRow, row.node_id)
            assert node is not None
            self._apply(s, node, nodes.Accepted(first_poll), now)

    def record_refused(self, row_id: int, event: nodes.Throttled | nodes.Refused) -> None:
        """The POST was refused: nothing was created or billed."""
        now = self.now()
        with self._tx() as s:
            row = s.get(JobRow, row_id)
            assert row is not None
            row.error = event.error
            row.finished_at = now
            node = s.get(NodeRow, row.node_id)
            assert node is not None
            self._apply(s, node, event, now)

    # -- inputs ---------------------------------------------------------------------------

    def find_input_assets(self, api_host: str) -> dict[str, tuple[int, str]]:
        """Uploaded inputs on this API: content sha256 -> (row id, newest Scenario asset id)."""
        with self._tx() as s:
            rows = s.execute(
                select(AssetRow.content_sha256, AssetRow.id, AssetRow.scenario_asset_id)
                .where(AssetRow.role == AssetRole.INPUT, AssetRow.api_host == api_host)
                .order_by(AssetRow.id)
            ).all()
        return {sha: (row_id, asset) for sha, row_id, asset in rows if sha}

    def record_input_asset(
        self, scenario_asset_id: str, content_sha256: str, api_host: str, mime_type: str
    ) -> int:
        with self._tx() as s:
            row = AssetRow(
                scenario_asset_id=scenario_asset_id,
                role=AssetRole.INPUT,
                content_sha256=content_sha256,
                api_host=api_host,
                mime_type=mime_type,
            )
            s.add(row)
            s.flush()
            return row.id

    # -- collect --------------------------------------------------------------------------

    def collect_work(self, node_id: int) -> CollectWork | None:
        with self._tx() as s:
            row = s.execute(
                select(NodeRow, ItemRow, ManifestRow.name)
                .join(ItemRow, NodeRow.item_id == ItemRow.id)
                .join(RunRow, ItemRow.run_id == RunRow.id)
                .join(ManifestRow, RunRow.manifest_id == ManifestRow.id)
                .where(NodeRow.id == node_id)
            ).first()
            if row is None:
                return None
            node, item, manifest_name = row
            ids = tuple((node.outputs or {}).get("ids") or ())
            if not ids or node.output_template is None:
                return None
            source = node.reused_from_id or node.id
            job_id = s.execute(
                select(JobRow.scenario_job_id)
                .where(JobRow.node_id == source, JobRow.status == JobStatus.SUCCESS)
                .order_by(JobRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            stored = s.execute(
                select(ObjectRow.output_index, ObjectRow.key, ObjectRow.sha256).where(
                    ObjectRow.node_id == node_id
                )
            ).all()
            return CollectWork(
                node_id=node.id,
                run_id=node.run_id,
                manifest_name=manifest_name,
                manifest_item_id=item.manifest_item_id,
                item_key=item.item_key,
                seed=item.seed,
                model=node.model,
                trained_model=item.trained_model if node.step == 0 else None,
                step=node.step,
                branch=node.branch,
                expected_outputs=node.expected_outputs,
                final=node.final,
                node_key=node.node_key,
                input_asset=node.input_asset,
                output_template=node.output_template,
                overwrite=item.recipe.get("overwrite", "replace") != "never",
                scenario_job_id=job_id or "",
                asset_ids=ids,
                stored={index: (key, sha) for index, key, sha in stored},
            )

    def stored_copy(self, scenario_asset_id: str, key: str) -> str | None:
        """The sha256 of an object recorded earlier at `key` for this very asset, if any."""
        with self._tx() as s:
            return s.execute(
                select(ObjectRow.sha256)
                .join(AssetRow, ObjectRow.asset_id == AssetRow.id)
                .where(AssetRow.scenario_asset_id == scenario_asset_id, ObjectRow.key == key)
                .order_by(ObjectRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()

    def record_output(
        self,
        *,
        node_id: int,
        index: int,
        scenario_asset_id: str,
        mime_type: str | None,
        width: int | None,
        height: int | None,
        source_host: str | None,
        uri: str,
        key: str,
        sha256: str,
        size: int,
        content_type: str,
        public_url: str | None,
    ) -> None:
        """Record one stored output and what is known of its Scenario asset (idempotent)."""
        with self._tx() as s:
            node = s.get(NodeRow, node_id)
            assert node is not None
            asset = s.execute(
                select(AssetRow).where(AssetRow.scenario_asset_id == scenario_asset_id)
            ).scalar_one_or_none()
            if asset is None:
                asset = AssetRow(scenario_asset_id=scenario_asset_id, role=AssetRole.OUTPUT)
                s.add(asset)
            asset.mime_type = mime_type or asset.mime_type
            asset.width = width or asset.width
            asset.height = height or asset.height
            asset.source_host = source_host or asset.source_host
            s.flush()
            existing = s.execute(
                select(ObjectRow.id).where(
                    ObjectRow.node_id == node_id, ObjectRow.output_index == index
                )
            ).scalar_one_or_none()
            if existing is not None:
                return
            s.add(
                ObjectRow(
                    item_id=node.item_id,
                    node_id=node_id,
                    asset_id=asset.id,
                    output_index=index,
                    final=node.final,
                    uri=uri,
                    key=key,
                    sha256=sha256,
                    bytes=size,
                    content_type=content_type,
                    public_url=public_url,
                    created_at=self.now(),
                )
            )


def _facts(node: NodeRow) -> Facts:
    return Facts(
        state=node.state,
        attempts=node.attempts,
        max_attempts=node.max_attempts,
        tries=node.tries,
        stores_outputs=node.output_template is not None,
        error=node.error,
    )


def _values(change: Change) -> dict[str, Any]:
    values: dict[str, Any] = {"state": change.state}
    for name, value in change.values.items():
        column = getattr(NodeRow, name)
        values[name] = column + value.by if isinstance(value, Inc) else value
    return values


def _gathering(now: datetime) -> list[Any]:
    """Collecting nodes no task holds, waiting for company until their due time."""
    return [
        NodeRow.state == NodeState.COLLECTING,
        NodeRow.claimed_until.is_(None),
        NodeRow.due_at > now,
    ]


def _in_pool(pool: str | None) -> list[Any]:
    """Nodes counted against one of the plan's caps (see `pipeline.capacity.pool_of`)."""
    if pool is None:
        return []
    if pool == "custom":
        return [NodeRow.endpoint == "custom"]
    return [NodeRow.endpoint != "custom"]


def _guard_redispatchable(now: datetime) -> list[Any]:
    return [
        or_(
            and_(
                NodeRow.claimed_until.is_(None),
                or_(NodeRow.due_at.is_(None), NodeRow.due_at <= now),
            ),
            NodeRow.claimed_until < now,
        )
    ]


def _guard(change: Change, now: datetime) -> list[Any]:
    if change.guard == Guard.OWNER:
        return [NodeRow.claim_owner == change.owner, NodeRow.claimed_until > now]
    if change.guard == Guard.CLAIMABLE:
        return [
            NodeRow.claimed_until.is_not(None),
            or_(NodeRow.claim_owner.is_(None), NodeRow.claimed_until < now),
        ]
    if change.guard == Guard.REDISPATCHABLE:
        return _guard_redispatchable(now)
    return []


def _refresh_run_status(s: Session, run: RunRow, now: datetime) -> bool:
    """Set a run's status from its items' states; True if it just finished."""
    counts = dict(
        s.execute(
            select(ItemRow.status, func.count())
            .where(ItemRow.run_id == run.id)
            .group_by(ItemRow.status)
        ).all()
    )
    if any(status not in FINAL_ITEM_STATUSES for status in counts):
        return False
    if counts.get(ItemStatus.FAILED):
        status = RunStatus.FAILED
    elif counts.get(ItemStatus.CANCELED):
        status = RunStatus.CANCELED
    else:
        status = RunStatus.SUCCEEDED
    changed = run.status != status or run.finished_at is None
    run.status = status
    run.finished_at = run.finished_at or now
    return changed and status != RunStatus.RUNNING


def _chunks(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


__all__ = [
    "CollectWork",
    "InFlightJob",
    "KeyOwner",
    "NewItem",
    "Repository",
    "StoredOutput",
    "SubmitWork",
    "new_run_id",
]
