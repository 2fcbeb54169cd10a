"""Vector quantisers of the shared VQ-GAN: nearest code, straight-through, VQ loss, EMA codebook."""

from __future__ import annotations

import torch

from common.networks.quantizers import EMAVectorQuantizer, VectorQuantizer3D, codebook_usage


# exact pairwise distances (the matrix-product shortcut loses ~1e-4 on small distances)
EXACT = "donot_use_mm_for_euclid_dist"


def _rows(z: torch.Tensor) -> torch.Tensor:
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def test_vq_outputs_are_nearest_codebook_rows():
    torch.manual_seed(0)
    q = VectorQuantizer3D(num_embeddings=16, embedding_dim=3)
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 3, 4, 4, 2)
    z_q, _, stats = q(z)
    idx = torch.cdist(_rows(z), q.embedding.weight, compute_mode=EXACT).argmin(1)
    assert torch.equal(stats["indices"].reshape(-1), idx)
    assert torch.allclose(_rows(z_q), q.embedding.weight[idx], atol=1e-6)
    assert z_q.shape == z.shape and stats["indices"].shape == (2, 4, 4, 2)


def test_vq_codebook_init_is_uniform_in_one_over_k():
    q = VectorQuantizer3D(num_embeddings=64, embedding_dim=3)
    w = q.embedding.weight
    assert w.abs().max() <= 1 / 64 and w.std() > 0.2 / 64  # spread over U(-1/K, 1/K), not zeros


def test_vq_straight_through_gradient_is_identity():
    torch.manual_seed(1)
    q = VectorQuantizer3D(num_embeddings=8, embedding_dim=2)
    z = torch.randn(1, 2, 3, 3, 3, requires_grad=True)
    z_q, _, _ = q(z)
    g = torch.randn_like(z)
    (z_q * g).sum().backward()
    assert torch.allclose(z.grad, g)


def test_vq_loss_beta_on_commitment_and_codebook_gradient_from_first_term():
    torch.manual_seed(2)
    beta = 0.25
    q = VectorQuantizer3D(num_embeddings=8, embedding_dim=2, beta=beta)
    q.embedding.weight.data.normal_()
    z = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    z_q, loss, stats = q(z)
    e = z_q.detach()
    n = z.numel()
    assert torch.allclose(loss, (1 + beta) * ((z.detach() - e) ** 2).mean(), atol=1e-6)
    loss.backward()
    # dL/dz = 2 beta (z - e) / N: only the commitment term reaches the encoder
    assert torch.allclose(z.grad, 2 * beta * (z.detach() - e) / n, atol=1e-6)
    # dL/de_k = sum over vectors assigned to k of 2 (e_k - z) / N: weight 1, not beta
    expected = torch.zeros_like(q.embedding.weight)
    expected.index_add_(0, stats["indices"].reshape(-1), 2 * (_rows(e) - _rows(z.detach())) / n)
    assert torch.allclose(q.embedding.weight.grad, expected, atol=1e-6)


def test_codebook_usage_statistics():
    one = codebook_usage(torch.zeros(10, dtype=torch.long), 8)
    assert one["perplexity"].item() == 1.0 and one["codebook_used"].item() == 1
    four = codebook_usage(torch.arange(4).repeat(5), 8)
    assert abs(four["perplexity"].item() - 4.0) < 1e-5 and four["codebook_used"].item() == 4
    skew = codebook_usage(torch.tensor([0, 0, 0, 1]), 8)
    assert 1.0 < skew["perplexity"].item() < 2.0


def test_codebook_mean_std_and_lookup_without_update():
    q = EMAVectorQuantizer(num_embeddings=4, embedding_dim=2, data_init=False)
    q.embedding.weight.data.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]))
    mean, std = q.codebook_mean_std()
    assert mean == 3.5 and abs(std - torch.arange(8.0).std().item()) < 1e-6
    before = q.embedding.weight.clone()
    z = torch.tensor([5.9, 7.2]).view(1, 2, 1, 1, 1)
    z_q, idx = q.lookup(z)  # training mode, but lookup never updates
    assert idx.item() == 3 and torch.equal(z_q.view(2), before[3])
    assert torch.equal(q.embedding.weight, before)


