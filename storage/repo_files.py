"""Input images and output videos as rows (the files themselves are written by the scheduler/worker)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import InputImage, Job, Output


async def get_input(session: AsyncSession, sha256: str) -> InputImage | None:
    return (await session.execute(select(InputImage).where(InputImage.sha256 == sha256))).scalar_one_or_none()


async def known_input_shas(session: AsyncSession, shas: Sequence[str]) -> set[str]:
    """Which of ``shas`` have an input row (the orphan sweep deletes stored images that have none)."""
    if not shas:
        return set()
    stmt = select(InputImage.sha256).where(InputImage.sha256.in_(list(shas)))
    return set((await session.execute(stmt)).scalars())


async def add_input(
    session: AsyncSession,
    *,
    sha256: str,
    path: str,
    size: int,
    width: int,
    height: int,
    content_type: str = "image/png",
    user_id: int | None = None,
) -> InputImage:
    """Idempotent by content: the same image stored twice is one row."""
    existing = await get_input(session, sha256)
    if existing is not None:
        return existing
    row = InputImage(
        sha256=sha256, path=path, bytes=size, width=width, height=height, content_type=content_type, user_id=user_id
    )
    session.add(row)
    await session.flush()
    return row


async def inputs_only_used_by(session: AsyncSession, user_id: int) -> list[InputImage]:
    """Inputs uploaded by ``user_id`` that no other user's job references (safe to delete on /forget)."""
    others = select(Job.input_id).where(Job.input_id.is_not(None), Job.user_id != user_id)
    stmt = select(InputImage).where(InputImage.user_id == user_id, InputImage.id.not_in(others))
    return list((await session.execute(stmt)).scalars())


async def delete_input(session: AsyncSession, row: InputImage) -> None:
    await session.delete(row)


async def add_output(
    session: AsyncSession,
    *,
    job_id: int,
    path: str,
    sha256: str,
    size: int,
    duration_s: float,
    width: int,
    height: int,
    frames: int,
    fps: int,
    model_label: str,
    is_demo: bool,
    now: dt.datetime,
) -> None:
    # A Core insert: this runs inside every completion, where the ORM unit of work is pure overhead.
    await session.execute(
        insert(Output).values(
            job_id=job_id, path=path, sha256=sha256, bytes=size, duration_s=duration_s, width=width,
            height=height, frames=frames, fps=fps, model_label=model_label, is_demo=is_demo, created_at=now,
        )
    )


async def output_paths_for_jobs(session: AsyncSession, job_ids: Sequence[int]) -> list[str]:
    if not job_ids:
        return []
    stmt = select(Output.path).where(Output.job_id.in_(list(job_ids)))
    return list((await session.execute(stmt)).scalars())


async def count_outputs(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count()).select_from(Output))).scalar_one())
