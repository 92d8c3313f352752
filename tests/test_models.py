import pytest
import torch
from torch import nn

from hpcfed.config import ModelConfig, UserError
from hpcfed.models import build_model

SHAPES = [(64,), (1, 28, 28), (3, 32, 32)]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "resnet18"])
def test_output_shape_and_dtype(name, shape):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), shape, 7)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert out.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


def test_cnn_accepts_image_shaped_digits():
    model = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_digits_is_64_128_10():
    model = build_model(ModelConfig(name="mlp"), (64,), 10)
    assert n_params(model) == 64 * 128 + 128 + 128 * 10 + 10 == 9_610
    assert list(model.state_dict()) == ["hidden.0.weight", "hidden.0.bias", "output.weight", "output.bias"]


def test_mlp_hidden_widths():
    model = build_model(ModelConfig(name="mlp", hidden=[32, 16]), (60,), 10)
    assert n_params(model) == 60 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    logistic = build_model(ModelConfig(name="mlp", hidden=[]), (60,), 10)
    assert n_params(logistic) == 60 * 10 + 10
    with pytest.raises(UserError, match="model.hidden"):
        build_model(ModelConfig(name="mlp", hidden=[0]), (60,), 10)


def test_resnet18_cifar_parameter_count():
    # Kuang Liu's pytorch-cifar ResNet18: 11,173,962 parameters with BatchNorm, and the same with
    # GroupNorm (one scale and one shift per channel either way).
    for norm in ("group", "batch"):
        model = build_model(ModelConfig(name="resnet18", norm=norm), (3, 32, 32), 10)
        assert n_params(model) == 11_173_962
    assert n_params(build_model(ModelConfig(name="resnet8"), (3, 32, 32), 10)) == 78_042


def test_emnist_cnn_matches_tff_and_fedpt_ratio():
    model = build_model(ModelConfig(name="cnn"), (1, 28, 28), 62)
    per_layer = {name: n_params(m) for name, m in model.named_children() if n_params(m)}
    # TFF create_conv_dropout_model's summary: 320, 18,496, 1,179,776, then 128*62 + 62
    assert per_layer == {"conv1": 320, "conv2": 18_496, "fc1": 1_179_776, "fc2": 7_998}
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.25, 0.5]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    total = n_params(model)
    assert total / (total - n_params(model.fc1)) == pytest.approx(45, rel=0.01)


def test_no_batchnorm_in_any_cnn():
    for shape in SHAPES:
        model = build_model(ModelConfig(name="cnn", norm="batch"), shape, 10)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet8", "resnet18"])
def test_resnet_norm_variants(name):
    kinds = {}
    for norm in ("group", "batch", "none"):
        model = build_model(ModelConfig(name=name, norm=norm), (3, 32, 32), 10)
        kinds[norm] = {type(m) for m in model.modules()}
        model.train()
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert nn.GroupNorm in kinds["group"] and nn.BatchNorm2d not in kinds["group"]
    assert nn.BatchNorm2d in kinds["batch"] and nn.GroupNorm not in kinds["batch"]
    assert nn.GroupNorm not in kinds["none"] and nn.BatchNorm2d not in kinds["none"]


def test_groupnorm_groups():
    model = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {64: 16, 128: 32, 256: 32, 512: 32}


def test_default_norm_has_no_running_statistics():
    model = build_model(ModelConfig(name="resnet8"), (3, 32, 32), 10)
    assert not list(model.buffers())
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8"])
def test_deterministic_under_manual_seed(name):
    def build(seed):
        torch.manual_seed(seed)
        return build_model(ModelConfig(name=name), (3, 32, 32), 10).state_dict()

    a, b, c = build(3), build(3), build(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn", (60,)),
        ("cnn", (1, 16, 16)),
        ("cnn", (3, 32, 28)),
        ("cnn", (28, 28)),
        ("resnet8", (60,)),
        ("resnet18", (3, 4, 4)),
        ("resnet18", (32, 32)),
    ],
)
def test_unsupported_shape_is_user_error(name, shape):
    with pytest.raises(UserError, match=f"model.name = '{name}' expects") as info:
        build_model(ModelConfig(name=name), shape, 10)
    assert "\n" not in str(info.value)
    assert str(shape) in str(info.value)
