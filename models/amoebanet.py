"""AmoebaNet-D(L, D) as a list of layers, the conv net of the GPipe paper's image experiments.

Layers: [Stem, Normal x L, Reduction, Normal x L, Reduction, Normal x L, Classifier], 3L + 4 in all.
A cell reads the outputs of the two previous cells, so the value between layers is the pair
(previous, current); the stem emits (x, x) and the classifier reads the current one.
Each cell: both inputs are projected to C channels, then five nodes each sum two ops applied to
earlier states; the output concatenates some states. Ops are ReLU -> Conv -> BatchNorm, pools
and identity (Real et al. 2019; genotype as in torchgpipe's AmoebaNet-D benchmark).
"""
import torch
import torch.nn.functional as F
from torch import nn

from minipipe.kernels import ops
from minipipe.models.batchnorm import PipelineBatchNorm2d
from minipipe.models.family import Family

# (input state, op) pairs; node k of the cell sums ops 2k and 2k+1.
NORMAL_OPS = [(1, "conv_1x1"), (1, "max_pool_3x3"), (1, "none"), (0, "conv_1x7_7x1"),
              (0, "conv_1x1"), (0, "conv_1x7_7x1"), (2, "max_pool_3x3"), (2, "none"),
              (1, "avg_pool_3x3"), (5, "conv_1x1")]
NORMAL_CONCAT = [0, 3, 4, 6]
REDUCTION_OPS = [(0, "max_pool_2x2"), (0, "max_pool_3x3"), (2, "none"), (1, "conv_3x3"),
                 (2, "conv_1x7_7x1"), (2, "max_pool_3x3"), (3, "none"), (1, "max_pool_2x2"),
                 (2, "avg_pool_3x3"), (3, "conv_1x1")]
REDUCTION_CONCAT = [4, 5, 6]


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in, c_out, kernel, stride, padding, bn):
        super().__init__(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), bn(c_out))


class Conv1x7Then7x1(nn.Sequential):
    """ReLU, 1x7 conv, BN+ReLU (one fused op), 7x1 conv, BN."""
    def __init__(self, channels, stride, bn):
        super().__init__(nn.ReLU(),
                         nn.Conv2d(channels, channels, (1, 7), (1, stride), (0, 3), bias=False),
                         bn(channels, relu=True),
                         nn.Conv2d(channels, channels, (7, 1), (stride, 1), (3, 0), bias=False),
                         bn(channels))


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset 1x1 stride-2 convs (ceil(H/2) for any H)."""
    def __init__(self, c_in, c_out, bn):
        super().__init__()
        self.conv_a = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv_b = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = bn(c_out)

    def forward(self, x):
        x = F.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(shifted)], dim=1))


def make_op(name, channels, stride, bn) -> nn.Module:
    if name == "none":
        return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels, bn)
    if name == "conv_1x1":
        return ReLUConvBN(channels, channels, 1, stride, 0, bn)
    if name == "conv_3x3":
        return ReLUConvBN(channels, channels, 3, stride, 1, bn)
    if name == "conv_1x7_7x1":
        return Conv1x7Then7x1(channels, stride, bn)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, 1)
    if name == "max_pool_2x2":
        return nn.MaxPool2d(2, stride, ceil_mode=True) if stride == 2 else nn.Identity()
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    raise ValueError(f"unknown AmoebaNet op {name!r}")


class Cell(nn.Module):
    def __init__(self, c_prev_prev, c_prev, channels, reduction, reduction_prev, bn):
        super().__init__()
        ops, self.concat = (REDUCTION_OPS, REDUCTION_CONCAT) if reduction else (NORMAL_OPS, NORMAL_CONCAT)
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, bn) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, bn))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, bn)
        self.inputs = [state for state, _ in ops]
        self.ops = nn.ModuleList(make_op(name, channels, 2 if reduction and state < 2 else 1, bn)
                                 for state, name in ops)
        self.out_channels = len(self.concat) * channels

    def forward(self, pair):
        prev_prev, prev = pair
        states = [self.preprocess0(prev_prev), self.preprocess1(prev)]
        for node in range(len(self.ops) // 2):
            a, b = 2 * node, 2 * node + 1
            states.append(self.ops[a](states[self.inputs[a]]) + self.ops[b](states[self.inputs[b]]))
        return prev, torch.cat([states[i] for i in self.concat], dim=1)


class Stem(nn.Module):
    def __init__(self, c_in, c_out, stride, bn):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = bn(c_out)

    def forward(self, images):
        x = self.bn(self.conv(images))
        return x, x


class Classifier(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.linear = nn.Linear(channels, classes)

    def forward(self, pair):
        return self.linear(F.relu(pair[1]).mean(dim=(2, 3)))


def layer_factories(cfg, backend: str):
    def bn(channels, relu=False):
        return PipelineBatchNorm2d(channels, backend, cfg.deferred_bn, relu)

    stem_stride = 2 if cfg.image_size > 64 else 1  # large images: halve once before the cells
    factories = [lambda: Stem(cfg.channels, cfg.filters, stem_stride, bn)]
    c_prev_prev = c_prev = cfg.filters
    reduction_prev = False
    for group in range(3):
        channels = cfg.filters * 2 ** group
        kinds = ([True] if group > 0 else []) + [False] * cfg.cells
        for reduction in kinds:
            args = (c_prev_prev, c_prev, channels, reduction, reduction_prev, bn)
            factories.append(lambda args=args: Cell(*args))
            out = len(REDUCTION_CONCAT if reduction else NORMAL_CONCAT) * channels
            c_prev_prev, c_prev, reduction_prev = c_prev, out, reduction
    factories.append(lambda c=c_prev: Classifier(c, cfg.classes))
    return factories


def make_loss(backend: str):
    def loss_sum(logits, targets):
        """Cross-entropy summed over the samples."""
        if logits.element_size() < 4:
            logits = logits.float()
        return ops.cross_entropy(logits, targets, reduction="sum", backend=backend)
    return loss_sum


def count_loss_units(targets) -> int:
    return targets.shape[0]


FAMILY = Family(
    name="amoebanet", unit="sample", data_kind="images", default_data="digits",
    depth_field="cells", fixed_layers=4, layers_per_depth=3,  # stem, 2 reductions, classifier; 3 cells
    layer_factories=layer_factories, make_loss=make_loss, count_loss_units=count_loss_units,
    units_per_sample=lambda cfg: 1,
    input_shape=lambda cfg, rows: (rows, cfg.channels, cfg.image_size, cfg.image_size),
    targets_shape=lambda cfg, rows: (rows,),
    planning_defaults=lambda cfg: {  # what the default data (8x8 grey digits) would fill
        "classes": cfg.classes or 10,
        "channels": cfg.channels or (1 if (cfg.data or "digits") == "digits" else 3)},
    describe=lambda cfg: (f"AmoebaNet-D(L={3 * cfg.cells}, D={cfg.filters}), "
                          f"{cfg.image_size}x{cfg.image_size}"))
