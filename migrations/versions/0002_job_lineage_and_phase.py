"""Job lineage (remix or retry of its parent) and progress phase (text, sampling, decoding, encoding).

jobs.lineage says how a child came from parent_id; jobs.progress_phase what a running job is doing. Both are
NOT NULL with an empty-string server default, so existing rows need no backfill: older children read as
lineage "" (shown as a remix, as before), and a job running across the upgrade has phase "".

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 09:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lineage', sa.String(length=8), server_default='', nullable=False))
        batch_op.add_column(sa.Column('progress_phase', sa.String(length=16), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('progress_phase')
        batch_op.drop_column('lineage')
