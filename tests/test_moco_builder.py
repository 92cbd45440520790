"""The MoCo math: queue, momentum encoder, shuffle-BN, loss."""
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.nets.models import build_backbone
from moco.builder import MoCo
from moco.split_bn import SplitBatchNorm


def tiny_moco(K=16, dim=8, m=0.9, T=0.07, mlp=False, symmetric=False, splits=2):
    torch.manual_seed(0)
    norm = functools.partial(SplitBatchNorm, num_splits=splits) if splits > 1 else None
    return MoCo(functools.partial(build_backbone, "resnet18", small_images=False, norm_layer=norm),
                dim=dim, K=K, m=m, T=T, mlp=mlp, symmetric=symmetric)


def test_queue_enqueues_in_order_and_wraps():
    model = tiny_moco(K=8, dim=4)
    keys = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    model.dequeue_and_enqueue(keys[0])
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], keys[0].T)
    model.dequeue_and_enqueue(keys[1])
    assert int(model.queue_ptr) == 0  # wrapped
    assert torch.equal(model.queue[:, 4:], keys[1].T)
    model.dequeue_and_enqueue(keys[2])  # the oldest keys are replaced first
    assert torch.equal(model.queue[:, :4], keys[2].T)
    assert torch.equal(model.queue[:, 4:], keys[1].T)


def test_key_encoder_is_ema_of_query_encoder_and_gets_no_gradient():
    model = tiny_moco(m=0.9)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(x1, x2)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    opt.step()
    q_after = [p.detach().clone() for p in model.encoder_q.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(q_before, q_after)), "the query encoder must train"
    model(x1, x2)  # the next forward applies the momentum update first
    for k0, q1, k1 in zip(k_before, q_after, model.encoder_k.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q1)


def test_logits_shape_labels_and_loss_at_init():
    model = tiny_moco(K=64, dim=16, T=100.0)  # a large T makes every logit ~0
    q = F.normalize(torch.randn(8, 16), dim=1)
    k = F.normalize(torch.randn(8, 16), dim=1)
    logits, labels = model.contrastive_logits(q, k)
    assert logits.shape == (8, 1 + 64)
    assert torch.equal(labels, torch.zeros(8, dtype=torch.long))
    loss = F.cross_entropy(logits, labels)
    assert abs(loss.item() - math.log(1 + 64)) < 0.05
    # the positive logit is q.k / T, the negatives q.queue / T
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 100.0)
    torch.testing.assert_close(logits[:, 1:], q @ model.queue / 100.0)


def test_forward_enqueues_this_steps_keys():
    model = tiny_moco(K=16, dim=8, splits=1)  # plain BN: the key shuffle cannot change outputs
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x1, x2)
        model.encoder_k.train()
        # the keys enqueued are the (unshuffled) normalised key-encoder outputs of x2
        expected = model.compute_keys(x2)
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.queue[:, :4].T, expected, atol=1e-5, rtol=1e-4)


def test_symmetric_loss_enqueues_both_views():
    model = tiny_moco(K=16, dim=8, symmetric=True)
    loss, stats = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert int(model.queue_ptr) == 8
    assert loss.ndim == 0 and 0 <= stats["acc1"] <= 100


def test_mlp_head_and_state_dict_layout_match_reference():
    model = tiny_moco(mlp=True)
    keys = set(model.state_dict())
    assert {"queue", "queue_ptr", "encoder_q.fc.0.weight", "encoder_q.fc.2.weight",
            "encoder_k.conv1.weight"} <= keys


def test_split_batchnorm_normalises_each_group_separately():
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.randn(8, 3, 4, 4)
    x[0::2] += 10.0  # group 0 (even samples) has a different mean
    y = bn(x)
    for g in (0, 1):
        torch.testing.assert_close(y[g::2].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    # in eval mode it is a plain BatchNorm2d with the same state-dict keys
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()
    torch.testing.assert_close(bn(x), plain(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_batchnorm_batch_that_does_not_divide_by_the_splits(channels_last):
    """A batch of 9 in 2 groups (the last batch of a kNN pass on an odd image count): sample i
    stays in group i mod 2 (5 and 4 samples), each group normalised by its own statistics as a
    BatchNorm2d would, gradients flow, and the running statistics move by the size-weighted
    groups' statistics."""
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2)
    bn.weight.data.uniform_(0.5, 2.0)
    bn.bias.data.normal_()
    x = torch.randn(9, 3, 4, 4)
    x[0::2] += 10.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = bn(x)
    refs = [nn.BatchNorm2d(3) for _ in range(2)]
    for g, ref in enumerate(refs):
        ref.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}, strict=False)
        ref.running_mean.zero_(), ref.running_var.fill_(1.0)
        torch.testing.assert_close(y[g::2], ref(x[g::2].detach()))
    expected_mean = (5 * refs[0].running_mean + 4 * refs[1].running_mean) / 9
    expected_var = (5 * refs[0].running_var + 4 * refs[1].running_var) / 9
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and bn.weight.grad is not None
    # fewer samples than groups: the one sample is its own group
    one = bn(torch.randn(1, 3, 4, 4))
    torch.testing.assert_close(one.mean(dim=(0, 2, 3)), bn.bias.detach(), atol=1e-5, rtol=0)
