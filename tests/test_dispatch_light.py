"""The light eager dispatch (ops/_dispatch.light): in plain eager mode the public ops run the
custom ops' forward/backward functions through a torch.autograd.Function instead of
torch.library's machinery. Both routes must compute exactly the same thing (bit-identical
forward and gradients, every backend case), the light route must be the one taken in eager
mode, and everything that traces or transforms must still get the custom ops."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_cases

import recon_kernels as rk
from recon_kernels.ops import _dispatch


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*s, grad=True):
        return torch.randn(*s, generator=g).to(device).requires_grad_(grad)

    q, k, v = r(2, 3, 17, 40), r(2, 3, 17, 40), r(2, 3, 17, 40)
    mask = torch.rand(1, 3, 17, 17, generator=g).to(device) > 0.3
    mask[..., 4, :] = False  # a fully masked row
    kpm = torch.ones(2, 17, dtype=torch.bool, device=device)
    kpm[1, 11:] = False
    x, w1, b1, w2, b2 = r(3, 7, 24), r(72, 24), r(72), r(24, 72), r(24)
    w, a, b = r(20, 24, grad=False), r(5, 24), r(20, 5)
    return {
        "attention": ((q, k, v), lambda bk: rk.masked_softmax_attention(q, k, v, backend=bk)),
        "masked": (
            (q, k, v),
            lambda bk: rk.masked_softmax_attention(q, k, v, mask, key_padding_mask=kpm, backend=bk),
        ),
        "causal_dropout": (
            (q, k, v),
            lambda bk: rk.causal_attention(q, k, v, dropout_p=0.25, backend=bk),
        ),
        "mlp": (
            (x, w1, b1, w2, b2),
            lambda bk: rk.conv1d_mlp(x, w1, b1, w2, b2, activation="gelu_tanh", backend=bk),
        ),
        "lora": ((x, a, b), lambda bk: rk.lora_linear(x, w, None, a, b, 0.5, backend=bk)),
    }


_NAMES = ["attention", "masked", "causal_dropout", "mlp", "lora"]


def _run(fn, inputs, backend):
    torch.manual_seed(7)  # the dropout seed
    out = fn(backend)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad(out, inputs, dy)
    return out.detach(), grads, _graph_names(out)


@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("backend,device", [("eager", "cpu"), *kernel_cases()])
def test_light_and_custom_op_routes_agree_exactly(name, backend, device, monkeypatch):
    inputs, fn = _cases(device)[name]
    out_l, g_l, names_l = _run(fn, inputs, backend)
    monkeypatch.setattr(_dispatch, "LIGHT", False)
    out_c, g_c, names_c = _run(fn, inputs, backend)
    light = {n for n in names_l if n.startswith("_Light")}
    assert light, f"the light route was not taken: {names_l}"
    assert not {n for n in names_c if n.startswith("_Light")}, names_c
    assert any("recon" in n for n in names_c), names_c
    assert torch.equal(out_l, out_c)
    for gl, gc in zip(g_l, g_c):
        assert torch.equal(gl, gc)


def test_light_route_refuses_double_backward():
    """The backward kernels are not differentiable: a second-order gradient must raise, not
    silently come out wrong."""
    x = torch.randn(5, 8, requires_grad=True)
    w1, w2 = torch.randn(16, 8, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    y = rk.conv1d_mlp(x, w1, None, w2, None, activation="gelu", backend="eager")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


def test_tracing_takes_the_custom_ops():
    """Under a dispatch mode (fake tensors: what torch.compile and export trace with) and in
    torch.func transforms the light route is off."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(1, 2, 5, 8)
    assert _dispatch.light(q)
    with FakeTensorMode():
        assert not _dispatch.light(torch.empty(1))
    seen = []
    torch.func.grad(lambda t: (seen.append(_dispatch.light(t)), t.sum())[1])(q)
    assert seen == [False]

    class Sub(torch.Tensor):
        pass

    assert not _dispatch.light(q.as_subclass(Sub))
    assert _dispatch.light(torch.nn.Parameter(q), None)


def test_light_switch_env(monkeypatch):
    monkeypatch.setattr(_dispatch, "LIGHT", False)
    assert not _dispatch.light(torch.randn(2))
