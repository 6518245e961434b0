"""initial lineage schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 03:01:31.971267
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    
    op.create_table('cursors',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('value', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_cursors'))
    )
    op.create_table('leases',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('holder', sa.String(length=100), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_leases'))
    )
    op.create_table('manifests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_manifests')),
    sa.UniqueConstraint('name', 'sha256', name='uq_manifests_name_sha256')
    )
    with op.batch_alter_table('manifests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_manifests_sha256'), ['sha256'], unique=False)

    op.create_table('runs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('manifest_id', sa.Integer(), nullable=False),
    sa.Column('trigger', sa.String(length=20), nullable=False),
    sa.Column('status', sa.Enum('running', 'succeeded', 'failed', 'canceled', name='run_status', native_enum=False, length=16), nullable=False),
    sa.Column('force', sa.Boolean(), nullable=False),
    sa.Column('sandbox', sa.Boolean(), nullable=False),
    sa.Column('git_sha', sa.String(length=40), nullable=True),
    sa.Column('api_host', sa.String(length=200), nullable=True),
    sa.Column('storage_url', sa.Text(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['manifest_id'], ['manifests.id'], name=op.f('fk_runs_manifest_id_manifests')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_manifest_id'), ['manifest_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_status'), ['status'], unique=False)

    op.create_table('items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('manifest_item_id', sa.String(length=200), nullable=False),
    sa.Column('line', sa.Integer(), nullable=False),
    sa.Column('item_key', sa.String(length=64), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('trained_model', sa.String(length=200), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.Column('num_outputs', sa.Integer(), nullable=False),
    sa.Column('output_template', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'submitting', 'running', 'collecting', 'succeeded', 'failed', 'canceled', 'skipped', name='item_status', native_enum=False, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('dispatches', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('hint', sa.Text(), nullable=True),
    sa.Column('skipped_from_id', sa.Integer(), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_items_run_id_runs')),
    sa.ForeignKeyConstraint(['skipped_from_id'], ['items.id'], name=op.f('fk_items_skipped_from_id_items')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_items')),
    sa.UniqueConstraint('run_id', 'manifest_item_id', name='uq_items_run_id_item')
    )
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_items_item_key'), ['item_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_items_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_items_status'), ['status'], unique=False)
        batch_op.create_index('ix_items_status_next_attempt', ['status', 'next_attempt_at'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('scenario_job_id', sa.String(length=64), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('state', sa.Enum('intent', 'rejected', 'pending', 'queued', 'warming-up', 'in-progress', 'finalizing', 'success', 'failure', 'canceled', name='job_state', native_enum=False, length=16), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('cost_cu', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('hint', sa.Text(), nullable=True),
    sa.Column('asset_ids', sa.JSON(), nullable=True),
    sa.Column('polls', sa.Integer(), nullable=False),
    sa.Column('intent_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('accepted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('remote_created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('remote_updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_poll_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_polled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_jobs_item_id_items')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('item_id', 'attempt', name='uq_jobs_item_id_attempt'),
    sa.UniqueConstraint('scenario_job_id', name=op.f('uq_jobs_scenario_job_id'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_item_id'), ['item_id'], unique=False)
        batch_op.create_index('ix_jobs_state_next_poll', ['state', 'next_poll_at'], unique=False)

    op.create_table('assets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('scenario_asset_id', sa.String(length=64), nullable=False),
    sa.Column('role', sa.Enum('output', 'input', name='asset_role', native_enum=False, length=16), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('output_index', sa.Integer(), nullable=True),
    sa.Column('content_sha256', sa.String(length=64), nullable=True),
    sa.Column('api_host', sa.String(length=200), nullable=True),
    sa.Column('source_host', sa.String(length=200), nullable=True),
    sa.Column('mime_type', sa.String(length=100), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_assets_job_id_jobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_assets')),
    sa.UniqueConstraint('scenario_asset_id', name=op.f('uq_assets_scenario_asset_id'))
    )
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_assets_content_sha256'), ['content_sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_assets_job_id'), ['job_id'], unique=False)

    op.create_table('item_inputs',
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=40), nullable=False),
    sa.Column('asset_id', sa.Integer(), nullable=True),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['asset_id'], ['assets.id'], name=op.f('fk_item_inputs_asset_id_assets')),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_item_inputs_item_id_items')),
    sa.PrimaryKeyConstraint('item_id', 'role', name=op.f('pk_item_inputs'))
    )
    op.create_table('objects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('asset_id', sa.Integer(), nullable=False),
    sa.Column('output_index', sa.Integer(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('content_type', sa.String(length=100), nullable=False),
    sa.Column('public_url', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['asset_id'], ['assets.id'], name=op.f('fk_objects_asset_id_assets')),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_objects_item_id_items')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_objects')),
    sa.UniqueConstraint('item_id', 'output_index', name='uq_objects_item_index')
    )
    with op.batch_alter_table('objects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_objects_asset_id'), ['asset_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_objects_item_id'), ['item_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_objects_key'), ['key'], unique=False)
        batch_op.create_index(batch_op.f('ix_objects_sha256'), ['sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_objects_uri'), ['uri'], unique=False)




def downgrade() -> None:
    
    with op.batch_alter_table('objects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_objects_uri'))
        batch_op.drop_index(batch_op.f('ix_objects_sha256'))
        batch_op.drop_index(batch_op.f('ix_objects_key'))
        batch_op.drop_index(batch_op.f('ix_objects_item_id'))
        batch_op.drop_index(batch_op.f('ix_objects_asset_id'))

    op.drop_table('objects')
    op.drop_table('item_inputs')
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_assets_job_id'))
        batch_op.drop_index(batch_op.f('ix_assets_content_sha256'))

    op.drop_table('assets')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_next_poll')
        batch_op.drop_index(batch_op.f('ix_jobs_item_id'))

    op.drop_table('jobs')
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_status_next_attempt')
        batch_op.drop_index(batch_op.f('ix_items_status'))
        batch_op.drop_index(batch_op.f('ix_items_run_id'))
        batch_op.drop_index(batch_op.f('ix_items_item_key'))

    op.drop_table('items')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_status'))
        batch_op.drop_index(batch_op.f('ix_runs_manifest_id'))
        batch_op.drop_index(batch_op.f('ix_runs_created_at'))

    op.drop_table('runs')
    with op.batch_alter_table('manifests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_manifests_sha256'))

    op.drop_table('manifests')
    op.drop_table('leases')
    op.drop_table('cursors')

