"""The lineage schema: SQLAlchemy 2 models. Alembic (migrations/) owns the real schema.

    manifests ─< runs ─< items ─< nodes ─< jobs ─< assets ─< objects
                           │      └─ parent (a recipe step's input is its parent's output)
                           └──< item_inputs >── assets (uploaded inputs)

A node is one Scenario job's worth of work; its states live in `pipeline.nodes`, and the
sweeper schedules by its `due_at` timer. The broker only carries ids: everything needed to
resume lives here.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from pipeline.nodes import NodeState
from pipeline.scenario import JobStatus


def utcnow() -> datetime:
    """Timezone-aware now, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as UTC and always returns aware ones (SQLite drops tzinfo)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class ItemStatus(enum.StrEnum):
    """An item's status, derived from its nodes' states (see `pipeline.nodes.item_status`)."""

    PENDING = "pending"  # no node has been submitted yet
    RUNNING = "running"  # some node is submitting, running or collecting
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"  # identical item_key already stored: nothing submitted

    @property
    def final(self) -> bool:
        return self in FINAL_ITEM_STATUSES


FINAL_ITEM_STATUSES = frozenset(
    {ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELED, ItemStatus.SKIPPED}
)


class AssetRole(enum.StrEnum):
    OUTPUT = "output"
    INPUT = "input"


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint-free VARCHAR: adding a status later
    # must not need an ALTER TYPE on PostgreSQL.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class ManifestRow(Base):
    __tablename__ = "manifests"
    __table_args__ = (UniqueConstraint("name", "sha256", name="uq_manifests_name_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    manifest_id: Mapped[int] = mapped_column(ForeignKey("manifests.id"), index=True)
    trigger: Mapped[str] = mapped_column(String(20))  # run | retry
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"), index=True)
    force: Mapped[bool] = mapped_column(default=False)
    sandbox: Mapped[bool] = mapped_column(default=False)
    git_sha: Mapped[str | None] = mapped_column(String(40))
    api_host: Mapped[str | None] = mapped_column(String(200))
    storage_url: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    deadline_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Budgets (pipeline.budget): the cap, CU billed, CU reserved by POSTs in flight, and
    # when the first submission was refused for the budget (no more are made after it).
    budget_cu: Mapped[float | None] = mapped_column(Float)
    spent_cu: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    reserved_cu: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    budget_reached_at: Mapped[datetime | None] = mapped_column()

    manifest: Mapped[ManifestRow] = relationship()
    items: Mapped[list[ItemRow]] = relationship(back_populates="run", order_by="ItemRow.id")


class ItemRow(Base):
    """One manifest item in one run; its work is a chain (or fan-out tree) of nodes."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("run_id", "manifest_item_id", name="uq_items_run_id_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    manifest_item_id: Mapped[str] = mapped_column(String(200))
    line: Mapped[int] = mapped_column(default=0)
    item_key: Mapped[str] = mapped_column(String(64), index=True)
    prompt: Mapped[str | None] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(200))
    trained_model: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column()
    # The steps after the first (generation) node: [{model, endpoint, params, output, ...}].
    recipe: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[ItemStatus] = mapped_column(_enum(ItemStatus, "item_status"), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    skipped_from_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()

    run: Mapped[RunRow] = relationship(back_populates="items")
    nodes: Mapped[list[NodeRow]] = relationship(back_populates="item", order_by="NodeRow.id")
    objects: Mapped[list[ObjectRow]] = relationship(
        back_populates="item", order_by="ObjectRow.output_index"
    )


class NodeRow(Base):
    """One Scenario job's worth of work: its inputs, its attempts and its outputs.

    The state machine is `pipeline.nodes`; this row is what it persists. Timers (`due_at`)
    and claims (`claim_owner`, `claimed_until`) are separate fields.
    """

    __tablename__ = "nodes"
    __table_args__ = (Index("ix_nodes_state_due_at", "state", "due_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"), index=True)
    step: Mapped[int] = mapped_column(default=0)  # 0: the generation; 1..: the recipe's steps
    branch: Mapped[int] = mapped_column(default=0)  # position among the step's nodes
    parent_output: Mapped[int | None] = mapped_column()  # which output of the parent it takes
    node_key: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(60), default="custom")
    body: Mapped[dict[str, Any]] = mapped_column()  # the request body, input asset included
    input_asset: Mapped[str | None] = mapped_column(String(64))  # the parent's output
    expected_outputs: Mapped[int] = mapped_column(default=1)
    output_template: Mapped[str | None] = mapped_column(Text)  # None: outputs not stored
    final: Mapped[bool] = mapped_column(default=True)  # the recipe's last step
    state: Mapped[NodeState] = mapped_column(_enum(NodeState, "node_state"))
    attempts: Mapped[int] = mapped_column(default=0)  # Scenario jobs submitted
    max_attempts: Mapped[int] = mapped_column(default=2)
    tries: Mapped[int] = mapped_column(default=0)  # tasks handed out (poison guard, backoff)
    error: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    due_at: Mapped[datetime | None] = mapped_column()
    claim_owner: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None] = mapped_column()
    reused_from_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))
    outputs: Mapped[dict[str, Any] | None] = mapped_column()  # {"ids": [asset ids]}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()

    item: Mapped[ItemRow] = relationship(back_populates="nodes")
    jobs: Mapped[list[JobRow]] = relationship(back_populates="node", order_by="JobRow.id")


class JobRow(Base):
    """One submission of a node: the intent first, then Scenario's job."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("node_id", "attempt", name="uq_jobs_node_id_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), index=True)
    attempt: Mapped[int] = mapped_column()
    scenario_job_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    job_type: Mapped[str | None] = mapped_column(String(60))
    model: Mapped[str] = mapped_column(String(200))
    # Scenario's status; None while only the intent exists or when the POST was refused.
    status: Mapped[JobStatus | None] = mapped_column(_enum(JobStatus, "job_status"))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    cost_cu: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    polls: Mapped[int] = mapped_column(default=0)
    intent_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Our clock: when Scenario started the job, as near as we can tell (no later than the
    # POST's answer; see stages.JobStarts).
    accepted_at: Mapped[datetime | None] = mapped_column()
    remote_created_at: Mapped[datetime | None] = mapped_column()
    remote_updated_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    node: Mapped[NodeRow] = relationship(back_populates="jobs")


class AssetRow(Base):
    __tablename__ = "assets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scenario_asset_id: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[AssetRole] = mapped_column(_enum(AssetRole, "asset_role"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    output_index: Mapped[int | None] = mapped_column()
    # The asset this one was made from (a recipe step's input), for the lineage graph.
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("assets.id"), index=True)
    # Inputs are deduplicated by content: the same file is uploaded once per API host.
    content_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    api_host: Mapped[str | None] = mapped_column(String(200))
    source_host: Mapped[str | None] = mapped_column(String(200))  # CDN host, never the signed URL
    mime_type: Mapped[str | None] = mapped_column(String(100))
    width: Mapped[int | None] = mapped_column()
    height: Mapped[int | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ItemInputRow(Base):
    __tablename__ = "item_inputs"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(40), primary_key=True)  # image | referenceImages[0]
    asset_id: Mapped[int | None] = mapped_column(ForeignKey("assets.id"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))


class ObjectRow(Base):
    """One stored file. Rows are never deleted: a replaced key keeps its old versions here."""

    __tablename__ = "objects"
    __table_args__ = (UniqueConstraint("node_id", "output_index", name="uq_objects_node_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), index=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id"), index=True)
    output_index: Mapped[int] = mapped_column()  # the item-wide index used in the key
    final: Mapped[bool] = mapped_column(default=True)  # an output of the recipe's last step
    uri: Mapped[str] = mapped_column(Text, index=True)
    key: Mapped[str] = mapped_column(Text, index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    public_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    item: Mapped[ItemRow] = relationship(back_populates="objects")
    asset: Mapped[AssetRow] = relationship()


class LeaseRow(Base):
    """Named leases: at most one live holder per name (the sweeper's lock)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(100))
    expires_at: Mapped[datetime | None] = mapped_column()


class CursorRow(Base):
    """Small named cursors that survive restarts (the jobs-list watermark)."""

    __tablename__ = "cursors"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
