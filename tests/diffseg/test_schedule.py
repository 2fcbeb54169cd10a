"""Variance schedule, posterior and DDIM maths of ImgX-DiffSeg (spec §2, §8 items 4-6, §9)."""

from __future__ import annotations

import math

import pytest
import torch

from common.schedulers import DiffSegScheduler, resampled_linear_betas, warmup_cosine_lambda

# spec §2 table (resampled from linear(1e-4, 0.02, 1001) at indices {0, 250, 500, 750, 1000})
BETAS = [1.0000e-4, 0.478198, 0.850518, 0.957446, 0.987962]
ABAR = [0.9999, 0.521750, 0.0779923, 3.31891e-3, 3.9952e-5]
SQRT_ABAR = [0.99995, 0.72232, 0.27927, 0.057610, 0.0063208]


def test_five_step_table_matches_spec():
    s = DiffSegScheduler(num_timesteps=5, beta_start=1e-4, beta_end=0.02, num_timesteps_beta=1001)
    assert len(s.betas) == 5 and len(s.alphas_cumprod) == 5
    torch.testing.assert_close(s.betas, torch.tensor(BETAS, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(ABAR, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(s.alphas_cumprod.sqrt(), torch.tensor(SQRT_ABAR, dtype=torch.float64), rtol=1e-4, atol=0)
    # 1 - abar_0 = beta'_0
    assert math.isclose(1.0 - float(s.alphas_cumprod[0]), float(s.betas[0]), rel_tol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 5, 10, 1001])
def test_schedule_has_exactly_T_entries(T):
    betas = resampled_linear_betas(T)
    assert betas.shape == (T,)  # the first official release produced 4 betas for 5 steps
    assert bool((betas > 0).all()) and bool((betas < 1).all())


def test_full_length_schedule_is_the_linear_one():
    torch.testing.assert_close(resampled_linear_betas(1001), torch.linspace(1e-4, 0.02, 1001, dtype=torch.float64))


def test_mask_encoding_and_prediction_mapping():
    label = torch.randint(0, 4, (2, 1, 5, 6, 7))
    x0 = DiffSegScheduler.mask_to_x0(label, 4)
    assert x0.shape == (2, 4, 5, 6, 7)
    assert set(torch.unique(x0).tolist()) == {-1.0, 1.0}
    assert torch.equal(x0.argmax(1, keepdim=True), label)
    x0_hat = DiffSegScheduler.logits_to_x0(torch.randn(2, 4, 5, 6, 7))
    torch.testing.assert_close(x0_hat.sum(1), torch.full((2, 5, 6, 7), 2.0 - 4))


def test_posterior_mean_at_step_zero_is_the_prediction_and_noise_free():
    s = DiffSegScheduler()
    x0_hat, x_k = torch.rand(1, 3, 4, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4, 4)
    assert torch.equal(s.posterior_mean(x0_hat, x_k, 0), x0_hat)
    assert s.posterior_std(0) == 0.0
    assert torch.equal(s.step(x0_hat, x_k, 0, "ddpm", generator=torch.Generator().manual_seed(1)), x0_hat)


def test_posterior_coefficients_and_fixed_large_variance():
    s = DiffSegScheduler()
    k = 2
    ab, ab_prev, b = float(s.alphas_cumprod[k]), float(s.alphas_cumprod[k - 1]), float(s.betas[k])
    x0_hat, x_k = torch.ones(1, 2, 2, 2, 2, dtype=torch.float64), torch.full((1, 2, 2, 2, 2), 3.0, dtype=torch.float64)
    expect = math.sqrt(ab_prev) * b / (1 - ab) * 1.0 + math.sqrt(1 - b) * (1 - ab_prev) / (1 - ab) * 3.0
    torch.testing.assert_close(s.posterior_mean(x0_hat, x_k, k), torch.full_like(x_k, expect))
    assert math.isclose(s.posterior_std(k), math.sqrt(b))
    # q_sample with zero noise scales by sqrt(abar)
    torch.testing.assert_close(s.q_sample(x0_hat, k, torch.zeros_like(x0_hat)), x0_hat * math.sqrt(ab))


def test_ddim_eta_zero_is_deterministic_and_consistent():
    s = DiffSegScheduler()
    x0_hat, x_k = torch.rand(1, 3, 4, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4, 4)
    a = s.step(x0_hat, x_k, 3, "ddim", eta=0.0, generator=torch.Generator().manual_seed(0))
    b = s.step(x0_hat, x_k, 3, "ddim", eta=0.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    # eta = 0: x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1}) eps_hat (sqrt on abar_prev: issue #5)
    eps = s.predict_epsilon_from_x0(x_k, 3, x0_hat)
    ab_prev = float(s.alphas_cumprod[2])
    torch.testing.assert_close(a, math.sqrt(ab_prev) * x0_hat + math.sqrt(1 - ab_prev) * eps)
    # eta > 0 uses sigma as a standard deviation
    ab = float(s.alphas_cumprod[3])
    sigma = math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    assert math.isclose(s.ddim_std(3, 1.0), sigma)
    assert not torch.equal(s.step(x0_hat, x_k, 3, "ddim", eta=1.0, generator=torch.Generator().manual_seed(0)), a)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.3)])
