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

import functools
import random
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline import nodes
from pipeline.db import insert_many, make_sessionmaker, serialized, translate_errors
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
    UTCDateTime,
    utcnow,
)
from pipeline.nodes import Change, Event, Facts, Guard, Inc, NodeState, Policy
from pipeline.scenario import Job, JobStatus

T = TypeVar("T")

ACTIVE_JOB_STATUSES = [s for s in JobStatus if not s.terminal]
# Tables for Core statements: the hot paths read and write columns, not ORM objects (the
# ORM costs more CPU than the database per row), and bulk inserts use executemany.
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
JOBS = cast(Table, JobRow.__table__)
ASSETS = cast(Table, AssetRow.__table__)
OBJECTS = cast(Table, ObjectRow.__table__)
RUNS = cast(Table, RunRow.__table__)
MANIFESTS = cast(Table, ManifestRow.__table__)
LEASES = cast(Table, LeaseRow.__table__)
CURSORS = cast(Table, CursorRow.__table__)
CHUNK = 1000  # ids per IN (...) list, well below every driver's limit on parameters


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

    @property
    def needs_intent(self) -> bool:
        """No intent of an earlier try is open, and a try is left: one is written first."""
        return self.open_intent_id is None and self.attempts < self.max_attempts


@dataclass
class Handout:
    """Nodes handed out to be submitted, per pool; when they were claimed as they were
    handed out (few enough for one batch), what their POSTs need and their intents, written
    in the same transaction."""

    handed: dict[str, list[int]]
    owner: str | None = None  # their claims' owner; None: not claimed (tasks claim them)
    works: list[SubmitWork] = field(default_factory=list)
    intents: dict[int, int] = field(default_factory=dict)  # node id -> its job row id

    @property
    def nodes(self) -> list[int]:
        return [node_id for ids in self.handed.values() for node_id in ids]


@dataclass
class ReadAhead:
    """Pending nodes a refill would hand out, read before their slots are free: (node id,
    item id) per pool, oldest due first; what each one's POST needs; when it was read (the
    database's clock)."""

    found: dict[str, list[tuple[int, int]]]
    works: dict[int, SubmitWork]
    read_at: datetime

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.found.values())


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
    endpoint: str = "custom"  # where it was POSTed: which parallel-jobs cap it holds


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
class NewObject:
    """A stored output to record, with what is known of its Scenario asset."""

    node_id: int
    index: int
    scenario_asset_id: str
    mime_type: str | None
    width: int | None
    height: int | None
    source_host: str | None
    uri: str
    key: str
    sha256: str
    size: int
    content_type: str
    public_url: str | None


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


# -- statements of the hot paths --------------------------------------------------------------
# Built once, with bound parameters: building a statement and hashing it for the compiled
# cache costs more CPU than the database spends running it. `ids` are expanding IN lists.


def _ids(column: Any) -> Any:
    return column.in_(bindparam("ids", expanding=True))


def _guard(guard: Guard) -> list[Any]:
    """What else the row must satisfy (`nodes.Guard`); binds `now` and `owner`."""
    now = bindparam("now", type_=UTCDateTime)
    if guard == Guard.OWNER:
        return [NODES.c.claim_owner == bindparam("owner"), NODES.c.claimed_until > now]
    if guard == Guard.CLAIMABLE:
        return [
            NODES.c.claimed_until.is_not(None),
            or_(NODES.c.claim_owner.is_(None), NODES.c.claimed_until < now),
        ]
    if guard == Guard.REDISPATCHABLE:
        return [
            or_(
                and_(
                    NODES.c.claimed_until.is_(None),
                    or_(NODES.c.due_at.is_(None), NODES.c.due_at <= now),
                ),
                NODES.c.claimed_until < now,
            )
        ]
    return []


Shape = tuple[tuple[str, int | None], ...]  # the columns a change sets; increments by value


def _shape(values: Mapping[str, Any]) -> Shape:
    return tuple(sorted((k, v.by if isinstance(v, Inc) else None) for k, v in values.items()))


@functools.cache
def _persist_statement(
    from_state: NodeState, to_state: NodeState, guard: Guard, shape: Shape
) -> Any:
    """The conditional UPDATE of a change of this shape: binds `ids`, `now`, `owner` and
    `v_<column>` for every column set to a value."""
    values: dict[str, Any] = {"state": to_state, "updated_at": bindparam("now", type_=UTCDateTime)}
    for name, by in shape:
        values[name] = NODES.c[name] + by if by is not None else bindparam(f"v_{name}")
    return (
        update(NODES)
        .where(_ids(NODES.c.id), NODES.c.state == from_state, *_guard(guard))
        .values(values)
        .returning(NODES.c.id, NODES.c.item_id)
    )


@functools.cache
def _set_nodes_statement(columns: tuple[str, ...]) -> Any:
    """Per-node values of a batch's change (executemany); binds `node` and `v_<column>`."""
    return (
        update(NODES)
        .where(NODES.c.id == bindparam("node"))
        .values({name: bindparam(f"v_{name}") for name in columns})
    )


@functools.cache
def _set_items_statement(columns: tuple[str, ...]) -> Any:
    """Items that get the same values; binds `ids` and `v_<column>`."""
    return update(ITEMS).where(_ids(ITEMS.c.id)).values({c: bindparam(f"v_{c}") for c in columns})


