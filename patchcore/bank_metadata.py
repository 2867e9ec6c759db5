"""What a memory bank's metadata holds, assembled in one place.

Besides its features, a bank file (patchcore/memory_bank.py) carries what rebuilds the scorer
around it (`PatchCore.from_bank`: the model config, the seed, the backbone's identity with its
weights checksum) and what a reader needs to trust and use it: the category, how many patches and
training images it summarises, the resize/crop its images went through, whether a federation
built it, and the calibrated decision threshold when there is one. Every writer (a centralized
fit, the federation's server, `PatchCore.set_bank` for anything else) goes through these
functions, so the keys are defined once.
"""

from __future__ import annotations

from typing import Any, MutableMapping

from patchcore.config import ModelConfig, to_dict
from patchcore.threshold import Threshold


def model_metadata(model: ModelConfig, seed: int, backbone_id: str) -> dict[str, Any]:
    """The part `PatchCore.from_bank` needs: model config, seed, backbone identity."""
    return {"model": to_dict(model), "seed": int(seed), "backbone_id": backbone_id}


def bank_metadata(model: ModelConfig, seed: int, backbone_id: str, *, category: str, num_patches: int,
                  num_train_images: int, resize: Any, crop: Any, federated: bool = False) -> dict[str, Any]:
    """The whole record of a fitted bank (centralized or federated)."""
    return {**model_metadata(model, seed, backbone_id), "category": category, "federated": bool(federated),
            "num_patches": int(num_patches), "num_train_images": int(num_train_images),
            "preprocess": {"resize": resize, "crop": crop}}


def set_threshold(metadata: MutableMapping[str, Any], threshold: Threshold,
                  display_range: dict[str, float] | None = None) -> None:
    """Store a calibrated threshold (and the score range heatmaps are drawn in) in the metadata."""
    metadata["threshold"] = threshold.to_dict()
    if display_range is not None:
        metadata["display_range"] = display_range
