"""Prompts and result parts live in the database: a shard's input rows are copied at enqueue
(`shard_inputs`) and each part's Parquet bytes are written with its registration (`part_data`),
so that workers on different machines share nothing but the store; checkpoints carry a checksum.
Jobs enqueued before keep reading their input file and part files (`jobs.inputs_in_store` false).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 18:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inputs_in_store', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))
    op.create_table(
        'shard_inputs',
        sa.Column('shard_id', sa.Integer(), sa.ForeignKey('shards.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
    )
    op.create_table(
        'part_data',
        sa.Column('part_id', sa.Integer(), sa.ForeignKey('result_parts.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('data', sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('part_data')
    op.drop_table('shard_inputs')
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('sha256')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('inputs_in_store')
