"""Initial schema: jobs, shards, checkpoints, result_parts, workers, events, hardware_profiles.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 06:22:41.433411
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('shard_id', sa.Integer(), nullable=True),
    sa.Column('worker_id', sa.String(length=64), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_kind'), ['kind'], unique=False)

    op.create_table('hardware_profiles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('hardware_profiles', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hardware_profiles_hostname'), ['hostname'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'completed', 'failed', 'cancelling', 'cancelled', name='jobstatus', native_enum=False, length=20), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('job_key', sa.String(length=64), nullable=False),
    sa.Column('input_path', sa.Text(), nullable=False),
    sa.Column('input_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('input_size', sa.BigInteger(), nullable=False),
    sa.Column('input_mtime_ns', sa.BigInteger(), nullable=False),
    sa.Column('prompt_column', sa.String(length=200), nullable=False),
    sa.Column('id_column', sa.String(length=200), nullable=True),
    sa.Column('model_dir', sa.Text(), nullable=False),
    sa.Column('model_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('results_dir', sa.Text(), nullable=False),
    sa.Column('shard_rows', sa.Integer(), nullable=False),
    sa.Column('total_rows', sa.BigInteger(), nullable=False),
    sa.Column('done_rows', sa.BigInteger(), nullable=False),
    sa.Column('failed_rows', sa.BigInteger(), nullable=False),
    sa.Column('generated_tokens', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('cancel_requested_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_job_key'), ['job_key'], unique=False)

    op.create_table('workers',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=100), nullable=False),
    sa.Column('status', sa.Enum('running', 'stopped', name='workerstatus', native_enum=False, length=20), nullable=False),
    sa.Column('policy', sa.JSON(), nullable=True),
    sa.Column('current_shard_id', sa.Integer(), nullable=True),
    sa.Column('rows_done', sa.BigInteger(), nullable=False),
    sa.Column('tokens_generated', sa.BigInteger(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('shards',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('shard_index', sa.Integer(), nullable=False),
    sa.Column('row_start', sa.BigInteger(), nullable=False),
    sa.Column('row_end', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'leased', 'done', 'failed', 'cancelled', name='shardstatus', native_enum=False, length=20), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('done_rows', sa.Integer(), nullable=False),
    sa.Column('failed_rows', sa.Integer(), nullable=False),
    sa.Column('engine_failures', sa.Integer(), nullable=False),
    sa.Column('next_try_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.create_index('ix_shards_claim', ['status', 'job_id', 'shard_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_shards_job_id'), ['job_id'], unique=False)

    op.create_table('checkpoints',
    sa.Column('shard_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('rows', sa.JSON(), nullable=False),
    sa.Column('decode_step', sa.Integer(), nullable=False),
    sa.Column('saved_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('shard_id')
    )
    op.create_table('result_parts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('shard_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('num_rows', sa.Integer(), nullable=False),
    sa.Column('failed_rows', sa.Integer(), nullable=False),
    sa.Column('generated_tokens', sa.Integer(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('row_ids', sa.JSON(), nullable=False),
    sa.Column('block_seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('result_parts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_parts_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_result_parts_shard_id'), ['shard_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('result_parts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_parts_shard_id'))
        batch_op.drop_index(batch_op.f('ix_result_parts_job_id'))

    op.drop_table('result_parts')
    op.drop_table('checkpoints')
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_shards_job_id'))
        batch_op.drop_index('ix_shards_claim')

    op.drop_table('shards')
    op.drop_table('workers')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_job_key'))

    op.drop_table('jobs')
    with op.batch_alter_table('hardware_profiles', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hardware_profiles_hostname'))

    op.drop_table('hardware_profiles')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_kind'))
        batch_op.drop_index(batch_op.f('ix_events_job_id'))
        batch_op.drop_index(batch_op.f('ix_events_created_at'))

    op.drop_table('events')
