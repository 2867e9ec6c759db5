"""The privacy audit (federated/audit/, `fedpatch audit`): measures, attacks that must succeed on
raw-pixel features and must fail under heavy DP noise, releases built through the site's code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from federated.audit.attacks import (
    attribution_attack,
    fit_mlp,
    fit_ridge,
    inversion_scores,
    nearest_scores,
    patch_windows,
)
from federated.audit.measures import auroc, auroc_ci, psnr, ssim, tpr_at_fpr
from federated.audit.releases import FactoryData, Setting, build_release, coreset_indices, default_settings
from federated.config import ExperimentConfig
from patchcore.model import subsample

SIZE, GRID, WINDOW = 64, (8, 8), 8  # 8x8 cells of 8x8 pixels: the windows tile the image


def textures(n: int, seed: int, tint: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """(n, 64, 64, 3) uint8 smooth random textures: a base colour plus a few oriented waves."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = np.empty((n, SIZE, SIZE, 3))
    for k in range(n):
        img = np.ones((SIZE, SIZE, 3)) * rng.uniform(0.3, 0.7, 3)
        for _ in range(5):
            fy, fx = rng.uniform(-6, 6, 2)
            img += rng.uniform(0.03, 0.12, 3) * np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 6.3))[..., None]
        out[k] = np.clip(img + np.asarray(tint), 0, 1)
    return np.round(out * 255).astype(np.uint8)


def pixel_factory(images: np.ndarray, factory_id: int = 0, name: str = "factory-0") -> FactoryData:
    """A factory whose 'embedding' of a grid cell is the raw pixels of its window (192 values,
    x 10: about the spread of real embeddings, well above PaDiM's 0.01 covariance regulariser)."""
    raw = 10 * torch.as_tensor(patch_windows(images, GRID, WINDOW)).reshape(len(images), GRID[0] * GRID[1], -1)
    return FactoryData(factory_id, name, "textures", raw, images, GRID)


def config(**overrides) -> ExperimentConfig:
    return Setting("test", overrides=tuple(overrides.items())).config(ExperimentConfig())


def median_norm(factory: FactoryData) -> float:
    return float(torch.linalg.vector_norm(factory.rows(), dim=1).median())


@pytest.fixture(scope="module")
def data():
    victim = pixel_factory(textures(60, seed=1))
    unseen = pixel_factory(textures(60, seed=2))
    attacker = pixel_factory(textures(30, seed=3))
    return victim, unseen, attacker


# ---- measures ---------------------------------------------------------------------------------

