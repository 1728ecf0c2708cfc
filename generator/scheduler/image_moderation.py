"""Image and video moderation: a local image classifier run on I2V input images and on frames of each output.

Optional: ``[moderation] image_model`` names a folder holding a transformers ``AutoModelForImageClassification``
and its image processor (the operator downloads it; nothing is fetched here, the hub is kept offline).
``image_thresholds`` gives, per label, the probability from which an image is blocked; labels without a
threshold never block. Labels listed in ``nsfw_labels`` are age-restricted: they pass where the community's
policy allows age-restricted content (see ``community.py``), every other label blocks everywhere.

The model is loaded on first use (scheduler process: inputs; each worker: outputs) and kept; classification
is blocking, so callers run it in a thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from generator.media import decode_frames

if TYPE_CHECKING:
    from PIL.Image import Image

    from turbobot.config import Settings

log = logging.getLogger("turbobot.moderation")

BLOCKED_IMAGE_MESSAGE = "This image can't be used here: it was held by the moderation filter."
BLOCKED_OUTPUT_MESSAGE = "This video was held by the moderation filter. A moderator may review it and send it later."
FRAME_SAMPLES = 4


class ImageModerator:
    """A lazily loaded classifier and the thresholds that turn its scores into blocked labels."""

    def __init__(self, model_dir: str | Path, thresholds: dict[str, float], nsfw_labels: Iterable[str] = (),
                 device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.thresholds = {k.lower(): float(v) for k, v in thresholds.items()}
        self.nsfw_labels = frozenset(x.lower() for x in nsfw_labels)
        self.device = device
        self._lock = threading.Lock()
        self._model: Any = None
        self._processor: Any = None
        self._labels: list[str] = []
        self._multi_label = False

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never reach the hub
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            processor = AutoImageProcessor.from_pretrained(str(self.model_dir), local_files_only=True)
            model = AutoModelForImageClassification.from_pretrained(str(self.model_dir), local_files_only=True)
            model.eval().to(self.device)
            id2label = model.config.id2label
            self._labels = [str(id2label[i]).lower() for i in range(len(id2label))]
            self._multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
            unknown = sorted(set(self.thresholds) - set(self._labels))
            if unknown:
                log.warning("moderation.image_thresholds names labels the model %s does not have: %s; it has: %s",
                            self.model_dir, ", ".join(unknown), ", ".join(self._labels))
            log.info("image moderation model %s loaded on %s (labels: %s)", self.model_dir, self.device,
                     ", ".join(self._labels))
            self._processor = processor
            self._model = model

    def scores(self, images: Sequence[Image]) -> dict[str, float]:
        """Each label's highest probability over ``images``."""
        import torch

        self._load()
        batch = self._processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        with torch.inference_mode():
            logits = self._model(pixel_values=batch["pixel_values"].to(self.device)).logits.float()
        probs = logits.sigmoid() if self._multi_label else logits.softmax(dim=-1)
        best = probs.max(dim=0).values.cpu().tolist()
        return dict(zip(self._labels, best, strict=True))

    def blocked(self, images: Sequence[Image], *, age_restricted_ok: bool) -> list[str]:
        """The labels over their threshold that are not allowed here (age-restricted ones pass where
        ``age_restricted_ok``). Empty: the images may be used/delivered."""
        if not images or not self.thresholds:
            return []
        scores = self.scores(images)
        out = []
        for label, threshold in self.thresholds.items():
            if scores.get(label, 0.0) >= threshold and not (age_restricted_ok and label in self.nsfw_labels):
                out.append(label)
        return sorted(out)

    def blocked_file(self, path: str | Path, *, age_restricted_ok: bool) -> list[str]:
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            im.load()
            return self.blocked([im], age_restricted_ok=age_restricted_ok)

    def blocked_video(self, path: str | Path, *, age_restricted_ok: bool, samples: int = FRAME_SAMPLES) -> list[str]:
        return self.blocked(sample_frames(path, samples), age_restricted_ok=age_restricted_ok)


def sample_frames(path: str | Path, samples: int = FRAME_SAMPLES) -> list[Image]:
    """``samples`` evenly spaced frames of a video (first and last included) as PIL images."""
    from PIL import Image as PILImage

    frames = decode_frames(path)
    if len(frames) == 0:
        return []
    idx = sorted({round(float(i)) for i in np.linspace(0, len(frames) - 1, num=max(1, samples))})
    return [PILImage.fromarray(frames[i]) for i in idx]


def image_moderator(settings: Settings, device: str = "cpu") -> ImageModerator | None:
    """The configured moderator, or None when ``[moderation] image_model`` is empty. ``device`` is used
    when ``image_device`` is "worker" (the worker's own GPU); otherwise ``image_device`` decides."""
    mod = settings.moderation
    if not mod.image_model:
        return None
    chosen = device if mod.image_device == "worker" else (mod.image_device or "cpu")
    if chosen in ("", "auto"):
        chosen = "cpu"
    return ImageModerator(settings.path(mod.image_model).resolve(), mod.image_thresholds, mod.nsfw_labels, chosen)