def test_stochastic_step_is_the_textbook_update_with_the_generator_noise_and_keeps_its_inputs(sampler, eta):
    # the step accumulates the update in place into its noise tensor: same value as the plain formula, inputs
    # untouched, gradients still reach the prediction (training steps through it)
    s = DiffSegScheduler()
    k = 3
    x0_hat = (torch.rand(2, 4, 5, 6, 7) * 2 - 1).requires_grad_()
    x_k = torch.randn(2, 4, 5, 6, 7)
    x0_copy, xk_copy = x0_hat.detach().clone(), x_k.clone()
    out = s.step(x0_hat, x_k, k, sampler, eta=eta, generator=torch.Generator().manual_seed(7))
    z = torch.randn(x_k.shape, generator=torch.Generator().manual_seed(7))
    if sampler == "ddpm":
        expect = s.posterior_mean(x0_copy, x_k, k) + s.posterior_std(k) * z
    else:
        ab_prev, sigma = float(s.alphas_cumprod_prev[k]), s.ddim_std(k, eta)
        eps = s.predict_epsilon_from_x0(x_k, k, x0_copy)
        expect = math.sqrt(ab_prev) * x0_copy + math.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(x0_hat.detach(), x0_copy) and torch.equal(x_k, xk_copy)
    out.sum().backward()
    assert x0_hat.grad is not None and float(x0_hat.grad.abs().min()) > 0
    # the probabilities' mapping keeps its gradient too (its "- 1" is applied in place)
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    (DiffSegScheduler.logits_to_x0(logits)[:, 0] ** 2).sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().max()) > 0


def test_epsilon_and_x0_conversions_are_inverse():
    s = DiffSegScheduler()
    x0, eps = torch.rand(2, 3, 4, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4, 4)
    k = torch.tensor([1, 3])
    x_k = s.q_sample(x0, k, eps)
    torch.testing.assert_close(s.predict_epsilon_from_x0(x_k, k, x0), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.predict_x0_from_epsilon(x_k, k, eps), x0, rtol=1e-3, atol=1e-3)


def test_warmup_cosine_learning_rate():
    fn = warmup_cosine_lambda(100, 10_000, 1e-5, 1e-4, 1e-6)
    assert math.isclose(fn(0) * 1e-4, 1e-5)
    assert math.isclose(fn(100) * 1e-4, 1e-4)
    mid = 100 + 9_900 // 2
    assert math.isclose(fn(mid) * 1e-4, 1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (mid - 100) / 9_900)))
    assert math.isclose(fn(10_000) * 1e-4, 1e-6) and math.isclose(fn(20_000) * 1e-4, 1e-6)


def test_draws_noise_says_which_steps_use_z_and_a_given_z_is_the_one_drawn():
    sched = DiffSegScheduler()
    assert [sched.draws_noise(k) for k in range(5)] == [False, True, True, True, True]  # DDPM: all but the last
    assert not any(sched.draws_noise(k, "ddim", 0.0) for k in range(5))  # deterministic DDIM
    assert [sched.draws_noise(k, "ddim", 0.5) for k in range(5)] == [False, True, True, True, True]
    x0_hat, x_k = torch.rand(1, 3, 4, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4, 4)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
        drawn = sched.step(x0_hat, x_k, 3, sampler, eta, torch.Generator().manual_seed(5))
        given = sched.step(x0_hat, x_k, 3, sampler, eta, None,
                           noise=torch.randn(x_k.shape, generator=torch.Generator().manual_seed(5)))
        assert torch.equal(drawn, given)
