"""Workers record which machine and process they are (host id: boot id and pid namespace, so two
machines with one host name are told apart; the process's start time, so a reused pid is told
apart) and the path of the hardware profile they plan with (the dashboard reads it there).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 15:05:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('host_id', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('process_started_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('profile_path', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('profile_path')
        batch_op.drop_column('process_started_at')
        batch_op.drop_column('host_id')
