"""Decoded uint8 frame chunks handed to the CPU (the mp4 encoder) while the GPU keeps decoding; torch only.

Used by both decoders (the full Wan VAE in ``vae.py`` and the tiny one in ``taehv.py``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch


def pipelined_to_host(chunks: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
    """Each uint8 chunk as a numpy array. On CUDA the copy to pinned host memory is asynchronous and a chunk is
    handed out only once the next one is queued, so decoding and encoding overlap."""
    pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
    for u8 in chunks:
        event: torch.cuda.Event | None = None
        host = u8
        if u8.is_cuda:
            host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(u8, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        if pending is not None:
            yield _ready(pending)
        pending = (host, event)
    if pending is not None:
        yield _ready(pending)


def _ready(item: tuple[torch.Tensor, torch.cuda.Event | None]) -> np.ndarray:
    host, event = item
    if event is not None:
        event.synchronize()
    return host.numpy()
