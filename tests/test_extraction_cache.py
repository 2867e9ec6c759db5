"""Extraction paths: feature cache (hits, misses, corruption), memmap output, reduced precision."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.cache import FeatureCache
from patchcore.config import BackboneConfig, Config, ModelConfig, build
from patchcore.data import ImageDataset, ImageRecord, Preprocess, make_loader
from patchcore.errors import ConfigError
from patchcore.extraction import open_store, rows_per_image
from patchcore.model import PatchCore

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def model() -> PatchCore:
    config = ModelConfig(backbone=BackboneConfig("resnet18", ("layer2", "layer3"), "none"),
                         pretrain_embed_dim=64, target_embed_dim=32)
    return PatchCore(config, device="cpu", seed=0)


@pytest.fixture()
def records(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        path = tmp_path / "img" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
        out.append(ImageRecord(path, "c", 0, "good", "train"))
    return out


def loader(records, resize=32, shifts=None):
    return make_loader(ImageDataset(records, Preprocess(resize=resize, crop=None, **PLAIN), shifts), 2)


class Counter:
    """Counts the images that reach the backbone."""

    def __init__(self, model, monkeypatch):
        self.images = 0
        forward = model.extractor.forward

        def counted(images):
            self.images += len(images)
            return forward(images)

        monkeypatch.setattr(model.extractor, "forward", counted)


def test_second_extraction_hits_the_cache_and_gives_the_same_rows(model, records, tmp_path, monkeypatch):
    counter = Counter(model, monkeypatch)
    plain = model.extract(loader(records), progress=False)
    cache = FeatureCache(tmp_path / "cache")
    first = model.extract(loader(records), progress=False, cache=cache)
    assert counter.images == 10 and cache.stats.misses == 5 and cache.stats.hits == 0
    second = model.extract(loader(records), progress=False, cache=cache)
    assert counter.images == 10, "a cached image went through the backbone again"
    assert cache.stats.hits == 5
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert not list((tmp_path / "cache").rglob("*.tmp")), "temporary files left behind"


def test_partial_hits_keep_record_order(model, records, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    model.extract(loader(records[1:4]), progress=False, cache=cache)
    counter = Counter(model, monkeypatch)
    mixed = model.extract(loader(records), progress=False, cache=cache)
    assert counter.images == 2  # records 0 and 4 only
    # other batch compositions: the same numbers up to float rounding of batched convolutions
    torch.testing.assert_close(mixed, model.extract(loader(records), progress=False), rtol=1e-5, atol=1e-6)


def test_changed_preprocessing_or_shift_misses(model, records, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    model.extract(loader(records, resize=32), progress=False, cache=cache)
    counter = Counter(model, monkeypatch)
    model.extract(loader(records, resize=40), progress=False, cache=cache)
    assert counter.images == 5 and cache.stats.hits == 0

    class Flip:  # a shift with a stable repr, like federated.shift.DomainShift
        def __call__(self, image, mask):
            return image.transpose(Image.FLIP_LEFT_RIGHT), mask

        def __repr__(self):
            return "Flip()"

    shifted = [r.with_domain("f0") for r in records]
    model.extract(loader(shifted, 32, {"f0": Flip()}), progress=False, cache=cache)
    assert counter.images == 10 and cache.stats.hits == 0


def test_same_bytes_elsewhere_hit_and_edited_bytes_miss(model, records, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    model.extract(loader(records[:2]), progress=False, cache=cache)
    copy = tmp_path / "copy.png"
    copy.write_bytes(records[0].path.read_bytes())
    edited = tmp_path / "edited.png"
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(edited)
    counter = Counter(model, monkeypatch)
    model.extract(loader([ImageRecord(copy, "c", 0, "good", "train"),
                          ImageRecord(edited, "c", 0, "good", "train")]), progress=False, cache=cache)
    assert counter.images == 1 and cache.stats.hits == 1


def test_corrupt_entry_is_recomputed_with_a_warning(model, records, tmp_path, monkeypatch, caplog):
    cache = FeatureCache(tmp_path / "cache")
    expected = model.extract(loader(records[:2]), progress=False, cache=cache)
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    counter = Counter(model, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fedpatch.cache"):
        again = model.extract(loader(records[:2]), progress=False, cache=cache)
    assert counter.images == 1 and cache.stats.corrupt == 1
    assert "unreadable" in caplog.text
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-6)  # recomputed alone: batch of 1
    third = FeatureCache(tmp_path / "cache")  # the entry was rewritten
    model.extract(loader(records[:2]), progress=False, cache=third)
    assert third.stats.hits == 2 and counter.images == 1


def test_entries_are_safetensors_not_pickles(model, records, tmp_path):
    from safetensors.torch import load_file

    cache = FeatureCache(tmp_path / "cache")
    model.extract(loader(records[:1]), progress=False, cache=cache)
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    tensors = load_file(str(entry))
    assert set(tensors) == {"features"} and tensors["features"].dtype == torch.float32


def test_extract_into_a_memmap_store(model, records, tmp_path):
    expected = model.extract(loader(records), progress=False)
    dataset = loader(records).dataset
    rows = rows_per_image(model, dataset) * len(dataset)
    store = open_store(tmp_path / "feats.npy", rows, expected.shape[1], "float32")
    got = model.extract(loader(records), progress=False, out=store)
    assert torch.equal(got, expected)
    assert np.shares_memory(got.numpy(), store)
    reopened = np.load(tmp_path / "feats.npy", mmap_mode="r")
    assert np.array_equal(reopened, expected.numpy())
    half = open_store(tmp_path / "half.npy", rows, expected.shape[1], "float16")
    got16 = model.extract(loader(records), progress=False, out=half)
    assert torch.allclose(got16.float(), expected, rtol=1e-3, atol=1e-3)
    bank = model.subsample(got16, ratio=0.2, progress=False)  # straight from the fp16 memmap
    assert bank.dtype == torch.float32 and len(bank) == max(1, int(rows * 0.2))
    stored = {row.tobytes() for row in got16.float().numpy()}
    assert all(row.tobytes() in stored for row in bank.numpy())  # every bank row is a stored row, exactly
    short = open_store(tmp_path / "short.npy", rows - 1, expected.shape[1], "float32")
    with pytest.raises(ConfigError, match="rows"):
        model.extract(loader(records), progress=False, out=short)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_stays_close_to_float32(records, precision):
    backbone = BackboneConfig("resnet18", ("layer2", "layer3"), "none")
    exact = PatchCore(ModelConfig(backbone=backbone, target_embed_dim=64), device="cpu")
    reduced = PatchCore(ModelConfig(backbone=backbone, target_embed_dim=64, precision=precision), device="cpu")
    a = exact.extract(loader(records[:2]), progress=False)
    b = reduced.extract(loader(records[:2]), progress=False)
    assert b.dtype == torch.float32
    assert not torch.equal(a, b)  # the option does something
    assert float((a - b).norm() / a.norm()) < 0.05


def test_channels_last_gives_the_same_features(records):
    from patchcore.backbones import FeatureExtractor

    images = torch.rand(2, 3, 64, 64)
    plain = FeatureExtractor("resnet18", ("layer2", "layer3"), "none", channels_last=False)
    nhwc = FeatureExtractor("resnet18", ("layer2", "layer3"), "none", channels_last=True)
    with torch.inference_mode():
        a, b = plain(images), nhwc(images)
    for layer in a:
        assert a[layer].is_contiguous() and b[layer].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a[layer], b[layer], rtol=1e-4, atol=1e-4)


def test_precision_is_validated():
    with pytest.raises(ConfigError, match="model.precision"):
        build(Config, {"data": {"format": "synthetic"}, "model": {"precision": "int4"}}).validate()


def _entry_bytes(tmp_path) -> int:
    scratch = FeatureCache(tmp_path / "scratch")
    scratch.store("ns", "0" * 64, torch.ones(16, 8), (4, 4))
    return scratch.path("ns", "0" * 64).stat().st_size


def test_past_its_cap_the_cache_evicts_the_least_recently_used_entries(tmp_path, caplog):
    from patchcore.config import DataConfig

    size = _entry_bytes(tmp_path)  # every entry below has this size (same shape, same key length)
    data = DataConfig(cache_dir=str(tmp_path / "cache"), cache_max_gb=3.5 * size / 1e9)
    central, factory = FeatureCache.under(data, "central"), FeatureCache.under(data, "factory-0")
    assert central.budget_root == factory.budget_root == tmp_path / "cache"  # one cap for the whole cache_dir
    keys = [f"{i}" * 64 for i in range(4)]
    for cache, key, when in ((factory, keys[0], 1000), (factory, keys[1], 2000), (central, keys[2], 3000)):
        cache.store("ns", key, torch.full((16, 8), float(when)), (4, 4))
        os.utime(cache.path("ns", key), (when, when))
    assert factory.load("ns", keys[0]) is not None  # a hit: now the most recently used
    with caplog.at_level(logging.WARNING, logger="fedpatch.cache"):
        central.store("ns", keys[3], torch.zeros(16, 8), (4, 4))  # 4 entries > 3.5: down to 0.9 × 3.5
    left = {p.stem for p in (tmp_path / "cache").rglob("*.safetensors")}
    assert left == {keys[0], keys[2], keys[3]}  # keys[1]: the oldest unused one, in another factory's folder
    assert len(caplog.records) == 1 and "evicted 1 least recently used" in caplog.text
    assert central.stats.evicted == 1 and central.stats.evicted_bytes == size
    assert FeatureCache.under(DataConfig(cache_dir=""), "central") is None


def test_a_tiny_cap_keeps_extraction_right_and_the_folder_under_it(model, records, tmp_path, caplog):
    plain = model.extract(loader(records), progress=False)
    cache = FeatureCache(tmp_path / "cache")
    model.extract(loader(records[:1]), progress=False, cache=cache)
    one = next((tmp_path / "cache").rglob("*.safetensors")).stat().st_size
    cache.max_bytes = int(2.5 * one)  # room for two of the five images
    with caplog.at_level(logging.WARNING, logger="fedpatch.cache"):
        cached = model.extract(loader(records), progress=False, cache=cache)
    assert len(caplog.records) == 1  # evicted in several passes, said once
    torch.testing.assert_close(cached, plain)
    assert sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file()) <= cache.max_bytes
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    assert cache.stats.evicted == 3 and cache.stats.evicted_bytes == 3 * one
