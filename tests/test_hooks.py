import torch
from torch import nn

from factedit.hooks import Hook, Hooks


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_record_input_and_output():
    net, x = make_net(), torch.randn(3, 4)
    with Hook(net[0], keep_input=True, keep_output=True) as h:
        net(x)
    assert torch.equal(h.input, x)
    assert torch.allclose(h.output, net[0](x))


def test_edit_output_and_input():
    net, x = make_net(), torch.randn(3, 4)
    with Hook(net[1], edit_output=torch.zeros_like):
        out = net(x)
    assert torch.allclose(out, net[2].bias.expand(3, -1))
    with Hook(net[0], edit_input=lambda t: t * 0):
        out = net(x)
    assert torch.allclose(out, net(torch.zeros(3, 4)))


def test_stop_ends_forward_early_and_hooks_are_removed():
    net, x = make_net(), torch.randn(3, 4)
    calls = []
    net[2].register_forward_hook(lambda *a: calls.append(1))
    with Hook(net[0], keep_output=True, stop=True) as h:
        net(x)
        assert False, "unreachable: the forward pass stops inside net(x)"
    assert h.output is not None and not calls
    net(x)
    assert calls == [1] and not net[0]._forward_hooks and not net[0]._forward_pre_hooks


def test_skip_replaces_computation_and_is_restored():
    net, x = make_net(), torch.randn(3, 4)
    expected = net(x)
    with Hook(net[0], skip=lambda inp: torch.ones(3, 4), keep_output=True) as h:
        out = net(x)
    assert torch.equal(h.output, torch.ones(3, 4))
    assert torch.allclose(out, net[2](net[1](torch.ones(3, 4))))
    assert torch.allclose(net(x), expected) and "forward" not in net[0].__dict__


def test_hooks_group_swallows_stop_from_any_member():
    net, x = make_net(), torch.randn(3, 4)
    with Hooks({"a": Hook(net[0], keep_output=True), "b": Hook(net[1], keep_output=True, stop=True)}) as hs:
        net(x)
    assert hs["a"].output is not None and hs["b"].output is not None
