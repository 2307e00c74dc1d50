"""Convolutional and MLP image classifiers of the zoo.

* :class:`VGG16` — the CIFAR VGG-16 with BatchNorm (13 conv 3×3 + BN + ReLU, 5 max-pools, one
  Linear classifier, as in the CIFAR variants used by the pruning literature, e.g. Wang et al.
  2020 / GraSP). Kaiming-normal (fan_out, ReLU) conv init as in seeds 000/002; BN (1, 0);
  Linear N(0, 0.01²), bias 0.
* :class:`ResNet56` — CIFAR ResNet (He et al. 2016): conv 3×3 16 + BN, 3 stages × 9 basic
  blocks (16/32/64 channels, stride 2 at the start of stages 2 and 3), global average pool,
  Linear. The down-sampling shortcut is a 1×1 conv + BN ("option B"), so every filter has a BN.
  Kaiming-normal (fan_out, ReLU) convs; BN (1, 0); Linear PyTorch default.
* :class:`LeNet300100`, :class:`LeNet5Caffe`, :class:`Conv4` — the NTT models (seed 003 Table 1
  and B.1), with the NTT teacher init: Glorot-normal weights (var 2/(fan_in + fan_out)), Linear
  biases N(0, 0.01²), conv biases N(0, 10⁻¹²) (the JAX ``stax`` defaults the paper used).

Every model takes images [B, C, H, W] and returns logits [B, num_classes]; channels, classes and
input size are configurable so MNIST (1×28×28) and CIFAR (3×32×32) both work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.errors import check

__all__ = ["VGG16", "VGG16_CFG", "BasicBlock", "Conv4", "LeNet5Caffe", "LeNet300100", "ResNet56"]

#: VGG-16 layer plan: channel counts of the 13 convs, "M" = 2×2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _scaled(c: int, width: float) -> int:
    return max(1, round(c * width))


def _check_common(in_channels: int, num_classes: int, width: float | None = None) -> None:
    check(isinstance(in_channels, int) and in_channels >= 1, "in_channels", in_channels, "an integer >= 1")
    check(isinstance(num_classes, int) and num_classes >= 1, "num_classes", num_classes, "an integer >= 1")
    if width is not None:
        check(width > 0, "width", width, "a number > 0")


class _NoAux:
    def aux_loss(self) -> Tensor:
        """0 (no MoE layers); every zoo model answers ``aux_loss()`` so loops can add it blindly."""
        ref = next(self.parameters())  # type: ignore[attr-defined]
        return torch.zeros((), dtype=ref.dtype, device=ref.device)


class VGG16(_NoAux, nn.Module):
    """CIFAR VGG-16 with BatchNorm.

    ``features`` is an ``nn.Sequential`` of [Conv2d, BatchNorm2d, ReLU] × 13 with MaxPool2d(2)
    where :data:`VGG16_CFG` says "M"; then global average pooling and ``classifier`` Linear
    (512·width → num_classes). Pools use ``ceil_mode=True`` so 28×28 inputs reach 1×1 as well
    (identical to floor mode on 32×32, where every size is even); the global average pool is the
    identity at 32×32 (final map 1×1) and makes any input ≥ 1 pixel work.

    Args: num_classes; in_channels (3 for CIFAR, 1 for MNIST); width: channel multiplier (each
    conv has max(1, round(c·width)) filters) for CPU-scale recipes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, width)
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                c_out = _scaled(int(v), width)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → logits [B, num_classes]."""
        h = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(h)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    ``shortcut`` is the identity, or ``nn.Sequential(Conv2d 1×1 stride s, BatchNorm2d)`` when the
    stride or channel count changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet56(_NoAux, nn.Module):
    """CIFAR ResNet with ``6n + 2`` layers (n = ``blocks_per_stage`` = 9 → ResNet-56).

    Modules: ``conv1``/``bn1`` (stem, 16·width channels), ``layer1..layer3`` (``nn.Sequential``
    of :class:`BasicBlock`), ``fc`` Linear. Shapes: [B, C, H, W] → [B, num_classes].
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, blocks_per_stage: int = 9
    ) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, width)
        check(isinstance(blocks_per_stage, int) and blocks_per_stage >= 1, "blocks_per_stage",
              blocks_per_stage, "an integer >= 1")
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        stages = []
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → logits [B, num_classes]."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _glorot_init(model: nn.Module) -> None:
    """NTT teacher init: Glorot-normal weights; Linear bias N(0, 1e-2²), conv bias N(0, 1e-6²)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 1e-2 if isinstance(m, nn.Linear) else 1e-6)


class LeNet300100(_NoAux, nn.Module):
    """LeNet-300-100: flatten → ``fc1`` 300 → ReLU → ``fc2`` 100 → ReLU → ``fc3`` num_classes.

    Shapes: [B, C, H, W] (C·H·W = ``in_channels · image_size²``) → [B, num_classes].
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        _check_common(in_channels, num_classes)
        check(isinstance(image_size, int) and image_size >= 1, "image_size", image_size, "an integer >= 1")
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        _glorot_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → logits [B, num_classes]."""
        h = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(h)))


def _pooled(size: int, conv_shrink: int) -> int:
    return (size - conv_shrink) // 2


class LeNet5Caffe(_NoAux, nn.Module):
    """LeNet-5-caffe: ``conv1`` 20@5×5 → ReLU → max-pool 2 → ``conv2`` 50@5×5 → ReLU → max-pool 2
    → ``fc1`` 500 → ReLU → ``fc2`` num_classes. Convs are 'valid' (28×28 → 24 → 12 → 8 → 4, so
    ``fc1`` has 800 inputs on MNIST). Caffe's prototxt has no ReLU after the convs; seed 003 B.1
    says "Relu activations for hidden layers", which we read as after every hidden layer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        _check_common(in_channels, num_classes)
        s = _pooled(_pooled(image_size, 4), 4)
        check(isinstance(image_size, int) and s >= 1, "image_size", image_size, "an integer >= 16")
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * s * s, 500)
        self.fc2 = nn.Linear(500, num_classes)
        _glorot_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → logits [B, num_classes]."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


