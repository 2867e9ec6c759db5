"""What the server receives, per payload setting: a registry of release builders.

A *setting* names a kind of release and the config keys it changes (payload encoding, shared
projection, clipping, DP noise). A *builder*, registered per kind with `register_release`, turns
one factory's images of one category (`FactoryData`, known to the audit only) into a `Release`:
what the server decodes, plus the audit-only bookkeeping an attack is scored with (which image
row each vector came from). Built-in kinds:

- "coreset": PatchCore's upload, through the code a site runs: the model's feature transform
  (projection, clipping), the local greedy coreset with the site's settings, then
  `federated.site.make_payload` (clip + DP noise seeded as the site seeds it, encoding), packed
  into the train reply's records (`federated.protocol.TrainReply`), unpacked as the server
  unpacks them, validated as the server validates them, decoded to float32. The vectors
  attacked are those bytes.
- "padim": federated PaDiM's upload (federated/padim.py): per-position sums and outer products,
  encoded to bytes and decoded as the server does; the server's Gaussian (means, covariances)
  is what is attacked. Inversion decodes the released per-position means (their target: the
  mean pixel window over the factory's images at that position); membership scores a candidate
  image by its mean Mahalanobis distance under the released Gaussian.

A DP-PaDiM (noisy per-position means and covariances) plugs in the same way: a builder that
returns a Release with `positions` set (means as `vectors`, `noise_sigma` of the means), a
membership function scoring images by Mahalanobis distance under its released Gaussian and an
anomaly function (its detector: the max Mahalanobis distance), registered under its own kind,
and a `Setting` naming that kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from federated.audit.attacks import nearest_scores, patch_distances, patch_windows
from federated.config import ExperimentConfig
from federated.payload import validate
from federated.protocol import TrainReply
from federated.site import make_payload, release_seed
from patchcore.config import ModelConfig, apply_overrides, build, to_dict
from patchcore.coreset import coreset_size, greedy_coreset
from patchcore.errors import ConfigError
from patchcore.model import backbone_id
from patchcore.transform import FeatureTransform


@dataclass
class FactoryData:
    """One factory's training images of one category as the audit knows them; never sent."""

    factory_id: int
    name: str
    category: str
    raw: torch.Tensor  # (N, L, D) float32 embeddings before model.transform
    images: np.ndarray  # (N, H, W, 3) uint8: the model's input pixels (after shift, resize, crop)
    grid: tuple[int, int]
    # audit-side memo of local coreset picks by (transform, coreset settings, seed, ratio): settings
    # that differ only after the coreset (encoding, noise) share one, as a site's memo does
    coresets: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_images(self) -> int:
        return int(self.raw.shape[0])

    @property
    def dim(self) -> int:
        return int(self.raw.shape[2])

    def rows(self) -> torch.Tensor:
        """(N·L, D): the patch rows in the order a site extracts them (image-major)."""
        return self.raw.reshape(-1, self.dim)


Membership = Callable[[torch.Tensor], dict[str, np.ndarray]]  # raw (N, L, D) -> {statistic: (N,)}, higher = member


@dataclass
class Release:
    """What the server holds after one factory's upload of one category, and how to attack it."""

    setting: str
    kind: str
    vectors: np.ndarray  # (n, d) float32 as decoded by the server: what inversion decodes
    space: Callable[[torch.Tensor], torch.Tensor]  # public map of raw (m, D) rows into the release's space
    membership: Membership  # candidate images' raw embeddings -> named per-image membership scores
    anomaly: Callable[[torch.Tensor], np.ndarray]  # raw (N, L, D) -> image anomaly scores (N,): its use
    bytes_sent: int
    noise_sigma: float = 0.0  # per-coordinate Gaussian noise on `vectors`, public (DP manifests)
    rows: np.ndarray | None = None  # (n,) the factory's patch row behind each vector (audit only)
    positions: np.ndarray | None = None  # (n,) grid position of each aggregate vector (means)
    details: dict[str, Any] = field(default_factory=dict)

    def targets(self, factory: FactoryData, window: int) -> np.ndarray:
        """(n, w, w, 3) the true pixels under each vector: its own window, or, for an aggregate
        over images, the mean window at its position."""
        if self.rows is not None:
            return patch_windows(factory.images, factory.grid, window, self.rows)
        if self.positions is None:
            raise ConfigError(f"release {self.setting!r} names neither rows nor positions")
        length = factory.grid[0] * factory.grid[1]
        total = np.zeros((len(self.positions), window, window, 3), np.float64)
        for k in range(factory.num_images):
            total += patch_windows(factory.images[k:k + 1], factory.grid, window, self.positions % length)
        return (total / factory.num_images).astype(np.float32)


Builder = Callable[[ExperimentConfig, FactoryData, "Setting"], Release]
BUILDERS: dict[str, Builder] = {}


