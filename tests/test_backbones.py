"""Backbones: the paper's WRN50 shapes, local state-dict files, early stopping, clear errors."""

import pytest
import torch

from patchcore.backbones import REGISTRY, FeatureExtractor, build_network
from patchcore.config import BackboneConfig, ModelConfig
from patchcore.errors import ConfigError, WeightsError
from patchcore.model import PatchCore


@pytest.fixture(scope="module")
def wrn_state_file(tmp_path_factory):
    net, _ = build_network("wide_resnet50_2", "none", seed=5)
    path = tmp_path_factory.mktemp("w") / "wrn50.pth"
    torch.save(net.state_dict(), path)
    return path


def test_wrn50_none_gives_paper_shapes_and_784_patches_of_1024():
    model = PatchCore(ModelConfig(backbone=BackboneConfig("wide_resnet50_2", ("layer2", "layer3"), "none")), "cpu")
    with torch.inference_mode():
        maps = model.extractor(torch.rand(1, 3, 224, 224))
    assert maps["layer2"].shape == (1, 512, 28, 28)
    assert maps["layer3"].shape == (1, 1024, 14, 14)
    emb, grid = model.embed(torch.rand(1, 3, 224, 224))
    assert grid == (28, 28) and emb.shape == (1, 784, 1024)
    assert "layer4" not in model.extractor.stages  # never runs past the deepest requested layer


def test_wrn50_loads_a_saved_state_dict_file(wrn_state_file):
    ref, _ = build_network("wide_resnet50_2", "none", seed=5)
    fe = FeatureExtractor("wide_resnet50_2", ("layer2", "layer3"), str(wrn_state_file), seed=99)
    assert torch.equal(fe.stages["layer3"][0].conv1.weight, ref.layer3[0].conv1.weight)
    other = FeatureExtractor("wide_resnet50_2", ("layer2", "layer3"), "none", seed=99)
    assert not torch.equal(other.stages["layer3"][0].conv1.weight, ref.layer3[0].conv1.weight)


def test_state_dict_of_another_network_is_refused(tmp_path):
    net, _ = build_network("resnet18", "none")
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit wide_resnet50_2"):
        FeatureExtractor("wide_resnet50_2", ("layer2",), str(path))
    with pytest.raises(WeightsError, match="not found"):
        FeatureExtractor("resnet18", ("layer2",), str(tmp_path / "missing.pth"))


def test_imagenet_without_network_fails_with_one_line_saying_how(monkeypatch):
    import torchvision.models as tvm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(WeightsError) as err:
        FeatureExtractor("wide_resnet50_2", ("layer2", "layer3"), "imagenet")
    message = str(err.value)
    assert "\n" not in message and "wide_resnet50_2-" in message and "model.backbone.weights" in message


def test_lite0_imagenet_weights_ship_with_the_package_and_stop_at_block10():
    fe = FeatureExtractor("efficientnet_lite0", ("layer2", "layer3"), "imagenet")
    with torch.inference_mode():
        out = fe(torch.rand(1, 3, 224, 224))
    assert out["layer2"].shape == (1, 40, 28, 28) and out["layer3"].shape == (1, 112, 14, 14)
    assert list(fe.stages)[-1] == "block10"
    random = FeatureExtractor("efficientnet_lite0", ("layer2",), "none")
    assert not torch.equal(random.stages["block0"].state_dict()["_depthwise_conv.weight"],
                           fe.stages["block0"].state_dict()["_depthwise_conv.weight"])


def test_unknown_backbone_and_layer_are_config_errors():
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'.*wide_resnet50_2"):
        FeatureExtractor("vgg", ("layer2",), "none")
    with pytest.raises(ConfigError, match="unknown layer 'layer9'"):
        FeatureExtractor("resnet18", ("layer9",), "none")


def test_registry_has_the_documented_backbones():
    assert set(REGISTRY) == {"wide_resnet50_2", "resnet18", "resnet50",
                             "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


def test_extractor_stays_in_eval_mode():
    fe = FeatureExtractor("resnet18", ("layer2",), "none")
    fe.train()
    assert not fe.training and not any(m.training for m in fe.modules())