class Conv4(_NoAux, nn.Module):
    """Conv-4 of seed 003 Table 1 (the Keras ``cifar10_cnn`` example with doubled filters).

    ``conv1`` 64@3×3 'same' → ReLU → ``conv2`` 64@3×3 'valid' → ReLU → max-pool 2 → dropout 0.25
    → ``conv3`` 128@3×3 'same' → ReLU → ``conv4`` 128@3×3 'valid' → ReLU → max-pool 2 → dropout
    0.25 → ``fc1`` 512 → ReLU → dropout 0.5 → ``fc2`` num_classes. Table 1 gives no padding.
    ``padding="keras"`` (default) takes the Keras example's (same, valid), so 32×32 → 32 → 30 → 15
    → 15 → 13 → 6 and ``fc1`` has 128·6·6 = 4608 inputs; ``padding="valid"`` is the NTT authors'
    code (every conv VALID: 32 → 30 → 28 → 14 → 12 → 10 → 5, ``fc1`` 128·5·5 = 3200 inputs).
    Dropout rates are the fraction of inputs dropped (training only).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, padding: str = "keras"
    ) -> None:
        super().__init__()
        _check_common(in_channels, num_classes)
        check(padding in ("keras", "valid"), "padding", padding, "'keras' or 'valid'")
        same = 1 if padding == "keras" else 0
        s = _pooled(_pooled(image_size, 4 - 2 * same), 4 - 2 * same)
        check(isinstance(image_size, int) and s >= 1, "image_size", image_size,
              "an integer >= 8" if same else "an integer >= 14")
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=same)
        self.conv2 = nn.Conv2d(64, 64, 3)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=same)
        self.conv4 = nn.Conv2d(128, 128, 3)
        self.drop1 = nn.Dropout(0.25)
        self.drop2 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(128 * s * s, 512)
        self.drop3 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(512, num_classes)
        _glorot_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] → logits [B, num_classes]."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = self.drop1(F.max_pool2d(h, 2))
        h = F.relu(self.conv4(F.relu(self.conv3(h))))
        h = self.drop2(F.max_pool2d(h, 2))
        h = self.drop3(F.relu(self.fc1(h.flatten(1))))
        return self.fc2(h)