def register_release(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: `builder(config, factory, setting) -> Release` for settings of `kind`."""
    def add(builder: Builder) -> Builder:
        BUILDERS[kind] = builder
        return builder
    return add


def build_release(kind: str, config: ExperimentConfig, factory: FactoryData, setting: "Setting | str") -> Release:
    """What the server receives from `factory` under `setting` (a Setting, or just its name)."""
    if kind not in BUILDERS:
        raise ConfigError(f"unknown release kind {kind!r}; registered: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[kind](config, factory, setting if isinstance(setting, Setting) else Setting(setting, kind))


@dataclass(frozen=True)
class Setting:
    """One payload setting: a release kind and the dotted config keys it sets. `neutral`: start
    from the config with no projection, clipping or noise and fp16 payloads, so the setting alone
    decides them; False audits the config exactly as given."""

    name: str
    kind: str = "coreset"
    overrides: tuple[tuple[str, Any], ...] = ()
    neutral: bool = True
    family: str = ""  # what `fedpatch audit --settings` selects it by (default: the name)
    params: tuple[tuple[str, Any], ...] = ()  # the builder's own parameters (e.g. a DP-PaDiM spec)

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.name)

    def config(self, base: ExperimentConfig) -> ExperimentConfig:
        raw = to_dict(base)
        if self.neutral:
            raw["model"]["transform"] = {}
            raw["federation"]["privacy"] = {"delta": base.federation.privacy.delta}
            raw["federation"]["payload_dtype"] = "float16"
        return build(ExperimentConfig, apply_overrides(raw, dict(self.overrides)))


def default_settings(config: ExperimentConfig, dim: int, clip_norm: float,
                     epsilons: tuple[float, ...] = (8.0, 64.0, 512.0, 4096.0),
                     projections: tuple[int, ...] = (256, 128), padim: bool = True) -> list[Setting]:
    """The audited settings: the config as given, fp32 / fp16 / int8, each projection below the
    embedding size `dim`, clipping to `clip_norm` alone, and clip + DP noise at each epsilon;
    PaDiM's statistics last."""
    settings = [Setting("as configured", neutral=False, family="config"),
                Setting("fp32", overrides=(("federation.payload_dtype", "float32"),)),
                Setting("fp16"),
                Setting("int8", overrides=(("federation.payload_dtype", "int8"),))]
    settings += [Setting(f"projection {d}", overrides=(("model.transform.projection_dim", d),
                                                       ("model.transform.projection_seed", config.seed)),
                         family="projection")
                 for d in projections if d < dim]
    clip = (("model.transform.clip_norm", float(clip_norm)),)
    settings.append(Setting(f"clip {clip_norm:.4g}", overrides=clip, family="clip"))
    settings += [Setting(f"DP eps={eps:g}", overrides=clip + (("federation.privacy.epsilon", float(eps)),),
                         family="dp") for eps in epsilons]
    if padim:
        settings.append(Setting("PaDiM statistics", kind="padim", family="padim"))
    return settings


def coreset_indices(features: torch.Tensor, model: ModelConfig, seed: int, ratio: float) -> torch.Tensor:
    """The rows `patchcore.model.subsample(features, model, seed, ratio)` keeps (the site's local
    coreset), as indices; tests/test_audit.py checks both pick the same rows."""
    c = model.coreset
    return greedy_coreset(features, coreset_size(len(features), ratio), method=c.method,
                          projection_dim=c.projection_dim, num_starts=c.num_starts, seed=seed,
                          precision=c.precision, pruning=c.pruning)


def model_transform(config: ExperimentConfig, dim: int) -> FeatureTransform:
    """model.transform on embeddings of `dim` channels (`patchcore.model.feature_transform` when
    `dim` is the backbone's embedding size; any size for pixel features in tests)."""
    t = config.model.transform
    return FeatureTransform(dim, t.projection_dim, t.projection_seed, t.clip_norm)


@register_release("coreset")
def coreset_release(config: ExperimentConfig, factory: FactoryData, setting: Setting) -> Release:
    transform = model_transform(config, factory.dim)
    space = (lambda x: x) if transform.identity else transform
    features = space(factory.rows())  # (N·L, d): what the site's model.extract returns
    key = (transform.tag(), repr(config.model.coreset), config.seed, config.federation.local)
    if key not in factory.coresets:
        factory.coresets[key] = coreset_indices(features, config.model, config.seed, config.federation.local)
    picks = factory.coresets[key]
    feature_id = backbone_id(config.model)
    payload, release_stats = make_payload(
        features[picks], config=config, backbone_id=feature_id, factory_id=factory.factory_id,
        category=factory.category, num_patches=len(features), num_images=factory.num_images,
        privacy=config.privacy_spec())
    records = TrainReply(factory.name, factory.factory_id, {factory.category: payload},
                         factory.num_images, release=release_stats).to_records()
    reply = TrainReply.from_records(records)  # what the server reads from the message
    if reply.problems:
        raise ConfigError(f"{setting.name}: the server could not read the payload: {reply.problems}")
    received = reply.payloads[factory.category]
    validate(received, expected_dim=transform.out_dim, expected_backbone=feature_id)
    vectors = received.decoded()  # (n, d) float32
    spec = config.privacy_spec()

    def queries(emb: torch.Tensor) -> torch.Tensor:
        return space(emb.reshape(-1, emb.shape[-1])).reshape(emb.shape[0], emb.shape[1], -1)

    def membership(emb: torch.Tensor) -> dict[str, np.ndarray]:
        return nearest_scores(vectors, queries(emb))

    def anomaly(emb: torch.Tensor) -> np.ndarray:  # PatchCore's image score with the release as its bank
        return patch_distances(vectors, queries(emb)).max(axis=1)

    return Release(setting=setting.name, kind="coreset", vectors=vectors, space=space, membership=membership,
                   anomaly=anomaly,
                   bytes_sent=received.nbytes, noise_sigma=spec.sigma if spec else 0.0,
                   rows=picks.cpu().numpy(),
                   details={"encoding": received.encoding, "dim": int(vectors.shape[1]),
                            "vectors": int(len(vectors)), "patches": int(len(features)),
                            "feature_id": feature_id, **release_stats})


PADIM_DIMS = 100  # the channels PaDiM keeps (patchcore.padim.DEFAULT_DIMS, the paper's d for ResNet18)


@register_release("padim")
def padim_release(config: ExperimentConfig, factory: FactoryData, setting: Setting) -> Release:
    from federated.padim import decode_stats, encode_stats, site_stats
    from patchcore.padim import mahalanobis, select_dims

    indices = select_dims(factory.dim, PADIM_DIMS, config.seed)
    blob = encode_stats(site_stats(factory.raw, indices))  # the bytes the site sends
    stats = decode_stats(blob, expect_L=factory.raw.shape[1], expect_d=len(indices))
    gaussian = stats.gaussian()  # what the server fits from them
    space = lambda x: x.index_select(-1, indices)  # noqa: E731

    def membership(emb: torch.Tensor) -> dict[str, np.ndarray]:
        return {"mahalanobis": -mahalanobis(gaussian, space(emb)).mean(dim=1).numpy()}

    def anomaly(emb: torch.Tensor) -> np.ndarray:  # PaDiM's image score under the released Gaussian
        return mahalanobis(gaussian, space(emb)).max(dim=1).values.numpy()

    return Release(setting=setting.name, kind="padim", vectors=gaussian.mean.float().numpy(), space=space,
                   membership=membership, anomaly=anomaly, bytes_sent=len(blob),
                   positions=np.arange(stats.positions),
                   details={"encoding": "float64 sums + outer products", "dim": len(indices),
                            "vectors": stats.positions, "patches": int(factory.raw.shape[0] * factory.raw.shape[1]),
                            "images": stats.count})


@register_release("dp_padim")
def dp_padim_release(config: ExperimentConfig, factory: FactoryData, setting: Setting) -> Release:
    """DP-PaDiM (federated/dp_padim.py): the factory's noisy per-image-clipped sums, seeded as a
    site seeds its noise; the server's model from this release alone. `setting.params` holds the
    "spec" (a DpPadimSpec with clip radii measured on public images). With per-image centring
    and one mean block (its default) no per-position mean is released: nothing to invert."""
    from federated.dp_padim import DpPadim, channel_subset, release

    spec = dict(setting.params)["spec"]
    indices = channel_subset(factory.dim, spec)
    generator = torch.Generator().manual_seed(release_seed(config.seed, factory.factory_id, factory.category))
    sent = release(factory.raw, factory.grid, spec, indices, generator)
    model = DpPadim.from_release(sent, spec, indices, factory.grid, sites=1)
    parts = spec.released()
    dim = len(indices)
    nbytes = 8 * (("count" in parts) + (sent.mean.numel() if "mean" in parts else 0)
                  + len(sent.second) * dim * (dim + 1) // 2 + (sent.scale.numel() if sent.scale is not None else 0))
    positions = np.arange(factory.grid[0] * factory.grid[1]) if "mean" in parts else np.arange(0)
    vectors = model.mean.float().numpy()[positions]

    def membership(emb: torch.Tensor) -> dict[str, np.ndarray]:
        return {"mahalanobis": -model.patch_scores(emb).flatten(1).double().mean(dim=1).numpy()}

    def anomaly(emb: torch.Tensor) -> np.ndarray:
        return model.patch_scores(emb).flatten(1).max(dim=1).values.double().numpy()

    sigmas = spec.sigmas()
    return Release(setting=setting.name, kind="dp_padim", vectors=vectors,
                   space=lambda x: x.index_select(-1, indices), membership=membership, anomaly=anomaly,
                   bytes_sent=int(nbytes), noise_sigma=float(sigmas.get("mean", 0.0)), positions=positions,
                   details={"encoding": "float64 noisy sums (" + ", ".join(parts) + ")", "dim": dim,
                            "vectors": len(positions), "images": factory.num_images,
                            "epsilon_per_image": spec.epsilon, "sigmas": sigmas, "clipped": sent.clipped,
                            "noise": "σ " + ", ".join(f"{k} {v:.3g}" for k, v in sigmas.items()) if any(
                                sigmas.values()) else "none"})
