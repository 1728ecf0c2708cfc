"""Per-community settings (a Discord server, a Telegram group) chosen by that community's admins in chat.

A new table only: nothing to backfill (a community without a row uses the global config).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10 09:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('community_settings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('platform', sa.String(length=16), nullable=False),
    sa.Column('community_id', sa.String(length=64), nullable=False),
    sa.Column('values', sa.JSON(), nullable=False),
    sa.Column('updated_by', sa.String(length=80), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_community_settings')),
    sa.UniqueConstraint('platform', 'community_id', name='platform_community')
    )


def downgrade() -> None:
    op.drop_table('community_settings')