_FACTS = select(
    NODES.c.id,
    NODES.c.state,
    NODES.c.attempts,
    NODES.c.max_attempts,
    NODES.c.tries,
    NODES.c.output_template,
    NODES.c.error,
).where(_ids(NODES.c.id))
_LOCK_ITEMS = (
    select(ITEMS.c.id, ITEMS.c.status)
    .where(_ids(ITEMS.c.id))
    .order_by(ITEMS.c.id)
    .with_for_update()
)
_NODES_OF_ITEMS = (
    select(NODES.c.item_id, NODES.c.state, NODES.c.error, NODES.c.hint)
    .where(_ids(NODES.c.item_id))
    .order_by(NODES.c.id)
)
_SPAWNING = (
    select(NODES.c.id, NODES.c.step, ITEMS.c.recipe)
    .join(ITEMS, ITEMS.c.id == NODES.c.item_id)
    .where(_ids(NODES.c.id))
)
_DUE_FOR_TASKS = select(NODES.c.id).where(
    NODES.c.state == bindparam("state"), *_guard(Guard.REDISPATCHABLE)
)
_IN_FLIGHT = (
    select(
        JOBS.c.id,
        JOBS.c.scenario_job_id,
        JOBS.c.node_id,
        JOBS.c.model,
        JOBS.c.job_type,
        JOBS.c.polls,
        JOBS.c.accepted_at,
        JOBS.c.intent_at,
        JOBS.c.status,
        NODES.c.due_at,
        NODES.c.expected_outputs,
        NODES.c.endpoint,
    )
    .join(NODES, JOBS.c.node_id == NODES.c.id)
    .where(
        JOBS.c.scenario_job_id.is_not(None),
        JOBS.c.status.in_(ACTIVE_JOB_STATUSES),
        NODES.c.state == NodeState.RUNNING,
    )
)
_COUNT_POLLS = update(JOBS).where(_ids(JOBS.c.id)).values(polls=JOBS.c.polls + 1)
_SET_POLL_DUE = (
    update(NODES)
    .where(NODES.c.id == bindparam("node"), NODES.c.state == NodeState.RUNNING)
    .values(due_at=bindparam("v_due"), updated_at=bindparam("now", type_=UTCDateTime))
)
_JOB_STATES = select(JOBS.c.id, JOBS.c.node_id, JOBS.c.status, JOBS.c.remote_updated_at).where(
    _ids(JOBS.c.id)
)
_SET_JOBS = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("row"))
    .values(
        status=bindparam("v_status"),
        progress=bindparam("v_progress"),
        remote_updated_at=bindparam("v_updated"),
        cost_cu=func.coalesce(bindparam("v_cost", type_=Float), JOBS.c.cost_cu),
        finished_at=func.coalesce(bindparam("v_finished", type_=UTCDateTime), JOBS.c.finished_at),
        error=func.coalesce(bindparam("v_error", type_=Text), JOBS.c.error),
        hint=func.coalesce(bindparam("v_hint", type_=Text), JOBS.c.hint),
    )
)
_FINISHED_NODES = select(
    NODES.c.id, NODES.c.expected_outputs, NODES.c.output_template, NODES.c.input_asset
).where(_ids(NODES.c.id))
_ASSET_IDS = select(ASSETS.c.scenario_asset_id, ASSETS.c.id).where(_ids(ASSETS.c.scenario_asset_id))
_ADD_ASSETS = insert(ASSETS).returning(
    ASSETS.c.scenario_asset_id, ASSETS.c.id, sort_by_parameter_order=True
)
_SUBMIT_NODES = select(
    NODES.c.id,
    NODES.c.run_id,
    NODES.c.model,
    NODES.c.endpoint,
    NODES.c.body,
    NODES.c.attempts,
    NODES.c.max_attempts,
).where(_ids(NODES.c.id))
_OPEN_INTENTS = (
    select(JOBS.c.id, JOBS.c.node_id, JOBS.c.intent_at)
    .where(_ids(JOBS.c.node_id), JOBS.c.scenario_job_id.is_(None), JOBS.c.finished_at.is_(None))
    .order_by(JOBS.c.id)
)
_COUNT_ATTEMPTS = (
    update(NODES)
    .where(
        _ids(NODES.c.id),
        NODES.c.state == NodeState.SUBMITTING,
        NODES.c.claim_owner == bindparam("owner"),
    )
    .values(attempts=NODES.c.attempts + 1, updated_at=bindparam("now", type_=UTCDateTime))
    .returning(NODES.c.id, NODES.c.model)
)
_LAST_ATTEMPTS = (
    select(JOBS.c.node_id, func.max(JOBS.c.attempt))
    .where(_ids(JOBS.c.node_id))
    .group_by(JOBS.c.node_id)
)
_ADD_INTENTS = insert(JOBS).returning(JOBS.c.node_id, JOBS.c.id, sort_by_parameter_order=True)
_ACCEPT_JOB = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("row"))
    .values(
        scenario_job_id=bindparam("v_job"),
        job_type=bindparam("v_type"),
        status=bindparam("v_status"),
        cost_cu=bindparam("v_cost"),
        accepted_at=bindparam("v_at"),
        remote_created_at=bindparam("v_created"),
    )
)
_JOB_NODES = select(JOBS.c.id, JOBS.c.node_id).where(_ids(JOBS.c.id))
_COLLECT_NODES = (
    select(
        NODES.c.id,
        NODES.c.run_id,
        NODES.c.model,
        NODES.c.step,
        NODES.c.branch,
        NODES.c.expected_outputs,
        NODES.c.final,
        NODES.c.node_key,
        NODES.c.input_asset,
        NODES.c.output_template,
        NODES.c.outputs,
        NODES.c.reused_from_id,
        ITEMS.c.manifest_item_id,
        ITEMS.c.item_key,
        ITEMS.c.seed,
        ITEMS.c.trained_model,
        ITEMS.c.recipe,
        MANIFESTS.c.name.label("manifest_name"),
    )
    .join(ITEMS, NODES.c.item_id == ITEMS.c.id)
    .join(RUNS, ITEMS.c.run_id == RUNS.c.id)
    .join(MANIFESTS, RUNS.c.manifest_id == MANIFESTS.c.id)
    .where(_ids(NODES.c.id))
)
_SUCCESSFUL_JOBS = (
    select(JOBS.c.node_id, JOBS.c.scenario_job_id)
    .where(_ids(JOBS.c.node_id), JOBS.c.status == JobStatus.SUCCESS)
    .order_by(JOBS.c.id)
)
_STORED = select(OBJECTS.c.node_id, OBJECTS.c.output_index, OBJECTS.c.key, OBJECTS.c.sha256).where(
    _ids(OBJECTS.c.node_id)
)
_COPIES = (
    select(ASSETS.c.scenario_asset_id, OBJECTS.c.key, OBJECTS.c.sha256)
    .join(ASSETS, OBJECTS.c.asset_id == ASSETS.c.id)
    .where(_ids(ASSETS.c.scenario_asset_id))
    .order_by(OBJECTS.c.id)
)
_DESCRIBE_ASSETS = (
    update(ASSETS)
    .where(ASSETS.c.id == bindparam("asset"))
    .values(
        mime_type=func.coalesce(bindparam("v_mime", type_=String), ASSETS.c.mime_type),
        width=func.coalesce(bindparam("v_width", type_=Integer), ASSETS.c.width),
        height=func.coalesce(bindparam("v_height", type_=Integer), ASSETS.c.height),
        source_host=func.coalesce(bindparam("v_host", type_=String), ASSETS.c.source_host),
    )
)
_OBJECT_OWNERS = select(NODES.c.id, NODES.c.item_id, NODES.c.final).where(_ids(NODES.c.id))
_TAKE_LEASE = (
    update(LEASES)
    .where(
        LEASES.c.name == bindparam("lease"),
        or_(
            LEASES.c.holder == bindparam("v_holder"),
            LEASES.c.expires_at.is_(None),
            LEASES.c.expires_at < bindparam("now", type_=UTCDateTime),
        ),
    )
    .values(holder=bindparam("v_holder"), expires_at=bindparam("v_until", type_=UTCDateTime))
)
_LEASE_EXISTS = select(LEASES.c.name).where(LEASES.c.name == bindparam("lease"))
_CURSOR = select(CURSORS.c.value).where(CURSORS.c.name == bindparam("cursor"))
_SET_CURSOR = (
    update(CURSORS)
    .where(CURSORS.c.name == bindparam("cursor"))
    .values(value=bindparam("v_value"), updated_at=bindparam("now", type_=UTCDateTime))
)
_OBJECTS_OF = select(OBJECTS.c.node_id, OBJECTS.c.output_index).where(_ids(OBJECTS.c.node_id))


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
        self._serial = serialized(engine)
        self.now = clock
        self.policy = policy or Policy()
        self.rng = rng or random.Random()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._serial, translate_errors(), self._sessions.begin() as session:
            yield session

    @contextmanager
    def _core(self) -> Iterator[Connection]:
        """A transaction on a plain connection, for the hot paths: they read and write
        columns, and an ORM session would cost them more CPU than the database does."""
        with self._serial, translate_errors(), self.engine.begin() as conn:
            yield conn

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
        with self._core() as conn:
            rows = conn.execute(
                select(ITEMS.c.status, func.count())
                .where(ITEMS.c.run_id == run_id)
                .group_by(ITEMS.c.status)
            ).all()
        return {str(status): int(n) for status, n in rows}

    def run_status(self, run_id: str) -> RunStatus | None:
        """A run's status (one column: `--wait` asks it four times a second, in the process
        whose sweeper and POSTs it must not slow down)."""
        with self._core() as conn:
            status = conn.execute(select(RUNS.c.status).where(RUNS.c.id == run_id)).scalar()
        return RunStatus(status) if status is not None else None

    # -- leases and cursors ---------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the named lease; True if `holder` now holds it."""
        now = self.now()
        until = now + timedelta(seconds=ttl)
        params = {"lease": name, "v_holder": holder, "now": now, "v_until": until}
        with self._core() as conn:
            if conn.execute(_TAKE_LEASE, params).rowcount:
                return True
            if conn.execute(_LEASE_EXISTS, params).first() is not None:
                return False
        try:
            with self._core() as conn:
                conn.execute(insert(LEASES).values(name=name, holder=holder, expires_at=until))
            return True
        except IntegrityError:
            return False

    def release_lease(self, name: str, holder: str) -> None:
        with self._core() as conn:
            conn.execute(
                update(LEASES)
                .where(LEASES.c.name == name, LEASES.c.holder == holder)
                .values(holder=None, expires_at=None)
            )

    def get_cursor(self, name: str) -> str | None:
        with self._core() as conn:
            value = conn.execute(_CURSOR, {"cursor": name}).scalar_one_or_none()
        return str(value) if value is not None else None

    def get_cursors(self, names: Sequence[str]) -> dict[str, str]:
        """The named values that are set, in one query."""
        with self._core() as conn:
            rows = conn.execute(
                select(CURSORS.c.name, CURSORS.c.value).where(CURSORS.c.name.in_(list(names)))
            ).all()
        return {str(name): str(value) for name, value in rows if value is not None}

    def set_cursor(self, name: str, value: str) -> None:
        """Set a named value; safe when several threads or workers set it at once."""
        params = {"cursor": name, "v_value": value, "now": self.now()}
        with self._core() as conn:
            if conn.execute(_SET_CURSOR, params).rowcount:
                return
        try:
            with self._core() as conn:
                conn.execute(
                    insert(CURSORS).values(name=name, value=value, updated_at=params["now"])
                )
        except IntegrityError:  # another writer created it first: overwrite theirs
            with self._core() as conn:
                conn.execute(_SET_CURSOR, params)

    # -- node transitions -----------------------------------------------------------------

    def transition(self, node_id: int, event: Event) -> bool:
        """Apply one event to one node; False if it did not apply or another writer won."""
        return node_id in self.transition_many([node_id], event)

    def transition_many(self, node_ids: Iterable[int], event: Event) -> set[int]:
        """Apply one event to each of many nodes, in one transaction; the nodes it moved."""
        with self._core() as conn:
            return set(self._apply(conn, dict.fromkeys(node_ids, event), self.now()))

    def claim(self, node_ids: Sequence[int], owner: str, state: NodeState) -> list[int]:
        """A task takes the nodes it was handed that are still in `state`; those it got."""
        with self._core() as conn:
            return self._move(conn, node_ids, state, nodes.Claim(owner), self.now())

    def renew(self, node_id: int, owner: str, state: NodeState) -> bool:
        """Extend our claim on a node still in `state`; False if it is no longer ours."""
        with self._core() as conn:
            return bool(self._move(conn, [node_id], state, nodes.Renew(owner), self.now()))

    def _apply(
        self, conn: Connection, events: Mapping[int, Event], now: datetime
    ) -> dict[int, NodeState]:
        """Decide and persist one event per node; the new state of each node it moved.

        Nodes whose changes set the same columns from the same state share one conditional
        UPDATE (what differs between them, such as a job's outputs, follows in one
        executemany), so a batch costs a few statements whatever its size; a node another
        writer moved since its facts were read is left out by the UPDATE's guard.
        """
        groups: dict[tuple[Any, ...], list[tuple[int, Change]]] = {}
        for chunk in _chunks(sorted(events), CHUNK):
            for row in conn.execute(_FACTS, {"ids": list(chunk)}):
                facts = Facts(
                    state=row.state,
                    attempts=row.attempts,
                    max_attempts=row.max_attempts,
                    tries=row.tries,
                    stores_outputs=row.output_template is not None,
                    error=row.error,
                )
                change = nodes.decide(facts, events[row.id], now, self.policy, self.rng)
                if change is not None:
                    key = (facts.state, change.state, change.guard, change.owner, change.spawn)
                    groups.setdefault((*key, _shape(change.values)), []).append((row.id, change))
        moved: dict[int, NodeState] = {}
        spawning: list[int] = []
        items: set[int] = set()
        for (state, *_), members in groups.items():
            change = members[0][1]
            for node_id, item_id in self._persist_group(conn, state, members, now):
                moved[node_id] = change.state
                if change.spawn:
                    spawning.append(node_id)
                if change.spawn or nodes.moves_item(state, change.state):
                    items.add(item_id)
        self._spawn_children(conn, spawning, now)
        self._refresh_items(conn, items, now)
        return moved

    def _persist_group(
        self,
        conn: Connection,
        from_state: NodeState,
        members: Sequence[tuple[int, Change]],
        now: datetime,
    ) -> list[tuple[int, int]]:
        """Persist changes that set the same columns: the values they share with the guarded
        UPDATE, then the values each node has of its own, for the nodes it moved."""
        first = members[0][1]
        shared = {
            name: value
            for name, value in first.values.items()
            if all(change.values[name] == value for _, change in members)
        }
        moved = self._persist(
            conn, [n for n, _ in members], from_state, replace(first, values=shared), now
        )
        own = tuple(sorted(set(first.values) - set(shared)))
        if own and moved:
            changes = dict(members)
            conn.execute(
                _set_nodes_statement(own),
                [
                    {"node": node_id} | {f"v_{name}": changes[node_id].values[name] for name in own}
                    for node_id, _ in moved
                ],
            )
        return moved

    def _move(
        self,
        conn: Connection,
        node_ids: Sequence[int],
        state: NodeState,
        event: Event,
        now: datetime,
    ) -> list[int]:
        """Apply an event whose change depends on the state alone (`STATE_ONLY_EVENTS`) to
        nodes in `state`: decided once, persisted with one UPDATE; the nodes it moved."""
        assert isinstance(event, nodes.STATE_ONLY_EVENTS)
        change = nodes.decide(Facts(state), event, now, self.policy, self.rng)
        if change is None or not node_ids:
            return []
        moved = self._persist(conn, node_ids, state, change, now)
        if nodes.moves_item(state, change.state):
            self._refresh_items(conn, {item_id for _, item_id in moved}, now)
        return [node_id for node_id, _ in moved]

    def _persist(
        self,
        conn: Connection,
        node_ids: Sequence[int],
        from_state: NodeState,
        change: Change,
        now: datetime,
    ) -> list[tuple[int, int]]:
        """Conditional UPDATEs: each row must still be as the decision saw it. The (node id,
        item id) of every row changed."""
        statement = _persist_statement(
            from_state, change.state, change.guard, _shape(change.values)
        )
        params: dict[str, Any] = {"now": now}
        if change.guard == Guard.OWNER:
            params["owner"] = change.owner
        for name, value in change.values.items():
            if not isinstance(value, Inc):
                params[f"v_{name}"] = value
        moved: list[tuple[int, int]] = []
        for chunk in _chunks(sorted(node_ids), CHUNK):
            result = conn.execute(statement, params | {"ids": list(chunk)})
            moved += [(node_id, item_id) for node_id, item_id in result]
        return moved

    def _spawn_children(self, conn: Connection, node_ids: Sequence[int], now: datetime) -> None:
        """The recipe's next step on the outputs of nodes that just succeeded (`_spawn`)."""
        for chunk in _chunks(node_ids, CHUNK):
            spawning = [
                node_id
                for node_id, step, recipe in conn.execute(_SPAWNING, {"ids": list(chunk)})
                if step < len(recipe.get("steps", []))  # else the recipe's last step
            ]
            if not spawning:
                continue
            with Session(bind=conn) as s:  # in this transaction (the nodes go in as objects)
                for node_id in spawning:
                    node = s.get(NodeRow, node_id)
                    assert node is not None
                    item = s.get(ItemRow, node.item_id)
                    assert item is not None
                    self._spawn(s, item, node, now)

    def _refresh_item(self, s: Session, item_id: int, now: datetime) -> None:
        """Derive an item's status from its nodes' states."""
        self._refresh_items(s.connection(), [item_id], now)

    def _refresh_items(self, conn: Connection, item_ids: Iterable[int], now: datetime) -> None:
        """Derive items' statuses from their nodes' states, in a few statements.

        The item rows are locked before their nodes are read (on PostgreSQL; SQLite has one
        writer at a time): two transactions finishing sibling nodes at once cannot each see
        the other's node unfinished and leave their item running for good.
        """
        for chunk in _chunks(sorted(set(item_ids)), CHUNK):
            current = conn.execute(_LOCK_ITEMS, {"ids": list(chunk)}).all()
            found: dict[int, list[tuple[NodeState, str | None, str | None]]] = {}
            for item_id, state, error, hint in conn.execute(_NODES_OF_ITEMS, {"ids": list(chunk)}):
                found.setdefault(item_id, []).append((state, error, hint))
            changes: dict[tuple[tuple[str, Any], ...], list[int]] = {}
            for item_id, status in current:
                values = _item_values(status, found.get(item_id, []), now)
                if values:
                    changes.setdefault(tuple(sorted(values.items())), []).append(item_id)
            for columns, ids in changes.items():
                statement = _set_items_statement(tuple(name for name, _ in columns))
                conn.execute(statement, {f"v_{k}": v for k, v in columns} | {"ids": ids})

    def sent_in_pool(self, pool: str) -> int:
        """Running nodes plus those whose POST is out (an intent written, no answer
        recorded yet): what the API may count as ours right now."""
        posting = (
            select(JOBS.c.id)
            .where(
                JOBS.c.node_id == NODES.c.id,
                JOBS.c.scenario_job_id.is_(None),
                JOBS.c.finished_at.is_(None),
            )
            .exists()
        )
        either = or_(
            NODES.c.state == NodeState.RUNNING,
            and_(NODES.c.state == NodeState.SUBMITTING, posting),
        )
        with self._core() as conn:
            query = select(func.count()).select_from(NODES).where(either, *_in_pool(pool))
            return int(conn.execute(query).scalar_one())

    def slots_by_pool(self) -> dict[str, int]:
        """Nodes holding a parallel-job slot, per pool (one query)."""
        pool = case((NODES.c.endpoint == "custom", "custom"), else_="inference")
        with self._core() as s:
            rows = s.execute(
                select(pool, func.count())
                .where(NODES.c.state.in_([NodeState.SUBMITTING, NodeState.RUNNING]))
                .group_by(pool)
            ).all()
        return {str(name): int(count) for name, count in rows}

    def pool_demand(self, pool: str) -> tuple[int, bool]:
        """Nodes of the pool whose job the API accepted and that we have not seen finish,
        and whether pending ones wait for a slot."""
        with self._core() as conn:
            in_use = conn.execute(
                select(func.count())
                .select_from(NODES)
                .where(NODES.c.state == NodeState.RUNNING, *_in_pool(pool))
            ).scalar_one()
            waiting = conn.execute(
                select(NODES.c.id)
                .where(NODES.c.state == NodeState.PENDING, *_in_pool(pool))
                .limit(1)
            ).first()
        return int(in_use), waiting is not None

    def dispatch_pending(
        self, rooms: Mapping[str, int], owner: str | None = None, claim_up_to: int | None = None
    ) -> Handout:
        """Hand up to `rooms[pool]` due pending nodes of each pool to submit tasks, in one
        transaction. With an `owner`, and when they are at most `claim_up_to` (a batch its
        caller sends itself), they are claimed for it as they are handed out, and what their
        POSTs need is read and their intents written in the same transaction: nothing but
        the POSTs is left between a freed slot and its new job."""
        if all(room <= 0 for room in rooms.values()):
            return Handout({pool: [] for pool in rooms})
        now = self.now()
        with self._core() as s:
            found = self._pending(s, rooms, now)
            count = sum(len(rows) for rows in found.values())
            if owner is not None and claim_up_to is not None and count > claim_up_to:
                owner = None
            return self._hand_out(s, found, owner, now)

    def read_ahead(self, rooms: Mapping[str, int]) -> ReadAhead:
        """The due pending nodes a refill of `rooms` would hand out, and what their POSTs
        need, read before the slots are free (`hand_out` writes the rest)."""
        now = self.now()
        with self._core() as s:
            found = self._pending(s, rooms, now)
            ids = [node_id for rows in found.values() for node_id, _ in rows]
            works = {w.node_id: w for w in self._submit_works(s, ids)} if ids else {}
        return ReadAhead(found, works, now)

    def hand_out(self, ahead: ReadAhead, rooms: Mapping[str, int], owner: str) -> Handout:
        """Hand out and claim for `owner` up to `rooms[pool]` of the nodes read ahead, and
        write their intents, in one transaction of writes. A node moved since it was read
        (by anything: its `updated_at` is newer) is left out, as is one no longer pending."""
        found = {pool: rows[: max(0, rooms.get(pool, 0))] for pool, rows in ahead.found.items()}
        if not any(found.values()):
            return Handout({pool: [] for pool in rooms})
        with self._core() as s:
            return self._hand_out(s, found, owner, self.now(), ahead)

    @staticmethod
    def _pending(
        conn: Connection, rooms: Mapping[str, int], now: datetime
    ) -> dict[str, list[tuple[int, int]]]:
        """Up to `rooms[pool]` due pending nodes of each pool, oldest due first: (node id,
        item id) per pool."""
        found: dict[str, list[tuple[int, int]]] = {pool: [] for pool in rooms}
        for pool, room in rooms.items():
            if room <= 0:
                continue
            rows = conn.execute(
                select(NODES.c.id, NODES.c.item_id)
                .where(
                    NODES.c.state == NodeState.PENDING,
                    or_(NODES.c.due_at.is_(None), NODES.c.due_at <= now),
                    *_in_pool(pool),
                )
                .order_by(NODES.c.due_at, NODES.c.id)
                .limit(room)
            ).all()
            found[pool] = [(node_id, item_id) for node_id, item_id in rows]
        return found

    def _hand_out(
        self,
        conn: Connection,
        found: Mapping[str, list[tuple[int, int]]],
        owner: str | None,
        now: datetime,
        ahead: ReadAhead | None = None,
    ) -> Handout:
        """Move the `found` pending nodes to submitting, claimed for `owner` if given, with
        what their POSTs need and their intents; with `ahead`, only those unchanged since
        it was read, and what their POSTs need is its."""
        handout = Handout({pool: [node_id for node_id, _ in rows] for pool, rows in found.items()})
        item_of = {node_id: item_id for rows in found.values() for node_id, item_id in rows}
        if not item_of:
            return handout
        handout.owner = owner
        change = nodes.decide(Facts(NodeState.PENDING), nodes.Dispatch(owner), now, self.policy)
        assert change is not None
        unchanged = [] if ahead is None else [NODES.c.updated_at <= ahead.read_at]
        # Only the nodes this UPDATE moved are handed out (and, with an owner, claimed):
        # one another writer moved since the SELECT (a cancel) is left out.
        moved = set(
            conn.execute(
                update(NODES)
                .where(
                    NODES.c.id.in_(list(item_of)), NODES.c.state == NodeState.PENDING, *unchanged
                )
                .values(**_values(change), updated_at=now)
                .returning(NODES.c.id)
            ).scalars()
        )
        conn.execute(
            update(ITEMS)
            .where(
                ITEMS.c.id.in_({item_of[node_id] for node_id in moved}),
                ITEMS.c.status == ItemStatus.PENDING,
            )
            .values(status=ItemStatus.RUNNING, updated_at=now)
        )
        handout.handed = {
            pool: [n for n in ids if n in moved] for pool, ids in handout.handed.items()
        }
        if owner is not None and moved:
            if ahead is None:
                handout.works = self._submit_works(conn, handout.nodes)
            else:
                handout.works = [ahead.works[n] for n in handout.nodes if n in ahead.works]
            if fresh := [w.node_id for w in handout.works if w.needs_intent]:
                handout.intents = self._record_intents(conn, fresh, owner, now)
        return handout

    def give_back(self, handout: Handout, node_ids: Sequence[int]) -> list[int]:
        """Return nodes of a hand-out that were claimed and given intents but never POSTed
        (their slots did not free after all) to the pending nodes, due now, as if never
        handed out: their intents are deleted, their claims, tries and attempts undone.
        Only nodes still claimed by the hand-out's owner move; the nodes that did."""
        if handout.owner is None or not node_ids:
            return []
        now = self.now()
        with self._core() as conn:
            moved = self._apply(conn, dict.fromkeys(node_ids, nodes.Unsent(handout.owner)), now)
            rows = [handout.intents[n] for n in moved if n in handout.intents]
            if rows:
                conn.execute(
                    delete(JOBS).where(JOBS.c.id.in_(rows), JOBS.c.scenario_job_id.is_(None))
                )
        return sorted(moved)

    def due_for_tasks(self, state: NodeState) -> list[int]:
        """Hand out again submitting/collecting nodes that are due or whose task vanished.

        A node handed out `policy.max_tries` times fails with its last real error.
        """
        now = self.now()
        with self._core() as conn:
            due = conn.execute(_DUE_FOR_TASKS, {"state": state, "now": now}).scalars()
            moved = self._apply(conn, dict.fromkeys(due, nodes.Redispatch()), now)
        return sorted(node_id for node_id, new in moved.items() if new == state)

    def collecting_waiting(self) -> tuple[int, datetime | None]:
        """Finished nodes waiting for company before their collect task is sent, and the
        earliest collect timer of any finished node no task holds (past once one ran out)."""
        now = self.now()
        with self._core() as conn:
            waiting, earliest = conn.execute(
                select(
                    func.coalesce(func.sum(case((NODES.c.due_at > now, 1), else_=0)), 0),
                    func.min(NODES.c.due_at),
                ).where(*_unheld_collecting())
            ).one()
        return int(waiting), earliest

    def pending_waits(self) -> bool:
        """Whether any node waits to be submitted (now or after a backoff)."""
        with self._core() as conn:
            query = select(NODES.c.id).where(NODES.c.state == NodeState.PENDING).limit(1)
            return conn.execute(query).first() is not None

    def collect_now(self, limit: int | None = None) -> None:
        """Make the collecting nodes that wait for company due now: all of them, or the
        `limit` that finished first."""
        now = self.now()
        which = list(_gathering(now))
        if limit is not None:
            first = select(NODES.c.id).where(*which).order_by(NODES.c.due_at, NODES.c.id)
            which = [NODES.c.id.in_(first.limit(limit).scalar_subquery())]
        with self._core() as conn:
            conn.execute(update(NODES).where(*which).values(due_at=now))

    def in_flight_jobs(self) -> list[InFlightJob]:
        """Every submitted job of a running node that has not reached a terminal status."""
        with self._core() as conn:
            rows = conn.execute(_IN_FLIGHT).all()
        return [
            InFlightJob(
                row_id=r.id,
                scenario_job_id=r.scenario_job_id or "",
                node_id=r.node_id,
                model=r.model,
                job_type=r.job_type or "custom",
                polls=r.polls,
                accepted_at=r.accepted_at or r.intent_at,
                due_at=r.due_at,
                expected_outputs=r.expected_outputs,
                status=r.status,
                endpoint=r.endpoint,
            )
            for r in rows
        ]

    def duration_samples(self, model: str, sample: int = 20) -> list[float]:
        """Seconds from creation to success of this model's recent jobs, sorted.

        Measured on Scenario's own timestamps (createdAt to the updatedAt of success), not
        on when we happened to look: a duration inflated by our polling would push the
        next first poll later, and the one after later still.
        """
        with self._core() as s:
            rows = s.execute(
                select(JOBS.c.remote_created_at, JOBS.c.remote_updated_at)
                .where(
                    JOBS.c.model == model,
                    JOBS.c.status == JobStatus.SUCCESS,
                    JOBS.c.remote_created_at.is_not(None),
                    JOBS.c.remote_updated_at.is_not(None),
                )
                .order_by(JOBS.c.id.desc())
                .limit(sample)
            ).all()
        return sorted((f - a).total_seconds() for a, f in rows if a and f)

    def schedule_polls(self, schedule: dict[tuple[int, int], datetime]) -> None:
        """Set the next look at running jobs: {(job row id, node id): when} (a poll counted)."""
        if not schedule:
            return
        with self._core() as conn:
            now = self.now()
            for chunk in _chunks(sorted(row_id for row_id, _ in schedule), CHUNK):
                conn.execute(_COUNT_POLLS, {"ids": list(chunk)})
            conn.execute(
                _SET_POLL_DUE,
                [{"node": node, "v_due": when, "now": now} for (_, node), when in schedule.items()],
            )

    def apply_jobs(
        self, polled: Sequence[tuple[int, Job]], *, collect_now: bool = False
    ) -> dict[int, NodeState]:
        """Record what Scenario says of jobs, given as (job row id, job), in one transaction;
        a terminal status moves the job's node on.

        Returns the new state of the node of each job row whose node moved, by job row id.
        """
        now = self.now()
        jobs = dict(polled)
        with self._core() as conn:
            live: dict[int, tuple[int, datetime | None]] = {}  # row id -> node id, updated
            for chunk in _chunks(sorted(jobs), CHUNK):
                for row_id, node_id, status, updated in conn.execute(
                    _JOB_STATES, {"ids": list(chunk)}
                ):
                    if status is None or not status.terminal:
                        live[row_id] = (node_id, updated)
            if not live:
                return {}
            conn.execute(
                _SET_JOBS,
                [_job_values(row, jobs[row], updated, now) for row, (_, updated) in live.items()],
            )
            finished = {
                node_id: row_id
                for row_id, (node_id, _) in live.items()
                if jobs[row_id].status.terminal
            }
            events = self._job_events(conn, jobs, finished, collect_now)
            moved = self._apply(conn, events, now)
        return {finished[node_id]: state for node_id, state in moved.items()}

    def _job_events(
        self, conn: Connection, jobs: dict[int, Job], finished: dict[int, int], collect_now: bool
    ) -> dict[int, Event]:
        """The event each finished job makes (by node id; `finished` maps node id -> job row
        id), and asset rows for the outputs of the jobs that succeeded."""
        events: dict[int, Event] = {}
        made: list[tuple[int, str | None, tuple[str, ...]]] = []
        for chunk in _chunks(sorted(finished), CHUNK):
            for node_id, expected, template, input_asset in conn.execute(
                _FINISHED_NODES, {"ids": list(chunk)}
            ):
                job = jobs[finished[node_id]]
                if job.status == JobStatus.SUCCESS:
                    ids = tuple(job.asset_ids)
                    if len(ids) > expected and template is not None:
                        events[node_id] = nodes.Fail(
                            f"job {job.id} returned {len(ids)} outputs where {expected} were "
                            "expected; their storage keys would collide"
                        )
                    else:
                        made.append((finished[node_id], input_asset, ids))
                        events[node_id] = nodes.Succeeded(ids, collect_now=collect_now)
                elif job.status == JobStatus.CANCELED:
                    events[node_id] = nodes.JobCanceled(job.error or f"job {job.id} was canceled")
                else:
                    events[node_id] = nodes.JobFailed(job.error or f"job {job.id} failed", job.hint)
        self._record_output_assets(conn, made)
        return events

    def _record_output_assets(
        self, conn: Connection, made: Sequence[tuple[int, str | None, tuple[str, ...]]]
    ) -> None:
        """Asset rows for jobs' outputs, given as (job row id, the asset the job ran on,
        output asset ids); each is linked to the asset it was made from."""
        parents = _asset_rows(conn, {parent for _, parent, _ in made if parent})
        existing = _asset_rows(conn, {a for _, _, ids in made for a in ids})
        rows = []
        for job_id, parent, ids in made:
            for index, asset_id in enumerate(ids):
                if asset_id not in existing:
                    existing[asset_id] = 0  # made below
                    rows.append(
                        {
                            "scenario_asset_id": asset_id,
                            "role": AssetRole.OUTPUT,
                            "job_id": job_id,
                            "output_index": index,
                            "parent_id": parents.get(parent) if parent else None,
                        }
                    )
        if rows:
            conn.execute(_ADD_ASSETS, rows)

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
        with self._core() as s:
            return list(
                s.execute(select(RUNS.c.id).where(RUNS.c.status == RunStatus.RUNNING)).scalars()
            )

    def overdue_runs(self) -> list[str]:
        """Running runs whose deadline has passed."""
        now = self.now()
        with self._core() as s:
            return list(
                s.execute(
                    select(RUNS.c.id).where(
                        RUNS.c.status == RunStatus.RUNNING,
                        RUNS.c.deadline_at.is_not(None),
                        RUNS.c.deadline_at < now,
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
        with self._core() as conn:
            unfinished = (
                conn.execute(
                    select(NODES.c.id).where(
                        NODES.c.run_id == run_id,
                        NODES.c.state.in_(list(nodes.UNFINISHED_STATES)),
                    )
                )
                .scalars()
                .all()
            )
            for chunk in _chunks(unfinished, CHUNK):
                jobs = conn.execute(
                    select(JOBS.c.id, JOBS.c.scenario_job_id).where(
                        JOBS.c.node_id.in_(chunk),
                        JOBS.c.scenario_job_id.is_not(None),
                        JOBS.c.status.in_(ACTIVE_JOB_STATUSES),
                    )
                ).all()
                if jobs:
                    conn.execute(
                        update(JOBS)
                        .where(JOBS.c.id.in_([row_id for row_id, _ in jobs]))
                        .values(status=JobStatus.CANCELED, finished_at=now)
                    )
                    remote += [job_id or "" for _, job_id in jobs]
            self._apply(conn, dict.fromkeys(unfinished, event), now)
            # An item whose nodes were never created (or all finished) is settled here.
            still_open = [ITEMS.c.run_id == run_id, ITEMS.c.status.not_in(FINAL_ITEM_STATUSES)]
            open_items = conn.execute(select(ITEMS.c.id).where(*still_open)).scalars().all()
            self._refresh_items(conn, open_items, now)
            failed = isinstance(event, nodes.Fail)
            conn.execute(
                update(ITEMS)
                .where(*still_open)
                .values(
                    status=ItemStatus.FAILED if failed else ItemStatus.CANCELED,
                    error=event.reason,
                    finished_at=now,
                    updated_at=now,
                )
            )
        return remote

    # -- submit ---------------------------------------------------------------------------

    def next_due(self) -> dict[NodeState, datetime]:
        """The earliest timer per state the sweeper acts on (pending, running, collecting)."""
        with self._core() as s:
            rows = s.execute(
                select(NODES.c.state, func.min(NODES.c.due_at))
                .where(
                    NODES.c.state.in_([NodeState.PENDING, NodeState.RUNNING, NodeState.COLLECTING]),
                    NODES.c.claimed_until.is_(None),
                    NODES.c.due_at.is_not(None),
                )
                .group_by(NODES.c.state)
            ).all()
        return {NodeState(state): due for state, due in rows if due is not None}

    def submit_works(self, node_ids: Sequence[int]) -> list[SubmitWork]:
        """What submit tasks need of their nodes, read under their claims, in the order given."""
        with self._core() as conn:
            return self._submit_works(conn, node_ids)

    @staticmethod
    def _submit_works(conn: Connection, node_ids: Sequence[int]) -> list[SubmitWork]:
        found = {row.id: row for row in conn.execute(_SUBMIT_NODES, {"ids": list(node_ids)})}
        intents: dict[int, tuple[int, datetime]] = {}
        for row_id, node_id, intent_at in conn.execute(_OPEN_INTENTS, {"ids": list(found)}):
            intents[node_id] = (row_id, intent_at)  # the newest open intent wins
        works = []
        for node_id in node_ids:
            if node_id not in found:
                continue
            row = found[node_id]
            intent = intents.get(node_id)
            works.append(
                SubmitWork(
                    node_id=node_id,
                    run_id=row.run_id,
                    model=row.model,
                    endpoint=row.endpoint,
                    body=dict(row.body),
                    attempts=row.attempts,
                    max_attempts=row.max_attempts,
                    open_intent_id=intent[0] if intent else None,
                    open_intent_at=intent[1] if intent else None,
                )
            )
        return works

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

    def record_intents(self, node_ids: Sequence[int], owner: str) -> dict[int, int]:
        """Write the intents to submit (before the POSTs) of nodes under our claim, in one
        transaction: node id -> its job row id (a node whose claim we lost is left out)."""
        with self._core() as conn:
            return self._record_intents(conn, node_ids, owner, self.now())

    @staticmethod
    def _record_intents(
        conn: Connection, node_ids: Sequence[int], owner: str, now: datetime
    ) -> dict[int, int]:
        params = {"ids": list(node_ids), "owner": owner, "now": now}
        taken = conn.execute(_COUNT_ATTEMPTS, params).all()
        if not taken:
            return {}
        # Job rows number every POST, refused ones too (a 429 leaves its row behind and
        # does not count as an attempt), so the number is not `attempts`.
        ids = [node_id for node_id, _ in taken]
        numbers = dict(conn.execute(_LAST_ATTEMPTS, {"ids": ids}).all())
        rows = [
            {"node_id": node_id, "attempt": numbers.get(node_id, 0) + 1, "model": model}
            | {"intent_at": now}
            for node_id, model in sorted(taken)
        ]
        return {node_id: row_id for node_id, row_id in conn.execute(_ADD_INTENTS, rows)}

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

    def record_accepted(
        self, accepted: Sequence[tuple[int, Job, float | None, datetime, float]]
    ) -> None:
        """POSTs answered (or reconciliation found their jobs): their nodes are running. Given
        as (job row id, job, CU billed, when it started on our clock, seconds to the first
        poll); one transaction."""
        now = self.now()
        with self._core() as conn:
            node_of = dict(conn.execute(_JOB_NODES, {"ids": [row for row, *_ in accepted]}).all())
            conn.execute(
                _ACCEPT_JOB,
                [
                    {
                        "row": row_id,
                        "v_job": job.id,
                        "v_type": job.job_type or "custom",
                        "v_status": JobStatus.PENDING if job.status.terminal else job.status,
                        "v_cost": cost if cost is not None else job.cost,
                        "v_at": started,
                        "v_created": job.created_at,
                    }
                    for row_id, job, cost, started, _ in accepted
                ],
            )
            events = {node_of[row]: nodes.Accepted(first) for row, *_, first in accepted}
            self._apply(conn, events, now)

    def record_refused(self, row_id: int, event: nodes.Throttled | nodes.Refused) -> None:
        """The POST was refused: nothing was created or billed."""
        now = self.now()
        with self._core() as conn:
            node_id = conn.execute(
                update(JOBS)
                .where(JOBS.c.id == row_id)
                .values(error=event.error, finished_at=now)
                .returning(JOBS.c.node_id)
            ).scalar_one()
            self._apply(conn, {node_id: event}, now)

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

    def collect_works(self, node_ids: Sequence[int]) -> dict[int, CollectWork]:
        """What collect tasks need of their nodes, read under their claims (a node without
        outputs to store is left out)."""
        with self._core() as conn:
            rows = [
                r
                for r in conn.execute(_COLLECT_NODES, {"ids": list(node_ids)})
                if (r.outputs or {}).get("ids") and r.output_template
            ]
            sources = {r.id: r.reused_from_id or r.id for r in rows}
            jobs: dict[int, str | None] = {}
            for node_id, job_id in conn.execute(
                _SUCCESSFUL_JOBS, {"ids": sorted(set(sources.values()))}
            ):
                jobs[node_id] = job_id  # the newest successful job wins
            stored: dict[int, dict[int, tuple[str, str]]] = {}
            for node_id, index, key, sha in conn.execute(_STORED, {"ids": list(sources)}):
                stored.setdefault(node_id, {})[index] = (key, sha)
        return {
            r.id: CollectWork(
                node_id=r.id,
                run_id=r.run_id,
                manifest_name=r.manifest_name,
                manifest_item_id=r.manifest_item_id,
                item_key=r.item_key,
                seed=r.seed,
                model=r.model,
                trained_model=r.trained_model if r.step == 0 else None,
                step=r.step,
                branch=r.branch,
                expected_outputs=r.expected_outputs,
                final=r.final,
                node_key=r.node_key,
                input_asset=r.input_asset,
                output_template=r.output_template,
                overwrite=r.recipe.get("overwrite", "replace") != "never",
                scenario_job_id=jobs.get(sources[r.id]) or "",
                asset_ids=tuple(r.outputs["ids"]),
                stored=stored.get(r.id, {}),
            )
            for r in rows
        }

    def stored_copies(self, scenario_asset_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """For assets stored before: asset id -> {key: sha256 of the newest object there}."""
        copies: dict[str, dict[str, str]] = {}
        with self._core() as conn:
            for chunk in _chunks(sorted(set(scenario_asset_ids)), CHUNK):
                for asset_id, key, sha in conn.execute(_COPIES, {"ids": list(chunk)}):
                    copies.setdefault(asset_id, {})[key] = sha
        return copies

    def record_collected(
        self, objects: Sequence[NewObject], events: Mapping[int, Event]
    ) -> dict[int, NodeState]:
        """One collect task's writes, in one transaction: the outputs it stored, with what
        is known of their Scenario assets (idempotent), then each node's event (`Stored`,
        or why not). The new state of each node an event moved."""
        now = self.now()
        with self._core() as conn:
            if objects:
                self._record_objects(conn, objects, now)
            return self._apply(conn, events, now)

    def _record_objects(
        self, conn: Connection, objects: Sequence[NewObject], now: datetime
    ) -> None:
        described = list({o.scenario_asset_id: o for o in objects}.values())
        assets = _asset_rows(conn, {o.scenario_asset_id for o in described})
        missing = [o for o in described if o.scenario_asset_id not in assets]
        if missing:
            made = conn.execute(
                _ADD_ASSETS,
                [
                    {"scenario_asset_id": o.scenario_asset_id, "role": AssetRole.OUTPUT}
                    for o in missing
                ],
            )
            assets.update({asset_id: row_id for asset_id, row_id in made})
        # What is now known of each asset; what a write knew before is never erased.
        conn.execute(
            _DESCRIBE_ASSETS,
            [
                {
                    "asset": assets[o.scenario_asset_id],
                    "v_mime": o.mime_type or None,
                    "v_width": o.width or None,
                    "v_height": o.height or None,
                    "v_host": o.source_host or None,
                }
                for o in described
            ],
        )
        ids = sorted({o.node_id for o in objects})
        owners = {n: (item, final) for n, item, final in conn.execute(_OBJECT_OWNERS, {"ids": ids})}
        existing = {(n, index) for n, index in conn.execute(_OBJECTS_OF, {"ids": ids})}
        rows = [
            {
                "item_id": owners[o.node_id][0],
                "node_id": o.node_id,
                "asset_id": assets[o.scenario_asset_id],
                "output_index": o.index,
                "final": owners[o.node_id][1],
                "uri": o.uri,
                "key": o.key,
                "sha256": o.sha256,
                "bytes": o.size,
                "content_type": o.content_type,
                "public_url": o.public_url,
                "created_at": now,
            }
            for o in objects
            if (o.node_id, o.index) not in existing
        ]
        if rows:
            conn.execute(insert(OBJECTS), rows)


def _values(change: Change) -> dict[str, Any]:
    values: dict[str, Any] = {"state": change.state}
    for name, value in change.values.items():
        column = NODES.c[name]
        values[name] = column + value.by if isinstance(value, Inc) else value
    return values


def _unheld_collecting() -> list[Any]:
    """Collecting nodes no task holds."""
    return [NODES.c.state == NodeState.COLLECTING, NODES.c.claimed_until.is_(None)]


def _gathering(now: datetime) -> list[Any]:
    """Collecting nodes no task holds, waiting for company until their due time."""
    return [*_unheld_collecting(), NODES.c.due_at > now]


def _item_values(
    status: ItemStatus, nodes_of_item: list[tuple[NodeState, str | None, str | None]], now: datetime
) -> dict[str, Any]:
    """The columns to set on an item whose nodes are these (state, error, hint), in order of
    creation; none when its status stands. A finished item keeps its first node's error."""
    if status == ItemStatus.SKIPPED:
        return {}
    new = ItemStatus(nodes.item_status(state for state, _, _ in nodes_of_item))
    if new == status:
        return {}
    values: dict[str, Any] = {"status": new, "updated_at": now, "finished_at": None}
    if new.final:
        failed = [(e, h) for state, e, h in nodes_of_item if state != NodeState.SUCCEEDED and e]
        error, hint = failed[0] if failed else (None, None)
        values |= {"finished_at": now, "error": error, "hint": hint}
    return values


def _job_values(row_id: int, job: Job, updated: datetime | None, now: datetime) -> dict[str, Any]:
    """The parameters of `apply_jobs`' UPDATE for one job row (a None keeps the column)."""
    failed = job.status.terminal and job.status not in (JobStatus.SUCCESS, JobStatus.CANCELED)
    return {
        "row": row_id,
        "v_status": job.status,
        "v_progress": job.progress,
        "v_updated": job.updated_at or updated,
        "v_cost": job.cost,
        "v_finished": now if job.status.terminal else None,
        "v_error": nodes.cut(job.error) if failed else None,
        "v_hint": nodes.cut(job.hint) if failed else None,
    }


def _in_pool(pool: str | None) -> list[Any]:
    """Nodes counted against one of the plan's caps (see `pipeline.capacity.pool_of`)."""
    if pool is None:
        return []
    if pool == "custom":
        return [NODES.c.endpoint == "custom"]
    return [NODES.c.endpoint != "custom"]


def _asset_rows(conn: Connection, scenario_asset_ids: Iterable[str]) -> dict[str, int]:
    """The row ids of these Scenario assets, where they have one."""
    found: dict[str, int] = {}
    for chunk in _chunks(sorted(set(scenario_asset_ids)), CHUNK):
        found.update(
            {asset_id: row for asset_id, row in conn.execute(_ASSET_IDS, {"ids": list(chunk)})}
        )
    return found


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
    "NewObject",
    "Repository",
    "StoredOutput",
    "SubmitWork",
    "new_run_id",
]
