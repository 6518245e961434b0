"""budgets: a run's budget in creative units, what it spent and what is reserved

`budget_cu` is the cap (NULL: none); `spent_cu` the CU billed so far; `reserved_cu` the
priced cost of submissions whose POST is under way; `budget_reached_at` when the first
submission was refused for the budget. Existing runs have no budget and spent nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("budget_cu", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("spent_cu", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("reserved_cu", sa.Float(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("budget_reached_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("budget_reached_at")
        batch_op.drop_column("reserved_cu")
        batch_op.drop_column("spent_cu")
        batch_op.drop_column("budget_cu")
