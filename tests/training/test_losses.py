"""Loss terms and schedules of the training recipe on hand-made tensors with known values."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.losses import (
    DinoHead,
    SelfDistillationLoss,
    clip_contrastive_loss,
    cosine_schedule,
    ema_update_,
    teacher_temperature,
    warmup_cosine_factor,
)


def test_clip_loss_matched_and_swapped_pairs():
    eye = torch.eye(2)
    # logits = identity: each row's cross-entropy is log(1 + e^-1)
    assert clip_contrastive_loss(eye, eye, torch.tensor(1.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # swapped texts: the correct pair has the lower logit -> log(1 + e)
    swapped = eye.flip(0)
    assert clip_contrastive_loss(eye, swapped, torch.tensor(1.0)).item() == pytest.approx(math.log(1 + math.e))
    # the logit scale sharpens: scale 10 on matched pairs -> log(1 + e^-10)
    assert clip_contrastive_loss(eye, eye, torch.tensor(10.0)).item() == pytest.approx(math.log(1 + math.exp(-10)), rel=1e-3)


def test_clip_loss_is_symmetric_mean_of_both_directions():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    logits = 3.0 * img @ txt.T
    labels = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert clip_contrastive_loss(img, txt, torch.tensor(3.0)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_loss_known_value_and_skips_same_view():
    loss_fn = SelfDistillationLoss(2, student_temp=1.0, center_momentum=0.9)
    loss_fn.center_ready.fill_(True)  # centre of zeros
    uniform_teacher = torch.zeros(1, 2)  # softmax -> [0.5, 0.5]
    student = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [1/4, 3/4]
    expected = 0.5 * (math.log(4) + math.log(4 / 3))
    value = loss_fn([student, student], [uniform_teacher], teacher_temp=1.0)
    assert value.item() == pytest.approx(expected)
    # student view 0 is the teacher's own crop: changing it must not change the loss
    confident = torch.tensor([[0.0, 50.0]])
    assert loss_fn([confident, student], [uniform_teacher], 1.0).item() == pytest.approx(expected)
    # ... but changing view 1 does
    assert loss_fn([student, confident], [uniform_teacher], 1.0).item() != pytest.approx(expected)


def test_distillation_loss_uses_centre_and_teacher_temperature():
    loss_fn = SelfDistillationLoss(2, student_temp=1.0)
    loss_fn.center_ready.fill_(True)  # centre of zeros
    teacher = torch.tensor([[1.0, 0.0]])
    student = torch.tensor([[0.0, 0.0]])  # uniform student: CE = log 2 whatever the target
    assert loss_fn([student, student], [teacher], 0.5).item() == pytest.approx(math.log(2))
    student = torch.tensor([[math.log(3.0), 0.0]])  # [3/4, 1/4]
    # sharpened teacher (temp 0.01) is one-hot on class 0 -> CE = -log(3/4)
    assert loss_fn([student, student], [teacher], 0.01).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # a centre equal to the teacher output makes the target uniform
    loss_fn.center.copy_(teacher)
    assert loss_fn([student, student], [teacher], 0.01).item() == pytest.approx(0.5 * (math.log(4) + math.log(4 / 3)))


def test_centre_starts_at_the_first_batch_mean():
    """Targets of the first step are centred like every later one: the outputs' shared part is not a target."""
    loss_fn = SelfDistillationLoss(3, student_temp=1.0)
    teacher = torch.tensor([[5.0, 1.0, 0.0], [5.0, 0.0, 1.0]])  # shared peak on prototype 0
    target = loss_fn.teacher_targets([teacher], teacher_temp=0.01)[0]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[5.0, 0.5, 0.5]]))
    torch.testing.assert_close(target, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    loss_fn.teacher_targets([torch.zeros(1, 3)], teacher_temp=0.01)  # later batches leave the centre to the EMA
    torch.testing.assert_close(loss_fn.center, torch.tensor([[5.0, 0.5, 0.5]]))


def test_centre_update_is_an_ema_of_batch_means():
    loss_fn = SelfDistillationLoss(3, center_momentum=0.9)
    first = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean [2, 2, 2]
    loss_fn.update_center(first)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.2, 0.2]]))
    second = torch.tensor([[10.0, 0.0, 0.0]])
    loss_fn.update_center(second)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * 0.2 + 1.0, 0.18, 0.18]]))


def test_dino_head_shapes_and_weight_normalised_prototypes():
    torch.manual_seed(0)
    head = DinoHead(16, 32, hidden_dim=24, bottleneck_dim=8, n_layers=3)
    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (5, 32)
    assert out.abs().max() <= 1.0 + 1e-6  # cosine of unit vectors
    with torch.no_grad():
        head.prototypes.mul_(7.0)  # only the direction of each prototype matters
    torch.testing.assert_close(head(x), out)
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3


def test_ema_update_exact_values():
    teacher = torch.nn.Linear(2, 1)
    student = torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 1.0]]))
        teacher.bias.fill_(0.0)
        student.weight.copy_(torch.tensor([[3.0, -1.0]]))
        student.bias.fill_(2.0)
    ema_update_(teacher, student, 0.75)
    torch.testing.assert_close(teacher.weight, torch.tensor([[1.5, 0.5]]))
    torch.testing.assert_close(teacher.bias, torch.tensor([0.5]))
    torch.testing.assert_close(student.weight, torch.tensor([[3.0, -1.0]]))  # the student is untouched


def test_schedules():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(500, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(3, 0, 0.04, 0.07) == pytest.approx(0.07)
    assert warmup_cosine_factor(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine_factor(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine_factor(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine_factor(20, 4, 20, min_factor=0.1) == pytest.approx(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, img, txt, teacher_out, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows = slice(rank * 2, rank * 2 + 2)
        local_img = img[rows].clone().requires_grad_(True)
        loss = clip_contrastive_loss(local_img, txt[rows], torch.tensor(2.0), rank=rank, world_size=world_size)
        loss.backward()
        loss_fn = SelfDistillationLoss(4, center_momentum=0.5)
        loss_fn.update_center(teacher_out[rows])
        results[rank] = (loss.item(), local_img.grad.clone(), loss_fn.center.clone())
    finally:
        dist.destroy_process_group()


def test_ddp_gathered_losses_match_the_global_batch():
    """Two gloo ranks with two rows each: the mean rank loss equals the 4-row loss; the centre is global."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 6), dim=-1)
    txt = F.normalize(torch.randn(4, 6), dim=-1)
    teacher_out = torch.randn(4, 4)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(2, _free_port(), img, txt, teacher_out, results), nprocs=2, join=True)
    full = clip_contrastive_loss(img, txt, torch.tensor(2.0))
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    expected_center = 0.5 * teacher_out.mean(dim=0, keepdim=True)
    torch.testing.assert_close(results[0][2], expected_center)
    torch.testing.assert_close(results[1][2], expected_center)
    # gradients: DDP averages rank gradients, so rank grads / 2 must equal the full-batch gradient rows
    full_img = img.clone().requires_grad_(True)
    clip_contrastive_loss(full_img, txt, torch.tensor(2.0)).backward()
    rank_grads = torch.cat([results[0][1], results[1][1]])
    torch.testing.assert_close(rank_grads / 2, full_img.grad, rtol=1e-4, atol=1e-6)
