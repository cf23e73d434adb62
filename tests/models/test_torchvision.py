"""Tests for layerfreeze.models.torchvision: logits match a torchvision-layout torch ResNet."""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn

from layerfreeze.models import (  # noqa: E402
    load_torchvision_resnet,
    resnet10,
    resnet18,
    resnet34,
    resnet50,
)


# A minimal copy of torchvision.models.resnet (there is no torchvision here): same module
# names, so the same state_dict keys, and the same v1.5 semantics.
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # v1.5: stride on the 3x3 conv.
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_TORCH_MODELS = {
    "resnet18": (resnet18, BasicBlock, (2, 2, 2, 2)),
    "resnet50": (resnet50, Bottleneck, (3, 4, 6, 3)),
}


@functools.cache
def _torch_model(name: str, num_classes: int = 1000) -> TorchResNet:
    """A seeded torch ResNet with realistic, non-trivial BatchNorm statistics."""
    _, block, layers = _TORCH_MODELS[name]
    torch.manual_seed(0)
    model = TorchResNet(block, layers, num_classes)
    with torch.no_grad():
        # One training-mode pass with momentum 1 makes the running statistics those of a
        # batch, so eval-mode activations keep a sane scale through the whole net.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        model.train()
        model(torch.randn(4, 3, 64, 64))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.2))
        model.fc.bias.normal_(0.0, 0.1)
    return model.eval()


def _save(model: nn.Module, path, fmt: str) -> None:
    if fmt == "pth":
        torch.save(model.state_dict(), path)
    else:
        safetensors_torch.save_file(model.state_dict(), path)


X = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


@functools.cache
def _torch_logits(name: str) -> np.ndarray:
    with torch.no_grad():
        return _torch_model(name)(torch.from_numpy(X).permute(0, 3, 1, 2)).numpy()


@functools.cache
def _jit_apply(model):
    return jax.jit(functools.partial(model.apply, train=False))


def _init_shapes(model):
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logits_match_torch(name, fmt, tmp_path):
    path = tmp_path / f"{name}.{fmt}"
    torch_model = _torch_model(name)
    _save(torch_model, path, fmt)
    model = _TORCH_MODELS[name][0](1000)

    variables = load_torchvision_resnet(path, model)

    expected = _init_shapes(model)
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for leaf, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        assert isinstance(leaf, np.ndarray)
        assert (leaf.shape, leaf.dtype) == (want.shape, want.dtype)
    logits = np.asarray(_jit_apply(model)(variables, X))
    reference = _torch_logits(name)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_conversion_of_layouts(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch_model = _torch_model("resnet18")
    _save(torch_model, path, "pth")
    variables = load_torchvision_resnet(path, resnet18(1000))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        params["stage2"]["Block_0"]["Downsample_Conv"]["kernel"],
        state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        params["stage3"]["Block_1"]["BatchNorm_1"]["scale"], state["layer3.1.bn2.weight"]
    )
    np.testing.assert_array_equal(stats["stem"]["BatchNorm_0"]["var"], state["bn1.running_var"])
    np.testing.assert_array_equal(params["head"]["Dense_0"]["kernel"], state["fc.weight"].T)


@pytest.mark.parametrize("kw", [dict(num_classes=10), dict(num_classes=1000, head="mlp")])
def test_head_left_out_when_it_cannot_be_loaded(kw, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    _save(_torch_model("resnet18"), path, "safetensors")
    model = resnet18(**kw)

    variables = load_torchvision_resnet(path, model)

    assert "head" not in variables["params"]
    expected = _init_shapes(model)
    del expected["params"]["head"]
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    # The documented recipe: the caller initialises the head.
    fresh = _init_shapes(model)
    params = {**variables["params"], "head": fresh["params"]["head"]}
    assert jax.tree.structure(params) == jax.tree.structure(fresh["params"])


def _state(name: str = "resnet18") -> dict:
    return {k: v.clone() for k, v in _torch_model(name).state_dict().items()}


def _write(state: dict, tmp_path) -> str:
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return path


def test_missing_key(tmp_path):
    state = _state()
    del state["layer3.1.bn2.running_mean"]
    with pytest.raises(
        ValueError,
        match=r"torchvision resnet18.*Missing keys \(1\): \['layer3.1.bn2.running_mean'\]",
    ):
        load_torchvision_resnet(_write(state, tmp_path), resnet18(1000))


def test_unused_key(tmp_path):
    state = _state()
    state["layer3.1.conv3.weight"] = state["layer3.1.conv2.weight"]
    with pytest.raises(ValueError, match=r"Unused keys \(1\): \['layer3.1.conv3.weight'\]"):
        load_torchvision_resnet(_write(state, tmp_path), resnet18(1000))


def test_wrong_model_lists_offending_keys(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    _save(_torch_model("resnet18"), path, "safetensors")
    with pytest.raises(ValueError, match=r"torchvision resnet34.*Missing keys \(\d+\): \['layer"):
        load_torchvision_resnet(path, resnet34(1000))
    with pytest.raises(
        ValueError, match=r"torchvision resnet50.*Missing keys \(165\): \['layer1.0.bn3.bias'"
    ):
        load_torchvision_resnet(path, resnet50(1000))
    # torchvision has no ResNet-10: the message names its layout, not a torchvision model.
    with pytest.raises(
        ValueError,
        match=r"of ResNet\(stage_sizes=\(1, 1, 1, 1\), block='basic', width=64\)\. "
        r"Unused keys \(\d+\): \['layer1.1",
    ):
        load_torchvision_resnet(path, resnet10(1000))


def test_data_parallel_prefix_hint(tmp_path):
    state = {f"module.{k}": v for k, v in _state().items()}
    with pytest.raises(ValueError, match=r"Every key starts with 'module\.'"):
        load_torchvision_resnet(_write(state, tmp_path), resnet18(1000))


def test_shape_mismatch(tmp_path):
    state = _state()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    with pytest.raises(
        ValueError,
        match=r"'layer2.0.conv1.weight'.*\(128, 64, 5, 5\).*expects \(3, 3, 64, 128\)",
    ):
        load_torchvision_resnet(_write(state, tmp_path), resnet18(1000))


def test_width_mismatch_is_a_shape_error(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    _save(_torch_model("resnet18"), path, "safetensors")
    with pytest.raises(ValueError, match=r"Shape mismatch for '.*'"):
        load_torchvision_resnet(path, resnet18(1000, width=32))


def test_classifier_in_features_checked_when_head_dropped(tmp_path):
    state = _state()
    state["fc.weight"] = torch.zeros(10, 100)
    with pytest.raises(ValueError, match=r"'fc.weight'.*\(10, 100\).*expects \('\*', 512\)"):
        load_torchvision_resnet(_write(state, tmp_path), resnet18(1000, head="mlp"))


def test_cifar_stem_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="stem='imagenet'"):
        load_torchvision_resnet(tmp_path / "unused.pth", resnet18(10, stem="cifar"))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"'\.npz'.*\['\.pth', '\.pt', '\.safetensors'\]"):
        load_torchvision_resnet(path, resnet18(1000))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": _state()}, path)
    with pytest.raises(ValueError, match=r"does not hold a state_dict.*\['epoch', 'state_dict'\]"):
        load_torchvision_resnet(path, resnet18(1000))
