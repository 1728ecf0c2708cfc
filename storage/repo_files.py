"""Input images and output videos as rows (the files themselves are written by the scheduler/worker)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import delete, func, insert, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import HeldOutput, InputImage, Job, Output


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
    """The stored videos of these jobs: accepted outputs and held ones (both are kept by the sweep and removed
    with their job)."""
    if not job_ids:
        return []
    ids = list(job_ids)
    stmt = union_all(
        select(Output.path).where(Output.job_id.in_(ids)), select(HeldOutput.path).where(HeldOutput.job_id.in_(ids))
    )
    return list((await session.execute(stmt)).scalars())


async def add_held_output(
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
    labels: str,
    now: dt.datetime,
) -> None:
    await session.execute(
        insert(HeldOutput).values(
            job_id=job_id, path=path, sha256=sha256, bytes=size, duration_s=duration_s, width=width,
            height=height, frames=frames, fps=fps, model_label=model_label, is_demo=is_demo, labels=labels[:256],
            held_at=now,
        )
    )


async def get_held(session: AsyncSession, job_id: int) -> HeldOutput | None:
    return (await session.execute(select(HeldOutput).where(HeldOutput.job_id == job_id))).scalar_one_or_none()


async def take_held(session: AsyncSession, job_id: int) -> HeldOutput | None:
    """Remove the held row of ``job_id`` and return it (None when there is none: released or deleted already).
    The delete decides, so two admins acting at once cannot both have it."""
    row = await get_held(session, job_id)
    if row is None:
        return None
    gone = await session.execute(delete(HeldOutput).where(HeldOutput.id == row.id).returning(HeldOutput.id))
    if gone.scalar_one_or_none() is None:
        return None
    session.expunge(row)
    return row


async def held_job_ids(session: AsyncSession, job_ids: Sequence[int]) -> set[int]:
    """Those of ``job_ids`` whose video is held now."""
    if not job_ids:
        return set()
    stmt = select(HeldOutput.job_id).where(HeldOutput.job_id.in_(list(job_ids)))
    return set((await session.execute(stmt)).scalars())


async def held_before(session: AsyncSession, cutoff: dt.datetime, *, limit: int = 100) -> list[int]:
    """Job ids of videos held since before ``cutoff`` (the retention pass), oldest first."""
    stmt = select(HeldOutput.job_id).where(HeldOutput.held_at < cutoff).order_by(HeldOutput.held_at).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def count_outputs(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count()).select_from(Output))).scalar_one())
