import pytest
import torch

from src.core.dataset_info import DatasetInfo
from src.core.errors import ConfigError
from src.models.cnn import cnn
from src.models.mlp import mlp
from src.models.timm_backbone import timm_model

INFO = DatasetInfo(num_samples=10, num_classes=7, input_shape=(3, 16, 16))


def test_models_size_themselves_from_the_data():
    x = torch.randn(2, 3, 16, 16)
    assert mlp(INFO, hidden=[8])(x).shape == (2, 7)
    assert cnn(INFO, channels=[4, 8])(x).shape == (2, 7)
    feats = cnn(INFO, channels=[4, 8], num_classes=0)
    assert feats(x).shape == (2, feats.num_features) == (2, 8)


def test_timm_by_name_with_local_weights(tmp_path):
    from safetensors.torch import save_file

    m = timm_model(INFO, name="resnet10t")
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    other = DatasetInfo(num_samples=10, num_classes=3, input_shape=(3, 16, 16))
    m2 = timm_model(other, name="resnet10t", pretrained_path=str(tmp_path / "w.safetensors"))
    assert torch.equal(m2.conv1[0].weight, m.conv1[0].weight)  # backbone loaded, head resized
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        timm_model(INFO, name="resnet18x")
    with pytest.raises(ConfigError, match="file not found"):
        timm_model(INFO, name="resnet10t", pretrained_path=str(tmp_path / "missing.pt"))
