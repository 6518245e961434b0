"""nodes: an item's work becomes a chain of nodes (recipes), one job-status enum

Every existing item becomes an item with one node (its generation, node id = item id) that
carries the item's work fields; jobs and stored objects move from the item to that node.
Nothing recorded is dropped: job states map onto Scenario's statuses (the local `intent`
and `rejected` become a NULL status), and item statuses `submitting`/`collecting` become
`running`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATUSES = (
    "pending", "queued", "warming-up", "in-progress", "finalizing", "success", "failure",
    "canceled",
)
NODE_STATES = ("pending", "submitting", "running", "collecting", "succeeded", "failed", "canceled")
FINAL = ("succeeded", "failed", "canceled")


def _enum(name: str, values: Sequence[str]) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=16)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("branch", sa.Integer(), nullable=False),
        sa.Column("parent_output", sa.Integer(), nullable=True),
        sa.Column("node_key", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("endpoint", sa.String(length=60), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("input_asset", sa.String(length=64), nullable=True),
        sa.Column("expected_outputs", sa.Integer(), nullable=False),
        sa.Column("output_template", sa.Text(), nullable=True),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("state", _enum("node_state", NODE_STATES), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("hint", sa.Text(), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_owner", sa.String(length=64), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reused_from_id", sa.Integer(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_nodes_item_id_items")),
        sa.ForeignKeyConstraint(["parent_id"], ["nodes.id"], name=op.f("fk_nodes_parent_id_nodes")),
        sa.ForeignKeyConstraint(
            ["reused_from_id"], ["nodes.id"], name=op.f("fk_nodes_reused_from_id_nodes")
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_nodes_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
    )
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_nodes_item_id"), ["item_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_nodes_node_key"), ["node_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_nodes_parent_id"), ["parent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_nodes_run_id"), ["run_id"], unique=False)
        batch_op.create_index("ix_nodes_state_due_at", ["state", "due_at"], unique=False)

    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recipe", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("job_type", sa.String(length=60), nullable=True))
        batch_op.add_column(sa.Column("status", _enum("job_status", JOB_STATUSES), nullable=True))
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("objects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("final", sa.Boolean(), nullable=True))

    _move_data()

    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.alter_column("recipe", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_index("ix_items_status_next_attempt")
        for column in (
            "body", "num_outputs", "output_template", "attempts", "max_attempts",
            "dispatches", "next_attempt_at", "lease_owner", "lease_until",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_state_next_poll")
        batch_op.drop_index(batch_op.f("ix_jobs_item_id"))
        batch_op.drop_constraint("uq_jobs_item_id_attempt", type_="unique")
        batch_op.drop_constraint(batch_op.f("fk_jobs_item_id_items"), type_="foreignkey")
        for column in ("item_id", "state", "asset_ids", "next_poll_at", "last_polled_at"):
            batch_op.drop_column(column)
        batch_op.alter_column("node_id", existing_type=sa.Integer(), nullable=False)
        batch_op.create_index(batch_op.f("ix_jobs_node_id"), ["node_id"], unique=False)
        batch_op.create_unique_constraint("uq_jobs_node_id_attempt", ["node_id", "attempt"])
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_node_id_nodes"), "nodes", ["node_id"], ["id"]
        )
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_assets_parent_id"), ["parent_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_assets_parent_id_assets"), "assets", ["parent_id"], ["id"]
        )
    with op.batch_alter_table("objects", schema=None) as batch_op:
        batch_op.alter_column("node_id", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("final", existing_type=sa.Boolean(), nullable=False)
        batch_op.drop_constraint("uq_objects_item_index", type_="unique")
        batch_op.create_unique_constraint("uq_objects_node_index", ["node_id", "output_index"])
        batch_op.create_index(batch_op.f("ix_objects_node_id"), ["node_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_objects_node_id_nodes"), "nodes", ["node_id"], ["id"]
        )


def _move_data() -> None:
    bind = op.get_bind()
    meta = sa.MetaData()
    items = sa.Table("items", meta, autoload_with=bind)
    jobs = sa.Table("jobs", meta, autoload_with=bind)
    nodes = sa.Table("nodes", meta, autoload_with=bind)
    objects = sa.Table("objects", meta, autoload_with=bind)

    outputs: dict[int, object] = {}
    for item_id, asset_ids in bind.execute(
        sa.select(jobs.c.item_id, jobs.c.asset_ids)
        .where(jobs.c.state == "success")
        .order_by(jobs.c.id)
    ):
        outputs[item_id] = asset_ids
    new_nodes = []
    recipes = []
    for row in bind.execute(sa.select(items)).mappings():
        recipes.append(
            {
                "item_id": row["id"],
                "recipe": {
                    "steps": [],
                    "output": row["output_template"],
                    "overwrite": "replace",
                    "max_attempts": row["max_attempts"],
                },
                "status": {"submitting": "running", "collecting": "running"}.get(
                    row["status"], row["status"]
                ),
            }
        )
        if row["status"] == "skipped":
            continue
        state = row["status"] if row["status"] in NODE_STATES else "pending"
        final = state in FINAL
        new_nodes.append(
            {
                "id": row["id"],
                "run_id": row["run_id"],
                "item_id": row["id"],
                "parent_id": None,
                "step": 0,
                "branch": 0,
                "parent_output": None,
                "node_key": row["item_key"],
                "model": row["model"],
                "endpoint": "custom",
                "body": row["body"],
                "input_asset": None,
                "expected_outputs": row["num_outputs"],
                "output_template": row["output_template"],
                "final": True,
                "state": state,
                "attempts": row["attempts"],
                "max_attempts": row["max_attempts"],
                "tries": row["dispatches"],
                "error": row["error"],
                "hint": row["hint"],
                "due_at": None if final else row["updated_at"],
                "claim_owner": None,
                "claimed_until": None,
                "reused_from_id": None,
                "outputs": outputs.get(row["id"]),
                "created_at": row["created_at"],
                "updated_at": row["updated_at"],
                "finished_at": row["finished_at"],
            }
        )
    if new_nodes:
        bind.execute(nodes.insert(), new_nodes)
    for recipe in recipes:
        bind.execute(
            items.update()
            .where(items.c.id == recipe["item_id"])
            .values(recipe=recipe["recipe"], status=recipe["status"])
        )
    bind.execute(
        jobs.update().values(
            node_id=jobs.c.item_id,
            job_type="custom",
            status=sa.case(
                (jobs.c.state.in_(JOB_STATUSES), jobs.c.state),
                else_=sa.null(),
            ),
        )
    )
    bind.execute(objects.update().values(node_id=objects.c.item_id, final=True))
    if bind.dialect.name == "postgresql":
        # Node ids were given explicitly: move the id sequence past them.
        bind.execute(
            sa.text(
                "SELECT setval(pg_get_serial_sequence('nodes', 'id'), "
                "COALESCE((SELECT MAX(id) FROM nodes), 0) + 1, false)"
            )
        )


def downgrade() -> None:
    raise NotImplementedError("0002 reshapes items into nodes; restore a backup to go back")
