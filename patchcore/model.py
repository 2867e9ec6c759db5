"""PatchCore: fit a memory bank of coreset patch features, score images by their farthest patch.

`fit(loader)` extracts locally aware patch embeddings of every training image, keeps a greedy
coreset (10% by default) as the memory bank; `predict(loader)` scores each test patch by the
distance to its nearest bank feature (1-NN), takes the image score as the maximum patch score,
and turns the patch-score grid into a pixel map at the input crop's size (bilinear + Gaussian
σ = 4). Everything runs on the configured device; CPU when no GPU is present.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from patchcore.anomaly_map import to_pixel_maps
from patchcore.backbones import FeatureExtractor, default_weighting, layer_channels
from patchcore.bank_metadata import model_metadata
from patchcore.cache import FeatureCache
from patchcore.config import ModelConfig, TransformConfig, build
from patchcore.coreset import coreset_size, greedy_coreset
from patchcore.errors import BankFormatError, ConfigError
from patchcore.extraction import extract_features
from patchcore.features import embed
from patchcore.memory_bank import MemoryBank
from patchcore.progress import track
from patchcore.transform import FeatureTransform


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else must be a valid, present device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here (use device: auto)")
    return device


def layer_weighting(config: ModelConfig) -> str:
    """model.layer_weighting with "auto" resolved for the configured backbone."""
    w = config.layer_weighting
    return default_weighting(config.backbone.name) if w == "auto" else w


def embedding_dim(config: ModelConfig) -> int:
    """D of the patch embeddings before model.transform: target_embed_dim for the paper's
    weighting, the layers' channels summed for "concat" and "balanced"."""
    if layer_weighting(config) == "paper":
        return config.target_embed_dim
    return sum(layer_channels(config.backbone.name, tuple(config.backbone.layers)))


def feature_transform(config: ModelConfig) -> FeatureTransform:
    """The projection/clipping applied after the patch embedding (identity by default)."""
    t = config.transform
    return FeatureTransform(embedding_dim(config), t.projection_dim, t.projection_seed, t.clip_norm)


def backbone_id(config: ModelConfig) -> str:
    """Identifies the feature space: banks and payloads are only comparable within one id
    (backbone, layers, patch size, embedding size, reduced backbone precision, and any projection
    or clipping). float32, the default, adds nothing, so fp32 ids are those of earlier versions."""
    bb = config.backbone
    weighting = layer_weighting(config)
    base = f"{bb.name}:{'+'.join(bb.layers)}:p{config.patch_size}:d{embedding_dim(config)}"
    if weighting != "paper":  # the paper's weighting adds nothing: ids of earlier versions hold
        base += f":{weighting}"
    if config.precision != "float32":  # bf16 moves Lite0 embeddings by ~10%: another space
        base += f":{config.precision}"
    tag = feature_transform(config).tag()
    return f"{base}:{tag}" if tag else base


def raw_backbone_id(config: ModelConfig) -> str:
    """The id of the embeddings before model.transform (clip, projection): the feature cache's."""
    return backbone_id(config.model_copy(update={"transform": TransformConfig()}))


def subsample(features: torch.Tensor, config: ModelConfig, seed: int, ratio: float | None = None,
              progress: bool = False) -> torch.Tensor:
    """The greedy coreset (float32) of `features` (N, D) at `ratio` (default: config.coreset.ratio),
    with every coreset setting of `config`: the one selection `PatchCore.subsample`, the
    federation's sites and the sweeps' centralized references all make."""
    c = config.coreset
    size = coreset_size(len(features), c.ratio if ratio is None else ratio)
    idx = greedy_coreset(features, size, method=c.method, projection_dim=c.projection_dim,
                         num_starts=c.num_starts, seed=seed, precision=c.precision, pruning=c.pruning,
                         progress=progress)
    return features[idx].float()


def patch_scores(bank: MemoryBank, emb: torch.Tensor, grid: tuple[int, int],
                 config: ModelConfig) -> torch.Tensor:
    """Embeddings (B, L, D), already in the bank's feature space -> patch-score grids (B, h, w):
    each patch's distance to `bank` (squared L2 unless config.score_distance says l2)."""
    b, n, d = emb.shape
    dist, _ = bank.nearest(emb.reshape(b * n, d).to(bank.features.device), k=config.num_neighbours)
    patch = dist.mean(dim=1) if config.score_distance == "squared_l2" else dist.sqrt().mean(dim=1)
    return patch.reshape(b, *grid)  # (B, h, w)


