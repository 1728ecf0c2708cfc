"""Held outputs: a finished video the moderation model held is kept until an admin releases or deletes it.

A new table only: nothing to backfill (videos held before this revision were deleted when they were held).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-14 09:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('held_outputs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=512), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('duration_s', sa.Float(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('fps', sa.Integer(), nullable=False),
    sa.Column('model_label', sa.String(length=128), nullable=False),
    sa.Column('is_demo', sa.Boolean(), nullable=False),
    sa.Column('labels', sa.String(length=256), nullable=False),
    sa.Column('held_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_held_outputs_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_held_outputs')),
    sa.UniqueConstraint('job_id', name=op.f('uq_held_outputs_job_id'))
    )
    with op.batch_alter_table('held_outputs', schema=None) as batch_op:
        batch_op.create_index('ix_held_outputs_held_at', ['held_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('held_outputs', schema=None) as batch_op:
        batch_op.drop_index('ix_held_outputs_held_at')
    op.drop_table('held_outputs')
