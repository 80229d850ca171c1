"""Values cached from tensors (ops/_memo.py) answer only inside a memo scope (an attack): writes through ``.data``,
which do not move a tensor's version counter (EMA teachers, ``vector_to_parameters``), are always seen outside one."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import urda_fast.models.conv as conv_module
import urda_fast.ops as ops
from urda_fast.attacks import PGD
from urda_fast.models import use_fast_batch_norm, use_fast_conv
from urda_fast.ops._memo import VersionedMemo, memo_scope


def test_entries_answer_only_in_the_scope_that_stored_them():
    memo, t = VersionedMemo(), torch.zeros(3)
    memo.put((t,), "outside")
    assert memo.get((t,)) is None and not memo.entries  # outside a scope nothing is stored
    with memo_scope():
        memo.put((t,), "first")
        with memo_scope():  # nested: joins the outer scope
            assert memo.get((t,)) == "first"
        t.add_(1)
        assert memo.get((t,)) is None  # an in-place change
        memo.put((t,), "second")
        assert memo.get((t,)) == "second"
    assert memo.get((t,)) is None
    with memo_scope():
        assert memo.get((t,)) is None  # an ended scope's entry
        memo.put((torch.ones(1),), "other")
        assert len(memo.entries) == 1  # the ended scope's entry was dropped


def test_batch_norm_eval_sees_statistics_changed_through_data():
    x, mean, var = torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3)
    ops.batch_norm_eval(x, mean, var)
    var.data.fill_(4.0)
    torch.testing.assert_close(ops.batch_norm_eval(x, mean, var), F.batch_norm(x, mean, var, training=False))


def test_fast_sequential_sees_an_ema_update_through_data():
    torch.manual_seed(0)
    net = use_fast_batch_norm(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())).eval()
    net.requires_grad_(False)
    x = torch.rand(8, 3, 32, 32)  # 131072 elements in the BatchNorm: the fused path
    net(x)
    net[1].weight.data.mul_(0.5)
    net[1].running_var.data.mul_(3.0)
    want = F.relu(F.batch_norm(net[0](x), net[1].running_mean, net[1].running_var, net[1].weight, net[1].bias))
    torch.testing.assert_close(net(x), want)


def test_fast_conv_sees_weights_replaced_by_vector_to_parameters():
    torch.manual_seed(0)
    net = use_fast_conv(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))).eval().requires_grad_(False)
    z = torch.randn(2, 4, 1, 1)  # a single output position: the cached-window path
    net(z)
    torch.nn.utils.vector_to_parameters(torch.randn(4 * 4 * 9 + 4), net.parameters())
    torch.testing.assert_close(net(z), F.conv2d(z, net[0].weight, net[0].bias, padding=1))


def test_pgd_step_checks_bounds_changed_through_data():
    lower, upper, x = torch.zeros(3), torch.ones(3), torch.rand(2, 3, 4, 4)
    ops.pgd_step(x, torch.randn_like(x), x, step_size=0.1, eps=0.1, lower=lower, upper=upper)
    lower.data.fill_(2.0)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        ops.pgd_step(x, torch.randn_like(x), x, step_size=0.1, eps=0.1, lower=lower, upper=upper)


def test_an_attack_copies_a_frozen_weight_once_for_all_its_steps(monkeypatch):
    torch.manual_seed(0)
    model = use_fast_conv(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                                        nn.Flatten())).eval()
    puts = []
    put = conv_module._WINDOW_WEIGHTS.put
    monkeypatch.setattr(conv_module._WINDOW_WEIGHTS, "put", lambda *args: puts.append(1) or put(*args))
    x, y = torch.rand(5, 3, 3, 3), torch.randint(0, 4, (5,))  # 1x1 output maps: both convs take the window path
    PGD(model, eps=8 / 255, alpha=2 / 255, steps=6, random_start=False)(x, y)
    assert len(puts) == 2  # one copy of each conv's taps, reused by the other five steps
    PGD(model, eps=8 / 255, alpha=2 / 255, steps=6, random_start=False)(x, y)
    assert len(puts) == 4  # a new attack, a new scope: copied again (the weights may have changed in between)


def test_eval_after_a_fused_sgd_step_and_a_train_forward_sees_the_new_model():
    """The training loop's updates move no version counter: torch's fused SGD and a train-mode BatchNorm's running
    statistics. An attack or evaluation after them must see the new model (it saw the first one's constants)."""
    from urda_fast.optim import sgd

    torch.manual_seed(0)
    net = use_fast_batch_norm(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                            nn.Flatten(), nn.Linear(16 * 32 * 32, 4)))
    plain = nn.Sequential(*net)  # the same modules through torch's layers
    optimizer = sgd(net.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,))
    attack = PGD(net, eps=8 / 255, alpha=2 / 255, steps=2, random_start=False)
    for _ in range(3):
        net.eval()
        torch.testing.assert_close(net(x), plain(x))
        x_adv = attack(x, y)
        torch.testing.assert_close(x_adv, PGD(plain, eps=8 / 255, alpha=2 / 255, steps=2, random_start=False)(x, y))
        net.train()
        optimizer.zero_grad()
        F.cross_entropy(net(x_adv * 3), y).backward()  # a shifted batch: the running statistics move
        optimizer.step()


def test_threads_keep_their_own_entries():
    """Scopes are per thread; a shared dict was changed by one thread while another iterated it ("dictionary
    changed size during iteration" from attacks run in parallel threads)."""
    import threading

    memo, errors = VersionedMemo(max_entries=4), []

    def work(seed):
        try:
            tensors = [torch.full((2,), float(seed)) for _ in range(50)]
            with memo_scope():
                for t in tensors:
                    memo.put((t,), seed)
                    assert memo.get((t,)) == seed
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
