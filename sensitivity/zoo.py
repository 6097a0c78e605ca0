"""Small reference models and real data (scikit-learn's bundled digits) for tests, benchmarks
and the demo. Nothing here downloads anything.

``digits_data`` gives 1797 real 8x8 handwritten digits (optionally resized), normalised to
[0, 1]; the models are tiny enough to train in a few seconds on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


def digits_data(image_size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, S, S] float32 in [0, 1], labels [N] int64), shuffled with ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm].contiguous(), y[perm].contiguous()


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x2, global average pool, linear."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class DigitsResNet(nn.Module):
    """A stem, one residual basic block (add of two requantised branches), pool, linear."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        return self.fc(x.mean(dim=(2, 3)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """A residual block's 1x1 conv + BN on the identity path when the shape changes (as in
    torchvision: ``downsample.0`` / ``downsample.1``), else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18Like(nn.Module):
    """ResNet-18 topology for 32x32 inputs (CIFAR stem): 21 conv/linear layers."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class _Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (v1.5: the stride sits on the 3x3 conv)."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet (7x7 stem, max pool, four stages, 1000 classes), for
    224x224 inputs. ``block`` is ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50)."""

    def __init__(self, block: str, depths: tuple[int, int, int, int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                if block == "basic":
                    blocks.append(_BasicBlock(cin, width, stride))
                    cin = width
                else:
                    blocks.append(_Bottleneck(cin, width, stride))
                    cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 at 224x224: 11.69M parameters, 1.82 GMACs (conv + linear)."""
    return ResNet("basic", (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (v1.5) at 224x224: 25.56M parameters, 4.09 GMACs (conv + linear)."""
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes)


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU6(inplace=False),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1, 1))
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0) for 224x224: 3.50M parameters, 0.30 GMACs."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # expansion t, channels c, repeats n, stride s

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)


REFERENCE = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2}


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 16) -> nn.Module:
    """Set every BatchNorm's running statistics to the mean / variance of ``x``'s activations
    (a random-initialised network then keeps unit-scale activations in eval mode instead of
    growing at every residual add); returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def reference_model(name: str, samples: int = 16, seed: int = 0) -> nn.Module:
    """A random-initialised reference network (``REFERENCE``) with BN statistics calibrated
    on ``samples`` random 224x224 images, in eval mode."""
    torch.manual_seed(seed)
    model = REFERENCE[name]()
    x = torch.randn(samples, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1))
    return calibrate_bn(model, x)


def conv_linear_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one sample of ``example``'s shape."""
    total = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        per_out = m.weight[0].numel()  # (cin / groups) * kh * kw, or in_features
        total += out[0].numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 15,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Deterministic Adam training; returns the model in eval mode.

    One thread and deterministic kernels while training, so the same seed gives the same model
    on any machine with the same torch build (a summation order that depends on the thread
    count would otherwise change the weights, and with them every threshold measured on them).
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch_size):
                idx = perm[i : i + batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())


def export(
    model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension unless ``dynamic_batch`` is False."""
    shapes = None
    if dynamic_batch:
        shapes = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=shapes)


def save_model(
    model: nn.Module, example: torch.Tensor, path: str | Path, dynamic_batch: bool = True
) -> Path:
    """Export ``model`` on ``example`` and save the program to ``path``. The example is
    cloned first: ``torch.export`` saves a view's whole storage, so ``x[:2]`` of a calibration
    set would otherwise put the whole set into the ``.pt2``."""
    path = Path(path)
    torch.export.save(export(model, example.clone(), dynamic_batch), str(path))
    return path


def save_calibration(
    path: str | Path, inputs: torch.Tensor, labels: torch.Tensor | None = None
) -> Path:
    """Write a calibration file in bitplan's format: ``inputs`` and optional ``labels``."""
    path = Path(path)
    tensors = {"inputs": inputs.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    save_file(tensors, str(path))
    return path