def naive_ssim(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """SSIM of two (H, W, C) images by a direct loop over every wholly-inside window."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for ch in range(a.shape[2]):
        for y in range(a.shape[0] - win + 1):
            for x in range(a.shape[1] - win + 1):
                p, q = a[y:y + win, x:x + win, ch].ravel(), b[y:y + win, x:x + win, ch].ravel()
                vp, vq = p.var(ddof=1), q.var(ddof=1)
                cov = ((p - p.mean()) * (q - q.mean())).sum() / (p.size - 1)
                values.append(((2 * p.mean() * q.mean() + c1) * (2 * cov + c2))
                              / ((p.mean() ** 2 + q.mean() ** 2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_direct_window_loop_and_its_limits():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(3, 16, 12, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ours = ssim(b, a)
    for k in range(3):
        assert ours[k] == pytest.approx(naive_ssim(b[k], a[k]), abs=1e-10)
    assert ssim(a, a) == pytest.approx(np.ones(3))
    assert np.all(ssim(a, b) == pytest.approx(ours))  # symmetric
    worse = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
    assert np.all(ssim(worse, a) < ours)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(a[:, :6, :6], a[:, :6, :6])


def test_ssim_agrees_with_scikit_image_where_installed():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(16, 16, 3)), rng.uniform(size=(16, 16, 3))
    expected = metrics.structural_similarity(a, b, data_range=1.0, channel_axis=-1)
    assert ssim(a[None], b[None])[0] == pytest.approx(expected, abs=1e-8)


def test_psnr_auroc_and_tpr_at_low_fpr():
    true = np.zeros((2, 4, 4, 3))
    assert psnr(true + 0.1, true) == pytest.approx([20.0, 20.0])
    assert psnr(true, true)[0] == 100.0  # capped, not inf
    pos, neg = np.arange(50, 100.0), np.arange(0, 50.0)
    assert auroc(pos, neg) == 1.0 and auroc(neg, pos) == 0.0
    assert tpr_at_fpr(pos, neg) == 1.0
    mixed = np.r_[np.arange(0, 25.0), np.arange(100, 125.0)]  # half the positives above every negative
    assert tpr_at_fpr(mixed, neg) == 0.5
    low, high = auroc_ci(mixed, neg, resamples=200)
    assert low <= auroc(mixed, neg) <= high


def test_patch_windows_tile_the_image_at_the_stride():
    images = textures(2, seed=0)
    windows = patch_windows(images, GRID, WINDOW)  # (2·64, 8, 8, 3)
    assert windows.shape == (128, 8, 8, 3)
    # cell (i, j) of image 1 is pixels [8i, 8i+8) x [8j, 8j+8)
    assert np.array_equal(windows[64 + 3 * 8 + 5], images[1, 24:32, 40:48] / np.float32(255))
    wide = patch_windows(images, GRID, 16, rows=np.array([0, 9]))  # centred on the block, reflected at the edge
    assert np.array_equal(wide[1], images[0, 4:20, 4:20] / np.float32(255))


# ---- attacks on raw pixels: they must succeed; under heavy DP noise they must fail -----------

def inversion(release, victim, attacker, decoder="ridge"):
    x = release.space(attacker.rows()).numpy()
    y = patch_windows(attacker.images, GRID, WINDOW).reshape(len(x), -1)
    if decoder == "ridge":
        model = fit_ridge(x, y, release.noise_sigma, groups=np.repeat(np.arange(attacker.num_images), 64))
    else:
        # the epochs bound it, not the time: deterministic
        model = fit_mlp(x, y, release.noise_sigma, time_limit_s=120.0, max_epochs=12, hidden=128)
    true = release.targets(victim, WINDOW)
    scores = inversion_scores(model(release.vectors).reshape(true.shape), true, y.mean(axis=0).reshape(true.shape[1:]))
    return {k: float(v.mean()) for k, v in scores.items()}


def membership(release, victim, unseen, stat="min"):
    return auroc(release.membership(victim.raw)[stat], release.membership(unseen.raw)[stat])


def test_raw_pixel_upload_is_inverted_and_members_are_found(data):
    victim, unseen, attacker = data
    release = build_release("coreset", config(), victim, "fp16")
    assert release.details["encoding"] == "float16" and release.noise_sigma == 0.0
    assert len(release.vectors) == len(release.rows) == round(0.1 * 60 * 64)
    got = inversion(release, victim, attacker)
    assert got["psnr"] > 40 and got["psnr"] > got["psnr_baseline"] + 20
    assert got["ssim"] > 0.95 > got["ssim_baseline"] + 0.5
    assert membership(release, victim, unseen) > 0.97


def test_mlp_decoder_beats_the_mean_patch(data):
    victim, _, attacker = data
    got = inversion(build_release("coreset", config(), victim, "fp16"), victim, attacker, "mlp")
    assert got["psnr"] > got["psnr_baseline"] + 5


def test_heavy_dp_noise_defeats_inversion_and_membership(data):
    victim, unseen, attacker = data
    release = build_release("coreset", config(**{"model.transform.clip_norm": median_norm(victim),
                                                 "federation.privacy.epsilon": 1.0}), victim, "DP eps=1")
    assert release.noise_sigma > median_norm(victim)  # per coordinate: the vectors are noise
    got = inversion(release, victim, attacker)
    assert abs(got["psnr"] - got["psnr_baseline"]) < 1.0
    assert 0.3 < membership(release, victim, unseen) < 0.7
    assert 0.3 < membership(release, victim, unseen, "mean10") < 0.7


def test_a_projection_below_the_input_size_still_leaks(data):
    victim, unseen, attacker = data
    cfg = config(**{"model.transform.projection_dim": 64})
    release = build_release("coreset", cfg, victim, "projection 64")
    assert release.vectors.shape[1] == 64
    got = inversion(release, victim, attacker)
    assert got["psnr"] > got["psnr_baseline"] + 5
    assert membership(release, victim, unseen) > 0.97


def test_attribution_tells_shifted_factories_apart_and_nothing_else():
    tints = [(0.3, 0, 0), (0, 0.3, 0), (0, 0, 0.3)]  # a colour cast per camera
    shifted = [pixel_factory(textures(20, seed=10 + k, tint=t), k, f"factory-{k}") for k, t in enumerate(tints)]
    alike = [pixel_factory(textures(20, seed=10 + k), k, f"factory-{k}") for k in range(3)]

    def accuracy(factories, **overrides):
        cfg = config(**overrides)
        releases = [build_release("coreset", cfg, f, "x") for f in factories]
        got = attribution_attack([r.vectors for r in releases], [r.rows // 64 for r in releases])
        return got["accuracy"], got["accuracy_by_image"]

    assert min(accuracy(shifted)) > 0.8  # a camera's colour cast carries over to unseen images
    assert max(accuracy(alike)) < 0.55  # chance is 1/3
    noisy = {"model.transform.clip_norm": median_norm(shifted[0]), "federation.privacy.epsilon": 1.0}
    assert max(accuracy(shifted, **noisy)) < 0.55


def test_padim_statistics_leak_their_members_and_mean_image(data):
    victim, unseen, attacker = data
    release = build_release("padim", config(), victim, "PaDiM statistics")
    assert release.vectors.shape == (64, 100) and release.rows is None
    # 60 images < 100 dims: the members span the covariance
    assert membership(release, victim, unseen, "mahalanobis") > 0.97
    got = inversion(release, victim, attacker)
    assert got["psnr"] > got["psnr_baseline"] + 5


def test_dp_padim_per_image_noise_hides_members(data):
    from experiments.app.audit import dp_padim_settings

    victim, unseen, attacker = data
    setting = dp_padim_settings(ExperimentConfig(), attacker.raw, GRID, [1.0])[0]
    release = build_release("dp_padim", config(), victim, setting)
    assert setting.family == "dp_padim" and release.details["epsilon_per_image"] == 1.0
    assert len(release.vectors) == 0  # image-centred: no per-position mean is released
    assert 0.3 < membership(release, victim, unseen, "mahalanobis") < 0.7


# ---- the audit's releases are what the site sends ---------------------------------------------

def test_coreset_indices_are_the_sites_subsample(data):
    victim = data[0]
    cfg = config()
    rows = victim.rows()
    picks = coreset_indices(rows, cfg.model, cfg.seed, cfg.federation.local)
    assert torch.equal(rows[picks], subsample(rows, cfg.model, cfg.seed, cfg.federation.local))


def test_settings_start_neutral_and_name_what_they_change():
    base = ExperimentConfig.model_validate({"model": {"transform": {"clip_norm": 5.0}},
                                            "federation": {"payload_dtype": "int8", "privacy": {"epsilon": 2.0}}})
    settings = {s.name: s for s in default_settings(base, dim=152, clip_norm=3.0, epsilons=(4.0,))}
    assert list(settings) == ["as configured", "fp32", "fp16", "int8", "projection 128", "clip 3",
                              "DP eps=4", "PaDiM statistics"]  # 256 is not below 152
    assert settings["as configured"].config(base).federation.privacy.epsilon == 2.0
    fp16 = settings["fp16"].config(base)
    assert fp16.federation.payload_dtype == "float16" and fp16.model.transform.clip_norm is None
    assert fp16.federation.privacy.epsilon is None
    dp = settings["DP eps=4"].config(base)
    assert dp.model.transform.clip_norm == 3.0 and dp.federation.privacy.epsilon == 4.0
    assert math.isclose(settings["projection 128"].config(base).model.transform.projection_dim, 128)


def test_nearest_scores_rank_exact_copies_first():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 8))
    queries = rng.normal(size=(4, 10, 8))
    queries[1, 3] = bank[7]
    scores = nearest_scores(bank, queries)
    assert scores["min"].argmax() == 1 and scores["min"][1] == pytest.approx(0.0, abs=1e-4)
    assert scores["mean10"].argmax() == 1


# ---- the command, and the site's own payload --------------------------------------------------

TINY = {
    "seed": 0, "device": "cpu",
    "data": {"format": "synthetic", "resize": 64, "crop": 64, "batch_size": 8,
             "synthetic": {"categories": ["stripes", "disc"], "size": 64, "n_train": 12, "n_test_good": 3,
                           "n_test_defect": 2}},
    "model": {"backbone": {"name": "efficientnet_lite0", "layers": ["layer2", "layer3"], "weights": "imagenet"}},
    "federation": {"num_factories": 2, "domain_shift": True},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("audit")
    raw = {**TINY, "output_dir": str(tmp / "results"), "data": {**TINY["data"], "root": str(tmp / "synthetic")}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return tmp, path


def test_the_audited_release_is_what_the_site_sends(tiny):
    from experiments.app.audit import Embedder
    from federated.plan import plan_factories
    from federated.site import Site
    from patchcore.config import TransformConfig, load_config
    from patchcore.model import PatchCore

    _, path = tiny
    cfg = load_config(path, ExperimentConfig, {"model.transform.clip_norm": 40.0, "federation.privacy.epsilon": 500.0})
    plan = plan_factories(cfg)
    site = Site(cfg, plan.shards[1], plan.shifts, device="cpu")
    payloads, _ = site.local_payloads()
    raw_model = PatchCore(cfg.model.model_copy(update={"transform": TransformConfig()}), device="cpu", seed=cfg.seed)
    embed = Embedder(raw_model, cfg, plan.shifts, progress=False)
    for category, sent in payloads.items():
        e = embed([r for r in plan.shards[1].train if r.category == category], "x")
        factory = FactoryData(1, plan.shards[1].name, category, e.raw, e.images, e.grid)
        release = build_release("coreset", cfg, factory, "DP")
        assert release.noise_sigma > 0 and release.bytes_sent == sent.nbytes
        assert np.array_equal(release.vectors, sent.decoded())  # the same bytes, noise included


def test_fedpatch_audit_writes_its_run_folder(tiny):
    import json

    from experiments.app.cli import main

    tmp, path = tiny
    out = tmp / "run"
    code = main(["audit", "--config", str(path), "--quiet", "--out", str(out), "--decoder", "ridge",
                 "--attacker", "other-product", "--settings", "fp16", "dp", "padim", "dp_padim", "--epsilons", "1",
                 "--image-epsilons", "1"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["kind"] == "audit" and manifest["git"]
    assert {c["category"] for c in manifest["categories"]} == {"stripes", "disc"}
    for name in ("inversion.csv", "membership.csv", "attribution.csv", "releases.csv", "report.md", "config.yaml",
                 "figures/inversion_disc.png", "figures/mosaic_stripes.png"):
        assert (out / name).is_file(), name
    audit = json.loads((out / "audit.json").read_text())
    settings = {r["setting"] for r in audit["releases"]}
    assert settings == {"fp16", "DP eps=1", "PaDiM statistics", "DP-PaDiM eps=1 per image"}
    fp16 = [r for r in audit["membership"] if r["setting"] == "fp16" and r["statistic"] == "min"]
    assert all(r["auroc"] == 1.0 for r in fp16)  # 5 members, each with released patches at distance ~0
    report = (out / "report.md").read_text()
    assert "![inversion_disc](figures/inversion_disc.png)" in report and "| DP eps=1 |" in report


def test_audit_options_match_the_engine_and_bad_input_is_one_line(tiny, capsys):
    from experiments.app import audit
    from experiments.app.cli import build_parser, main

    parser = build_parser()
    action = {a.dest: a for a in parser._subparsers._group_actions[0].choices["audit"]._actions}
    assert tuple(action["attacker"].choices) == audit.ATTACKERS and tuple(action["decoder"].choices) == audit.DECODERS
    tmp, path = tiny
    assert main(["audit", "--config", str(path), "--factory", "5", "--out", str(tmp / "bad")]) == 2
    assert "--factory must be in [0, 1]" in capsys.readouterr().err
    assert main(["audit", "--config", str(path), "--settings", "fp17", "--out", str(tmp / "bad2")]) == 2
    assert "--settings: unknown fp17" in capsys.readouterr().err


def test_every_setting_family_is_selectable():
    from experiments.app.audit import FAMILIES

    found = {s.family for s in default_settings(ExperimentConfig(), dim=1024, clip_norm=1.0)}
    assert found | {"dp_padim"} == set(FAMILIES)  # DP-PaDiM's settings need public images: the command adds them
