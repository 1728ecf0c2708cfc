"""The request lives in one JSON column; the per-parameter copies and the never-set priority column go.

jobs.request already held the whole request; model, resolution, aspect, frames, steps, seed, sla_topk,
sigma_max, sampler, adaptive_resolution, boundary and attention were copies of it that no query reads.
Before dropping them, each row's JSON gets any key it lacks from its copy (rows written before a parameter
reached the JSON), so no value is lost. mode and prompt stay as columns: the console filters and searches
on them. priority was never set (always 0): it leaves the fair-queue index too.

The migration is written against this revision's schema only (no import of storage.models or the parameter
declaration, which change over time). Downgrade puts the columns back, filled from the JSON.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09 09:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, type, nullable, value for a row whose JSON lacks it) of the copies as revision 0002 has them.
_COPIES: tuple[tuple[str, Any, bool, Any], ...] = (
    ('model', sa.String(length=64), False, ''),
    ('resolution', sa.String(length=8), False, '480p'),
    ('aspect', sa.String(length=8), False, '16:9'),
    ('frames', sa.Integer(), False, 81),
    ('steps', sa.Integer(), False, 4),
    ('seed', sa.BigInteger(), False, 0),
    ('sla_topk', sa.Float(), False, 0.1),
    ('sigma_max', sa.Float(), True, None),
    ('sampler', sa.String(length=8), False, 'sde'),
    ('adaptive_resolution', sa.Boolean(), False, False),
    ('boundary', sa.Float(), False, 0.9),
    ('attention', sa.String(length=16), False, 'auto'),
)


def _jobs(*names: str) -> sa.TableClause:
    types = {name: type_ for name, type_, _, _ in _COPIES}
    cols: list[sa.ColumnClause[Any]] = [sa.column('id', sa.Integer()), sa.column('request', sa.JSON()), sa.column('mode', sa.String()),
            sa.column('prompt', sa.Text())]
    return sa.table('jobs', *cols, *(sa.column(n, types[n]) for n in names))


def upgrade() -> None:
    bind = op.get_bind()
    names = [name for name, *_ in _COPIES]
    jobs = _jobs(*names)
    rows = bind.execute(sa.select(jobs.c.id, jobs.c.request, jobs.c.mode, jobs.c.prompt,
                                  *(jobs.c[n] for n in names))).all()
    for row in rows:
        stored = row.request if isinstance(row.request, dict) else {}
        merged = {'mode': row.mode, 'prompt': row.prompt, **{n: getattr(row, n) for n in names}}
        if not merged['model']:
            merged['model'] = None
        merged.update(stored)  # the JSON was the exact request; the copies only fill what it lacks
        if merged != stored:
            bind.execute(sa.update(jobs).where(jobs.c.id == row.id).values(request=merged))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_queue_heads')
        for name in names:
            batch_op.drop_column(name)
        batch_op.drop_column('priority')
        batch_op.create_index('ix_jobs_queue_heads', ['state', 'user_id', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_queue_heads')
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default='0', nullable=False))
        for name, type_, _, _ in _COPIES:
            batch_op.add_column(sa.Column(name, type_, nullable=True))

    bind = op.get_bind()
    names = [name for name, *_ in _COPIES]
    jobs = _jobs(*names)
    for row in bind.execute(sa.select(jobs.c.id, jobs.c.request)).all():
        stored = row.request if isinstance(row.request, dict) else {}
        values = {n: stored.get(n, fallback) for n, _, _, fallback in _COPIES}
        for n, _, nullable, fallback in _COPIES:
            if values[n] is None and not nullable:
                values[n] = fallback  # model/seed None before submission filled them: never stored, but safe
        bind.execute(sa.update(jobs).where(jobs.c.id == row.id).values(**values))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        for name, type_, nullable, _ in _COPIES:
            if not nullable:
                batch_op.alter_column(name, existing_type=type_, nullable=False)
        batch_op.alter_column('priority', existing_type=sa.Integer(), server_default=None)
        batch_op.create_index('ix_jobs_queue_heads', ['state', 'user_id', 'priority', 'created_at'], unique=False)