def test_ema_data_dependent_init_equals_encoder_outputs():
    torch.manual_seed(3)
    q = EMAVectorQuantizer(num_embeddings=6, embedding_dim=3, decay=1.0, restart_threshold=None)
    z = torch.randn(1, 3, 4, 2, 2)  # 16 vectors >= K
    assert not bool(q.initialized)
    q.train()
    q(z)
    rows = _rows(z)
    # decay 1 freezes the EMA, so the codebook is exactly the initialisation: 6 distinct encoder outputs
    hits = torch.cdist(q.embedding.weight, rows, compute_mode=EXACT).min(1).values
    assert torch.all(hits < 1e-6)
    assert len({tuple(r.tolist()) for r in q.embedding.weight}) == 6
    assert bool(q.initialized) and torch.all(q.ema_cluster_size == 1.0)
    # no second initialisation
    cb = q.embedding.weight.clone()
    q(torch.randn(1, 3, 4, 2, 2) + 50)
    assert torch.equal(q.embedding.weight, cb)


def test_ema_update_formula_two_codes_by_hand():
    q = EMAVectorQuantizer(num_embeddings=2, embedding_dim=1, decay=0.99, epsilon=0.0, data_init=False)
    q.embedding.weight.data.copy_(torch.tensor([[0.0], [10.0]]))
    q.ema_w.data.copy_(torch.tensor([[0.0], [10.0]]))
    q.ema_cluster_size.data.fill_(1.0)
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 3, 1, 1)
    q.train()
    z_q, loss, stats = q(z)
    # assignments 1, 2 -> code 0 and 9 -> code 1; output and loss use the codebook before the update
    assert torch.equal(z_q.view(-1), torch.tensor([0.0, 0.0, 10.0]))
    assert abs(loss.item() - 0.25 * (1 + 4 + 1) / 3) < 1e-6
    # N = 0.99 * 1 + 0.01 * [2, 1]; m = 0.99 * [0, 10] + 0.01 * [3, 9]; e = m / N
    assert torch.allclose(q.ema_cluster_size, torch.tensor([1.01, 1.0]))
    assert torch.allclose(q.ema_w.view(-1), torch.tensor([0.03, 9.99]))
    assert torch.allclose(q.embedding.weight.view(-1), torch.tensor([0.03 / 1.01, 9.99]), atol=1e-6)
    assert stats["restarted"].item() == 0


def test_ema_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(4)
    q = EMAVectorQuantizer(num_embeddings=4, embedding_dim=2, data_init=False, restart_threshold=1.0)
    far = torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]])
    q.embedding.weight.data.copy_(far)
    q.ema_w.data.copy_(far)
    q.ema_cluster_size.data.fill_(1.0)
    z = torch.randn(1, 2, 4, 4, 1) * 0.1  # all near code 0
    q.train()
    _, _, stats = q(z)
    assert stats["restarted"].item() == 3
    rows = _rows(z)
    dist_to_inputs = torch.cdist(q.embedding.weight[1:], rows, compute_mode=EXACT).min(1).values
    assert torch.all(dist_to_inputs < 1e-5)  # dead entries now hold encoder outputs
    # the used entry follows the EMA, it is not re-seeded
    assert q.ema_cluster_size[0] > 1.0
    # the EMA sum of a restarted entry is consistent with its new value
    n = q.ema_cluster_size.sum()
    smoothed = (q.ema_cluster_size + q.epsilon) / (n + 4 * q.epsilon) * n
    assert torch.allclose(q.ema_w[1:] / smoothed[1:, None], q.embedding.weight[1:], atol=1e-5)


def test_ema_eval_mode_does_not_touch_the_codebook():
    torch.manual_seed(5)
    q = EMAVectorQuantizer(num_embeddings=4, embedding_dim=2)
    q.eval()
    before = q.embedding.weight.clone()
    q(torch.randn(1, 2, 3, 3, 3))
    assert torch.equal(q.embedding.weight, before) and not bool(q.initialized)
