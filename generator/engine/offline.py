"""Offline guard: engine code must never reach a model hub (set before diffusers/transformers import)."""

from __future__ import annotations

import os

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE")


def ensure_offline() -> None:
    for name in OFFLINE_VARS:
        os.environ.setdefault(name, "1")
    # No telemetry pings either.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
