"""Payload encode/decode round trip, sizes, and every rejection with its message."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from federated.errors import PayloadError
from federated.payload import PAYLOAD_FORMAT_VERSION, Payload, encode, raw_feature_bytes, validate
from patchcore.errors import ConfigError

DIM = 16
BACKBONE = "wide_resnet50_2/layer2+layer3/1024"


def make(n: int = 12, dtype: str = "float16", num_patches: int = 400, **kw) -> Payload:
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(0))
    return encode(x, num_patches=num_patches, num_images=4, backbone_id=BACKBONE, factory_id=3,
                  dtype=dtype, **kw)


def check(payload: Payload, **kw) -> None:
    args = {"expected_dim": DIM, "expected_backbone": BACKBONE, **kw}
    validate(payload, **args)


def test_round_trip_and_sizes() -> None:
    p = make()
    assert p.features.dtype == np.float16 and p.features.shape == (12, DIM)
    assert p.feature_dim == DIM and p.format_version == PAYLOAD_FORMAT_VERSION
    arrays, config = p.to_parts()
    assert set(arrays) == {"features"}
    assert all(isinstance(v, (int, float, str)) for v in config.values())
    q = Payload.from_parts(arrays, config)
    assert q == p and q.features.dtype == np.float16
    assert np.array_equal(q.features, p.features)
    assert p.nbytes == 12 * DIM * 2
    assert make(dtype="float32").nbytes == 12 * DIM * 4
    assert raw_feature_bytes(400, DIM) == 400 * DIM * 4
    assert p.upload_ratio == pytest.approx(12 / 400 / 2)
    check(q)  # a round-tripped payload is valid


def test_encode_accepts_numpy_and_rejects_bad_input() -> None:
    p = encode(np.ones((3, DIM)), num_patches=3, num_images=1, backbone_id=BACKBONE,
               factory_id=0, dtype="float32")
    assert p.features.dtype == np.float32
    with pytest.raises(ConfigError, match="dtype 'bfloat16' is unknown"):
        make(dtype="bfloat16")
    with pytest.raises(PayloadError, match="2-D"):
        encode(np.ones(DIM), num_patches=1, num_images=1, backbone_id=BACKBONE, factory_id=0)


def test_equality_sees_the_features() -> None:
    p = make()
    other = dataclasses.replace(p, features=p.features.copy())
    assert other == p
    other.features[0, 0] += 1
    assert other != p


@pytest.mark.parametrize("mutate, kwargs, message", [
    (lambda p: dataclasses.replace(p, format_version=2), {}, "format version 2 is not supported"),
    (lambda p: dataclasses.replace(p, features=np.zeros((4, DIM + 1), np.float16),
                                   feature_dim=DIM + 1), {},
     f"feature dimension {DIM + 1} does not match the expected {DIM}"),
    (lambda p: dataclasses.replace(p, feature_dim=DIM + 2), {}, "feature_dim says"),
    (lambda p: dataclasses.replace(p, backbone_id="resnet18"), {},
     "backbone 'resnet18' does not match"),
    (lambda p: dataclasses.replace(p, features=p.features.astype(np.float64)), {},
     "dtype float64 is not one of float16, float32, int8"),
    (lambda p: dataclasses.replace(p, features=p.features.astype(np.int64)), {},
     "dtype int64 is not one of"),
    (lambda p: dataclasses.replace(p, features=np.zeros((12, DIM), np.int8)), {},
     "int8 features need float32 scales of shape (12,), got none"),
    (lambda p: dataclasses.replace(p, scales=np.ones(12, np.float32)), {},
     "scales were sent with float16 features"),
    (lambda p: dataclasses.replace(p, features=np.zeros((0, DIM), np.float16)), {},
     "features are empty"),
    (lambda p: dataclasses.replace(p, num_patches=5), {},
     "12 vectors sent but only 5 patches extracted"),
    (lambda p: p, {"max_vectors": 10}, "12 vectors exceed the limit of 10"),
    (lambda p: p, {"max_bytes": 100}, f"{12 * DIM * 2} feature bytes exceed the limit of 100"),
])
def test_rejections(mutate, kwargs, message: str) -> None:
    p = mutate(make())
    with pytest.raises(PayloadError) as err:
        check(p, **kwargs)
    assert message in str(err.value)
    assert str(err.value).startswith("payload from factory-3: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(bad: float) -> None:
    p = make()
    p.features[2, 5] = bad
    with pytest.raises(PayloadError, match=r"non-finite values \(NaN/inf\) in 1 of 12 vectors"):
        check(p)


def test_limits_that_are_met_pass() -> None:
    check(make(), max_vectors=12, max_bytes=12 * DIM * 2)


def test_from_parts_missing_keys_and_newer_version() -> None:
    arrays, config = make().to_parts()
    del config["backbone_id"]
    with pytest.raises(PayloadError, match="missing key\\(s\\): backbone_id"):
        Payload.from_parts(arrays, config)
    with pytest.raises(PayloadError, match="missing key\\(s\\): features"):
        Payload.from_parts({}, make().to_parts()[1])
    config = {**make().to_parts()[1], "format_version": 9}
    with pytest.raises(PayloadError, match="format version 9 is not supported"):
        Payload.from_parts({}, config)  # reported as a version problem, not missing keys
    config = {**make().to_parts()[1], "num_patches": "many"}
    with pytest.raises(PayloadError, match="'num_patches' must be an integer"):
        Payload.from_parts(arrays, config)


def test_int8_round_trip_error_and_size() -> None:
    x = torch.randn(12, DIM, generator=torch.Generator().manual_seed(0)) * 3.0
    x[4] = 0.0  # a zero row must survive (scale 1, codes 0)
    p = encode(x, num_patches=400, num_images=4, backbone_id=BACKBONE, factory_id=3, dtype="int8")
    assert p.features.dtype == np.int8 and p.scales.shape == (12,) and p.encoding == "int8"
    assert p.nbytes == 12 * DIM + 12 * 4  # one byte a value + one float32 scale a vector
    decoded = p.decoded()
    peak = x.abs().max(dim=1).values.numpy()  # (12,)
    error = np.abs(decoded - x.numpy()).max(axis=1)
    assert np.all(error <= peak / 127 / 2 + 1e-6)  # rounding: at most half a step per value
    assert np.all(decoded[4] == 0) and np.abs(p.features).max() == 127
    q = Payload.from_parts(*p.to_parts())
    assert q == p and np.array_equal(q.decoded(), decoded)
    check(q)


@pytest.mark.parametrize("scales, message", [
    (np.ones(11, np.float32), "scales of shape (12,), got (11,)"),
    (np.full(12, -1.0, np.float32), "int8 scales must be finite and > 0"),
    (np.full(12, np.nan, np.float32), "int8 scales must be finite and > 0"),
    (np.full(12, 3e38, np.float32), "non-finite values"),  # decodes to inf
])
def test_int8_bad_scales_rejected(scales: np.ndarray, message: str) -> None:
    p = dataclasses.replace(make(dtype="int8"), scales=scales)
    with pytest.raises(PayloadError) as err:
        check(p)
    assert message in str(err.value)


def test_save_and_load_payload(tmp_path) -> None:
    from federated.payload import load_payload, save_payload

    for dtype in ("float16", "int8"):
        p = make(dtype=dtype)
        save_payload(p, tmp_path / dtype / "stripes", {"fingerprint": "abc"})
        q, meta = load_payload(tmp_path / dtype / "stripes")
        assert q == p and meta["fingerprint"] == "abc"
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PayloadError, match="cannot read saved payload .*bad.safetensors"):
        load_payload(tmp_path / "bad")
