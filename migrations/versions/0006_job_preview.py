"""The live preview of a running job: where its latest preview animation is stored and how many it has had.

jobs.preview is a file-store reference ("" = none yet), jobs.preview_version counts previews of the current
attempt (front ends edit their status message when it grows). NOT NULL with server defaults, so existing rows
need no backfill.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 21:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('preview', sa.String(length=512), server_default='', nullable=False))
        batch_op.add_column(sa.Column('preview_version', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('preview_version')
        batch_op.drop_column('preview')
