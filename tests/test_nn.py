"""Modules on the fused ops: equal to their plain-torch twins, fuse() keeps outputs, compile works."""
import pytest
import torch
from torch import nn

import metalearn_fast as mf


class PlainSimpleNet(nn.Module):
    """The founding example's network in plain torch."""

    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc1 = nn.Linear(input_size, 128)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(128, output_size)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def plain_mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def test_simplenet_same_init_and_outputs_as_plain():
    torch.manual_seed(3)
    plain = PlainSimpleNet(10, 2)
    torch.manual_seed(3)
    ours = mf.SimpleNet(10, 2)
    for (name_a, a), (name_b, b) in zip(plain.state_dict().items(), ours.state_dict().items()):
        assert name_a == name_b and torch.equal(a, b)
    x = torch.randn(32, 10)
    torch.testing.assert_close(ours(x), plain(x))
    # state_dicts load both ways
    other = PlainSimpleNet(10, 2)
    other.load_state_dict(ours.state_dict())
    torch.testing.assert_close(other(x), ours(x))


def test_mlp_matches_plain_sequential_forward_and_backward(device):
    torch.manual_seed(0)
    plain = plain_mlp([5, 16, 16, 3]).to(device).double()
    ours = mf.MLP([5, 16, 16, 3]).to(device).double()
    for p_ours, p_plain in zip(ours.parameters(), plain.parameters()):
        with torch.no_grad():
            p_ours.copy_(p_plain)
    x = torch.randn(4, 7, 5, dtype=torch.float64, device=device)  # extra leading dims, like nn.Linear
    out_ours, out_plain = ours(x), plain(x)
    torch.testing.assert_close(out_ours, out_plain)
    out_ours.square().sum().backward()
    out_plain.square().sum().backward()
    for p_ours, p_plain in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(p_ours.grad, p_plain.grad)
    assert isinstance(ours[0], mf.FusedLinearReLU) and type(ours[-1]) is nn.Linear


def test_mlp_rejects_bad_sizes():
    with pytest.raises(ValueError, match="sizes"):
        mf.MLP([4])
    with pytest.raises(ValueError, match="sizes"):
        mf.MLP([4, 0, 2])


def test_fused_layer_rejects_wrong_features():
    layer = mf.FusedLinearReLU(3, 4)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 3\]"):
        layer(torch.randn(2, 6))


def test_fuse_keeps_outputs_weights_and_keys():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    nested = nn.ModuleDict({"body": model})
    x = torch.randn(50, 6)
    before = model(x)
    keys = list(nested.state_dict())
    weight = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert mf.fuse(nested) is nested
    assert isinstance(model[0], mf.FusedLinearReLU) and isinstance(model[2], mf.FusedLinearReLU)
    assert isinstance(model[1], nn.Identity) and type(model[4]) is nn.Linear
    assert model[0].weight is weight  # the same Parameter: the optimizer still updates the model
    assert list(nested.state_dict()) == keys
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    model(x).sum().backward()
    optimizer.step()
    assert not torch.equal(model(x), before)


def test_fuse_leaves_other_pairs_alone():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
    mf.fuse(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_gives_eager_result(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = mf.MLP([5, 16, 16, 3])
    x = torch.randn(8, 5)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x), eager)
    # and its gradients
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_the_papers_two_networks_and_standardize():
    from torch import nn

    from metalearn_fast.nn import Standardize, batchnorm_mlp, conv4

    net = conv4(3, 5, hidden=8)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(3, 8, (3, 3), (2, 2))] + [(8, 8, (3, 3), (2, 2))] * 3
    assert all(not m.track_running_stats for m in net if isinstance(m, nn.BatchNorm2d))
    assert net(torch.rand(4, 3, 28, 28)).shape == (4, 5)
    # with the image size, a side is halved only while wider than 2 pixels: 28x28 keeps the paper's strides
    def strides(size):
        return [c.stride for c in conv4(1, 5, hidden=8, image_size=size) if isinstance(c, nn.Conv2d)]

    assert strides((28, 28)) == [(2, 2)] * 4
    assert strides((8, 8)) == [(2, 2), (2, 2), (1, 1), (1, 1)]
    assert strides((8, 28)) == [(2, 2), (2, 2), (1, 2), (1, 2)]
    tiny = conv4(1, 5, hidden=8, image_size=(8, 8))
    assert tiny[:-3](torch.rand(2, 1, 8, 8)).shape == (2, 8, 2, 2)
    mlp = batchnorm_mlp([10, 7, 6, 3])
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)] == [(10, 7), (7, 6), (6, 3)]
    assert [type(m).__name__ for m in mlp][-4:] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    mean, std = torch.tensor([[[0.5]], [[1.0]]]), torch.tensor([[[2.0]], [[4.0]]])
    x = torch.rand(3, 2, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 2.0, (x[:, 1] - 1.0) / 4.0], 1)
    torch.testing.assert_close(Standardize(mean, std)(x), expected)
    assert set(Standardize(mean, std).state_dict()) == {"mean", "std"}
