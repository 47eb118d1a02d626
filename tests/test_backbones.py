"""Backbones: offline ImageNet weights load strictly and classify correctly; local files load; errors are clear."""

from __future__ import annotations

import pickle
import urllib.error

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data as skdata

from spade_ad import WeightsError, build_backbone
from spade_ad.core.backbones import build_classifier, fold_batch_norms, state_dict_sha256

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_classifier_ranks_a_cat_first_for_chelsea() -> None:
    model = build_classifier("efficientnet_lite0")
    image = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top3 = model((image - 0.5) / 0.5).topk(3).indices[0].tolist()
    assert CAT_CLASSES & set(top3), top3
    assert top3[0] in CAT_CLASSES


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_backbones_give_pyramid_and_global_feature(name: str) -> None:
    backbone = build_backbone(name)
    pyramid, global_features = backbone(torch.rand(2, 3, 96, 160))
    assert backbone.strides == (4, 8, 16)
    assert [tuple(m.shape) for m in pyramid] == [
        (2, c, 96 // s, 160 // s) for c, s in zip(backbone.channels, backbone.strides)
    ]
    assert global_features.shape == (2, backbone.global_dim)
    assert len(backbone.weights_sha256) == 64


def test_lite0_features_equal_the_unfolded_network() -> None:
    """The backbone folds batch norms into convolutions and runs channels-last: same features as timm's own network."""
    backbone = build_backbone("efficientnet_lite0", layers=(1, 2, 3))
    reference = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    reference.load_state_dict(build_classifier("efficientnet_lite0").state_dict(), strict=False)
    images = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    pyramid, global_features = backbone(images)
    with torch.no_grad():
        expected = reference((images - 0.5) / 0.5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    for got, want in zip([*pyramid, global_features], [*expected[:3], expected[3].mean(dim=(2, 3))]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in pyramid)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100"])
def test_batch_norm_folding_keeps_outputs(name: str) -> None:
    body = timm.create_model(name, features_only=True, out_indices=(1, 2, 3))
    generator = torch.Generator().manual_seed(0)
    for module in body.modules():  # statistics far from the identity, so that folding matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    images = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = body.eval()(images)
        folded = fold_batch_norms(body)
        actual = folded(images)
    assert folded is not body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    for got, want in zip(actual, expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_batch_norm_folding_refuses_a_misleading_child_order() -> None:
    """A convolution listed before a batch norm that in fact runs after it: folding would change the output."""

    class NormThenConv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.norm = torch.nn.BatchNorm2d(3)
            self.norm.running_mean.fill_(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.norm(x))

    body = NormThenConv()
    assert fold_batch_norms(body) is body
    assert isinstance(body.norm, torch.nn.BatchNorm2d)


def test_batch_norm_folding_keeps_a_network_that_cannot_take_the_probe() -> None:
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 126 * 126, 2))  # needs 128 x 128 inputs, the probe is 64 x 64
    assert fold_batch_norms(body) is body
    assert isinstance(body[1], torch.nn.BatchNorm2d)


def test_layers_are_configurable() -> None:
    backbone = build_backbone("efficientnet_lite0", layers=(2, 3, 4))
    assert backbone.strides == (8, 16, 32)
    pyramid, _ = backbone(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in pyramid] == list(backbone.channels)


def test_wide_resnet50_loads_a_state_dict_file(tmp_path) -> None:
    reference = timm.create_model("wide_resnet50_2", pretrained=False)
    path = tmp_path / "wrn50.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("wide_resnet50_2", weights=path)
    assert backbone.channels == (256, 512, 1024)
    assert backbone.global_dim == 2048
    assert backbone.weights_sha256 == state_dict_sha256(reference.state_dict())
    images = torch.rand(1, 3, 64, 64)
    pyramid, global_features = backbone(images)
    assert pyramid[0].shape == (1, 256, 16, 16)
    # The weights used are the ones in the file, not a fresh random init (batch norms are folded, so compare outputs).
    with torch.no_grad():
        expected = reference.eval().forward_features((images - backbone.mean) / backbone.std).mean(dim=(2, 3))
    assert torch.allclose(global_features, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_safetensors_weights_file_and_any_timm_name(tmp_path) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = build_backbone("resnet18", weights=path)
    assert backbone.weights_sha256 == state_dict_sha256(reference.state_dict())
    other = timm.create_model("mobilenetv3_small_050", pretrained=False)
    other_path = tmp_path / "mnv3.pth"
    torch.save(other.state_dict(), other_path)
    assert build_backbone("mobilenetv3_small_050", weights=other_path).strides == (4, 8, 16)


def test_missing_weights_file_names_it(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth"):
        build_backbone("wide_resnet50_2", weights=missing)


def test_mismatched_weights_file_is_refused(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit backbone 'wide_resnet50_2'"):
        build_backbone("wide_resnet50_2", weights=path)


def test_pickled_objects_are_never_loaded(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": np.zeros(3)}))
    with pytest.raises(WeightsError, match="evil.pth"):
        build_backbone("resnet18", weights=path)


def test_offline_without_file_says_what_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models as tvm

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(WeightsError) as info:
        build_backbone("wide_resnet50_2")
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message and "--weights" in message


def test_timm_name_without_weights_asks_for_a_file() -> None:
    with pytest.raises(WeightsError, match="weights=PATH"):
        build_backbone("mobilenetv3_small_050")


def test_unknown_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="backbone is not a known network"):
        build_backbone("not_a_network")
