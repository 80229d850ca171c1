"""The training loop's SGD (urda_fast.optim.sgd): torch's fused kernel, the same trajectory as torch's default SGD."""

import pytest
import torch

from urda_fast.optim import sgd


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def _trajectory(make, steps=6, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).to(device)
    groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters()}]  # as DART's 0.1x
    optimizer = make(groups)
    x, y = torch.randn(16, 5, device=device), torch.randint(0, 3, (16,), device=device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov, weight_decay", [(True, 1e-3), (False, 0.0)])
def test_fused_sgd_follows_torchs_default_sgd(nesterov, weight_decay, device):
    options = dict(lr=0.1, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
    ours, ours_opt = _trajectory(lambda groups: sgd(groups, **options), device=device)
    ref, ref_opt = _trajectory(lambda groups: torch.optim.SGD(groups, **options, foreach=False), device=device)
    assert ours_opt.defaults["fused"] and not ref_opt.defaults.get("fused")
    assert [g["lr"] for g in ours_opt.param_groups] == [0.01, 0.1]
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # a float rounding apart (FMA), never a rule apart
    # the state dicts are interchangeable, so checkpoints of either kind resume with the other
    ref_opt.load_state_dict(ours_opt.state_dict())
    for p in ref.parameters():
        torch.testing.assert_close(ref_opt.state[p]["momentum_buffer"],
                                   ours_opt.state[dict(zip(ref.parameters(), ours.parameters()))[p]]["momentum_buffer"])


def test_fused_only_where_torch_has_the_kernel():
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert not sgd([meta], lr=0.1).defaults.get("fused")  # torch would refuse it only at the first step
    assert sgd(iter([torch.nn.Parameter(torch.zeros(3))]), lr=0.1).defaults["fused"]  # generators are fine


@pytest.mark.parametrize("skipped", [(0,), (0, 1, 4), ()])
def test_steps_that_fp16s_scaler_skips_leave_the_update_of_torchs_sgd(skipped):
    """A first step skipped by the GradScaler (its gradients overflowed) left the fused kernel's momentum buffer
    uninitialised: the next step read garbage (weights of 1e25). The loop's SGD gives torch's default update."""
    from urda_fast.optim import sgd

    def run(make):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000))
        optimizer = make([p])
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        g = torch.Generator().manual_seed(1)
        for step in range(8):
            optimizer.zero_grad(set_to_none=True)
            loss = ((p - torch.randn(1000, generator=g)) ** 2).sum() * (float("inf") if step in skipped else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return p.detach()

    settings = dict(lr=0.01, momentum=0.9, weight_decay=1e-3, nesterov=True)
    ours = run(lambda params: sgd(params, **settings))
    torch.testing.assert_close(ours, run(lambda params: torch.optim.SGD(params, **settings)), rtol=1e-6, atol=1e-7)
