"""A tiny randomly initialised image classifier saved offline, whose output is forced (zero weights, one large
bias), for the image/video moderation tests (``tests/test_image_moderation.py``, ``tests/test_filestore.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

LABELS = {0: "safe", 1: "nsfw", 2: "gore"}


def tiny_classifier(folder: Path, forced: str) -> Path:
    """A 1-layer ViT on 32x32 images whose every answer is ``forced`` (probability ~1)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=len(LABELS), id2label=LABELS,
                       label2id={v: k for k, v in LABELS.items()})
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-20.0)
        model.classifier.bias[{v: k for k, v in LABELS.items()}[forced]] = 20.0
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {label: tiny_classifier(root / label, label) for label in LABELS.values()}


def moderation(model: Path) -> dict[str, Any]:
    return {"image_model": str(model), "image_thresholds": {"nsfw": 0.8, "gore": 0.5}, "nsfw_labels": ["nsfw"]}