def scores_from_patches(patch: torch.Tensor, size: tuple[int, int],
                        config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """patch grid (B, h, w) -> image scores (B,) (max patch) and pixel maps (B, H, W) at `size`."""
    return patch.flatten(1).max(dim=1).values, to_pixel_maps(patch, size, config.smoothing_sigma)


def _images(batch: Any) -> torch.Tensor:
    return batch["image"] if isinstance(batch, dict) else batch


class PatchCore:
    """The method, free of data loading and training-loop glue."""

    def __init__(self, config: ModelConfig, device: str | torch.device = "auto", seed: int = 0):
        self.config = config
        self.seed = seed
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        bb = config.backbone
        self.extractor = FeatureExtractor(bb.name, bb.layers, bb.weights, seed=seed,
                                          precision=config.precision).to(self.device)
        self.transform = feature_transform(config)
        self.weighting = layer_weighting(config)
        self.bank: MemoryBank | None = None
        self.cache: FeatureCache | None = None  # on-disk embeddings (data.cache_dir), used by extract

    @property
    def backbone_id(self) -> str:
        return backbone_id(self.config)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (B, 3, H, W) in [0, 1] -> patch embeddings (B, h·w, D) and the grid (h, w);
        D is target_embed_dim, or the projection's size when model.transform projects."""
        emb, grid = self.embed_raw(images)
        if not self.transform.identity:
            b, n, d = emb.shape
            emb = self.transform(emb.reshape(b * n, d)).reshape(b, n, -1)
        return emb, grid

    @property
    def raw_backbone_id(self) -> str:
        return raw_backbone_id(self.config)

    @torch.inference_mode()
    def embed_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embeddings before model.transform (what the feature cache keeps: one entry
        serves every clip radius and projection)."""
        maps = self.extractor(images.to(self.device, non_blocking=True))
        c = self.config
        return embed(list(maps.values()), c.patch_size, c.pretrain_embed_dim, c.target_embed_dim, self.weighting)

    def extract(self, loader: Iterable[Any], progress: bool = True, desc: str = "extract",
                out: Any = None, cache: FeatureCache | None = None) -> torch.Tensor:
        """All patch embeddings of a loader's images, (N·h·w, D) float32 on the device. `out`: a
        preallocated (N·h·w, D) array (e.g. an np.memmap) filled instead; `cache` (default
        self.cache): per-image on-disk embeddings, so only uncached images reach the backbone."""
        return extract_features(self, loader, progress, desc, out=out, cache=cache or self.cache)

    def subsample(self, features: torch.Tensor, ratio: float | None = None, progress: bool = True) -> torch.Tensor:
        """The greedy coreset of `features` (N, D) at `ratio` (default: the configured one), float32.

        `features` may be a float16 or memory-mapped store (`extract(out=...)`): the projection
        reads it block by block and only the picked rows are gathered."""
        return subsample(features, self.config, self.seed, ratio, progress)

    def fit(self, loader: Iterable[Any], progress: bool = True, metadata: dict[str, Any] | None = None) -> MemoryBank:
        """Extract, subsample, and keep the memory bank."""
        features = self.extract(loader, progress)
        return self.set_bank(self.subsample(features, progress=progress), metadata, num_patches=len(features))

    def set_bank(self, features: torch.Tensor, metadata: dict[str, Any] | None = None, **extra: Any) -> MemoryBank:
        """Install (M, D) features as the bank, with the metadata needed to rebuild the model."""
        meta = {**model_metadata(self.config, self.seed, self.backbone_id), **extra, **(metadata or {})}
        self.bank = MemoryBank(features, meta, nn_backend=self.config.nn_backend, ivfpq=self.config.ivfpq,
                               nn_precision=self.config.nn_precision).to(self.device)
        return self.bank

    @torch.inference_mode()
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> the patch-score grid (B, h, w): each patch's distance to the bank.

        The grid is what the image score and the pixel map are made from; callers that want to
        point at the most anomalous patch (or redraw a map later) keep it instead of the map."""
        if self.bank is None:
            raise ConfigError("the model has no memory bank: fit it or load one first")
        emb, grid = self.embed(images)  # (B, L, D)
        return patch_scores(self.bank, emb, grid, self.config)

    def scores_from_patches(self, patch: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """patch grid (B, h, w) -> image scores (B,) (max patch) and pixel maps (B, H, W) at `size`."""
        return scores_from_patches(patch, size, self.config)

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> image scores (B,) and pixel maps (B, H, W), on the device."""
        return self.scores_from_patches(self.patch_scores(images), tuple(images.shape[-2:]))

    def predict(self, loader: Iterable[Any], progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (N,) and maps (N, H, W), on the CPU, for every image of a loader."""
        scores, maps = [], []
        for batch in track(loader, "score", progress):
            s, m = self.score_batch(_images(batch))
            scores.append(s.cpu())
            maps.append(m.cpu())
        return torch.cat(scores), torch.cat(maps)

    @classmethod
    def from_bank(cls, bank: MemoryBank, config: ModelConfig | None = None,
                  device: str | torch.device = "auto") -> "PatchCore":
        """A ready-to-score model around a bank; the config comes from the bank when not given."""
        if config is None:
            if "model" not in bank.metadata:
                raise BankFormatError("the memory bank carries no model config; pass one explicitly")
            stored = dict(bank.metadata["model"])
            stored.setdefault("layer_weighting", "paper")  # banks from before the key: the paper's
            config = build(ModelConfig, stored, "model")
        model = cls(config, device=device, seed=int(bank.metadata.get("seed", 0)))
        if bank.dim != model.transform.out_dim:
            raise BankFormatError(f"bank features have {bank.dim} dims; the model's embeddings have "
                                  f"{model.transform.out_dim} (model.layer_weighting, model.target_embed_dim, "
                                  "model.transform.projection_dim)")
        model.bank = bank.to(model.device)
        model.bank.set_backend(config.nn_backend, config.ivfpq)
        model.bank.nn_precision = config.nn_precision
        return model
