"""The shared 3D VQ-GAN: presets, shapes, parameter counts, gradients, same padding, training step."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from common.data.fetch import demo_file
from common.engines import StepTrainer
from common.engines.vqgan_step import VQGANTrainingStep
from common.networks.discriminators import aldm_discriminator, cldm_discriminators
from common.networks.vqgan import VQGAN
from common.networks.vqgan_blocks import SamePadConv3d, SamePadConvTranspose3d


# exact pairwise distances (the matrix-product shortcut loses ~1e-4 on small distances)
EXACT = "donot_use_mm_for_euclid_dist"


def _crop(key: str, size: int = 32) -> torch.Tensor:
    """Central ``size``^3 crop of a real avg152 template, min-max scaled to [0, 1], shape (size,)*3."""
    vol = np.asarray(nib.load(str(demo_file(key))).dataobj, dtype=np.float32)
    c = [s // 2 for s in vol.shape]
    h = size // 2
    crop = vol[c[0] - h : c[0] + h, c[1] - h : c[1] + h, c[2] - h : c[2] + h]
    crop = (crop - crop.min()) / (crop.max() - crop.min())
    return torch.from_numpy(np.ascontiguousarray(crop))


@pytest.fixture(scope="module")
def brain() -> dict[str, torch.Tensor]:
    """Real T1/T2/PD crops (32^3) of the avg152 templates."""
    return {m: _crop(f"spm/avg152{m.upper()}.nii") for m in ("t1", "t2", "pd")}


def _n_params(module: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if prefixes is None or n.startswith(prefixes))


# ----------------------------------------------------------------------------- shapes and sizes
def test_aldm_tiny_shapes_on_real_crop(brain):
    torch.manual_seed(0)
    net = VQGAN.aldm("tiny")
    x = brain["t1"][None, None]
    z = net.encode(x)
    assert z.shape == (1, 3, 8, 8, 8) and net.latent_shape((32, 32, 32)) == (3, 8, 8, 8)
    z_q = net.encode_quantized(x)
    assert z_q.shape == z.shape
    rec, vq_loss, stats = net(x)
    assert rec.shape == x.shape and vq_loss.ndim == 0 and torch.isfinite(vq_loss)
    assert {"perplexity", "codebook_used", "indices"} <= set(stats) and stats["indices"].shape == (1, 8, 8, 8)
    assert net.decode(z_q).shape == x.shape


def test_cldm_tiny_shapes_on_real_crops(brain):
    torch.manual_seed(0)
    x = torch.stack([brain["t1"], brain["t2"], brain["pd"]])[None].repeat(2, 1, 1, 1, 1)  # 3 "maps"
    net = VQGAN.cldm("tiny")  # noddi_sr spec tiny: embed 4
    assert net.encode(x).shape == (2, 4, 16, 16, 16)
    rec, _, _ = net(x)
    assert rec.shape == x.shape
    net8 = VQGAN.cldm("tiny", embed_dim=8)  # the paper's 8 latent channels at tiny width
    assert net8.encode(x).shape == (2, 8, 16, 16, 16) and net8(x)[0].shape == x.shape


def test_paper_scale_shapes_on_meta_device():
    # meta tensors give shapes without allocating or computing the paper-size volumes
    with torch.device("meta"):
        aldm = VQGAN.aldm("paper")
        z = aldm.encode(torch.empty(1, 1, 192, 192, 144))
        assert z.shape == (1, 3, 48, 48, 36) and aldm.decode(z).shape == (1, 1, 192, 192, 144)
        cldm = VQGAN.cldm("paper")
        z = cldm.encode(torch.empty(2, 3, 64, 64, 64))
        assert z.shape == (2, 8, 32, 32, 32) and cldm.decode(z).shape == (2, 3, 64, 64, 64)


def test_aldm_paper_parameter_counts():
    with torch.device("meta"):
        two_mid = _n_params(VQGAN.aldm("paper"), ("encoder.", "decoder."))
        one_mid = _n_params(VQGAN.aldm("paper", num_mid_blocks=1), ("encoder.", "decoder."))
        light = VQGAN.aldm("light")
    assert abs(two_mid / 1e6 - 237.5) < 0.1  # the paper's "param size 237M"
    assert abs(one_mid / 1e6 - 209.2) < 0.1  # ALDM v1's single mid block
    assert light.quantizer.num_embeddings == 8192 and light.embed_dim == 3 and light.downsample_factor == 4


def test_cldm_paper_layer_stack():
    with torch.device("meta"):
        net = VQGAN.cldm("paper")
    enc, dec = net.encoder, net.decoder
    assert (enc.conv_in.conv.in_channels, enc.conv_in.conv.out_channels) == (3, 64)
    down = enc.down[0].conv
    assert (down.in_channels, down.out_channels, down.kernel_size, down.stride) == (64, 128, (4, 4, 4), (2, 2, 2))
    assert (net.quant_conv.conv.in_channels, net.quant_conv.conv.out_channels) == (128, 8)
    up = dec.up[0].convt
    assert (up.in_channels, up.out_channels, up.kernel_size, up.stride) == (128, 64, (4, 4, 4), (2, 2, 2))
    assert len(dec.up) == 3 and dec.conv_out.conv.out_channels == 3  # up conv + 2 ResBlocks
    assert net.quantizer.num_embeddings == 8192 and net.quantizer.decay == 0.99
    assert enc.norm_out.num_groups == 32


# ----------------------------------------------------------------------------- same padding
def test_same_padding_keeps_shape_and_replicates_borders():
    x = torch.full((1, 1, 8, 6, 4), 2.0)
    conv = SamePadConv3d(1, 1, 3)
    torch.nn.init.ones_(conv.conv.weight)
    torch.nn.init.zeros_(conv.conv.bias)
    y = conv(x)
    assert y.shape == x.shape
    assert torch.allclose(y, torch.full_like(y, 54.0))  # replicate: borders see the same constant
    zero = SamePadConv3d(1, 1, 3, padding_mode="constant")
    zero.load_state_dict(conv.state_dict())
    assert zero(x)[0, 0, 0, 0, 0] < 54.0  # zero padding would darken the corner
    assert SamePadConv3d(1, 2, 4, stride=2)(x).shape == (1, 2, 4, 3, 2)
    # ceil/floor split of the total padding k - s: k4 s1 pads 2 before and 1 after
    assert SamePadConv3d(1, 1, 4).pad == (2, 1, 2, 1, 2, 1)
    assert SamePadConvTranspose3d(1, 2, 4, stride=2)(x).shape == (1, 2, 16, 12, 8)


# ----------------------------------------------------------------------------- gradients
def test_straight_through_gradient_reaches_the_encoder(brain):
    torch.manual_seed(0)
    net = VQGAN.aldm("tiny")
    x = brain["t2"][None, None]
    rec, _, _ = net(x)
    F.l1_loss(rec, x).backward()  # reconstruction only: the encoder is reached only through the STE
    g = net.encoder.conv_in.conv.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_codebook_changes_after_an_optimiser_step(brain):
    torch.manual_seed(0)
    net = VQGAN.aldm("tiny")
    x = brain["pd"][None, None]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = net.quantizer.embedding.weight.detach().clone()
    rec, vq_loss, _ = net(x)
    (F.l1_loss(rec, x) + vq_loss).backward()
    opt.step()
    assert not torch.equal(net.quantizer.embedding.weight, before)


def test_latent_hook_and_requantised_decode(brain):
    torch.manual_seed(0)
    net = VQGAN.aldm("tiny").eval()
    net.quantizer.embedding.weight.data.normal_()  # well separated codes, so small noise keeps the code
    x = brain["t1"][None, None]

    def shift(z: torch.Tensor) -> torch.Tensor:  # stands in for SPADE_tgt
        return z * 0.5 + 0.1

    with torch.no_grad():
        rec_hook, _, _ = net(x, latent_fn=shift)
        z_q = net.encode_quantized(x)
        assert torch.allclose(rec_hook, net.decode(shift(z_q)), atol=1e-6)
        assert not torch.allclose(rec_hook, net(x)[0])
        # a continuous latent near z_q decodes like z_q once re-quantised
        z_near = z_q + 1e-4 * torch.randn_like(z_q)
        assert torch.allclose(net.decode(z_near, quantize=True), net.decode(z_q), atol=1e-4)
        assert not torch.allclose(net.decode(z_near + 0.5), net.decode(z_q), atol=1e-4)


def test_cldm_ema_codebook_initialised_from_encoder_outputs(brain):
    torch.manual_seed(0)
    x = torch.stack([brain["t1"], brain["t2"], brain["pd"]])[None]
    net = VQGAN.cldm("tiny", ema_decay=1.0, restart_threshold=None)
    with torch.no_grad():
        rows = net.encode(x).movedim(1, -1).reshape(-1, 4)
        net(x)
    assert torch.cdist(net.quantizer.codebook, rows, compute_mode=EXACT).min(1).values.max() < 1e-5
    mean, std = net.codebook_mean_std()
    assert abs(mean - net.quantizer.codebook.mean().item()) < 1e-6 and std > 0


# ----------------------------------------------------------------------------- training step

TERMS = {"loss", "loss_rec", "loss_vq", "loss_adv_g", "loss_d", "perplexity", "codebook_used"}


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    # trainable parameters only: an EMA codebook changes in the forward pass, not by an optimiser
    return [p.detach().clone() for p in module.parameters() if p.requires_grad]


def _changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip([q for q in module.parameters() if q.requires_grad], before))


def test_aldm_step_in_step_trainer_delays_the_discriminator(brain):
    torch.manual_seed(0)
    net = VQGAN.aldm("tiny")
    disc = aldm_discriminator(in_channels=1, channels=8, num_layers_d=2, norm_num_groups=4)
    opt_g = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    keys = ["t1", "t2", "pd"]
    step = VQGANTrainingStep(net, opt_g, disc, opt_d, image_keys=keys, disc_start=1, seed=3)
    subject = {k: brain[k][None, None] for k in keys}  # one subject, all modalities, batch 1
    trainer = StepTrainer(device="cpu", max_epochs=1, train_data_loader=[subject, subject], step=step)
    log: list[tuple[dict, bool, bool]] = []
    snap = {"g": _params(net), "d": _params(disc)}

    def record(engine):
        log.append((dict(engine.state.output), _changed(net, snap["g"]), _changed(disc, snap["d"])))
        snap["g"], snap["d"] = _params(net), _params(disc)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert len(log) == 2
    for out, _, _ in log:
        assert TERMS <= set(out) and all(np.isfinite(out[k]) for k in TERMS)
        assert out["loss_rec"] > 0 and out["loss_vq"] > 0 and 1 <= out["codebook_used"] <= 64
    (first, g1, d1), (second, g2, d2) = log
    # step 0 < disc_start: no adversarial term and no discriminator update
    assert first["loss_d"] == 0.0 and first["loss_adv_g"] == 0.0 and first["adv_weight"] == 0.0
    assert g1 and not d1
    assert abs(first["loss"] - (first["loss_rec"] + first["loss_vq"])) < 1e-5
    # step 1 >= disc_start: both on
    assert second["loss_d"] > 0 and second["loss_adv_g"] != 0.0 and second["adv_weight"] == 1.0
    assert g2 and d2
    assert abs(second["loss"] - (second["loss_rec"] + second["loss_vq"] + second["loss_adv_g"])) < 1e-5


def test_step_picks_one_modality_per_sample_reproducibly(brain):
    net = VQGAN.aldm("tiny")
    step = VQGANTrainingStep(net, torch.optim.Adam(net.parameters()), image_keys=["t1", "t2"], seed=0)
    batch = {"t1": torch.stack([brain["t1"][None]] * 4), "t2": torch.stack([brain["t2"][None]] * 4)}
    a = step.select_image(batch, step.generator(5))
    assert torch.equal(a, step.select_image(batch, step.generator(5)))
    # every sample is exactly one of the modalities, and both occur over a few steps
    seen = set()
    for s in range(6):
        x = step.select_image(batch, step.generator(s))
        for b in range(4):
            seen.add("t1" if torch.equal(x[b, 0], brain["t1"]) else "t2" if torch.equal(x[b, 0], brain["t2"]) else "?")
    assert seen == {"t1", "t2"}


def _recording(optimizer: torch.optim.Optimizer, name: str, modules: dict, log: list) -> None:
    """Make ``optimizer.step`` record, when called, every module's gradients and parameter values."""
    inner = optimizer.step

    def step(*args, **kwargs):
        log.append({
            "who": name,
            "grads": {k: [None if p.grad is None else p.grad.detach().clone() for p in m] for k, m in modules.items()},
            "values": {k: [p.detach().clone() for p in m] for k, m in modules.items()},
        })
        return inner(*args, **kwargs)

    optimizer.step = step


def test_cldm_step_two_discriminators_updates_are_separated(brain):
    """With real learning rates on both sides: the generator's adversarial loss leaves no gradient in the
    discriminators, the discriminator loss leaves the generator's gradients as they were (the fake is
    detached), and each side's parameters move only at its own optimiser's step. (Freezing a side with
    lr=0 would prove nothing: Adam with lr 0 never moves, whatever the gradients.)"""
    torch.manual_seed(0)
    net = VQGAN.cldm("tiny")
    d2, d3 = cldm_discriminators(in_channels=3, channels=8)
    opt_g = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(list(d3.parameters()) + list(d2.parameters()), lr=1e-3)
    modules = {
        "g": [p for p in net.parameters() if p.requires_grad],
        "d": [p for p in list(d3.parameters()) + list(d2.parameters()) if p.requires_grad],
    }
    log: list = []
    _recording(opt_g, "g", modules, log)
    _recording(opt_d, "d", modules, log)
    step = VQGANTrainingStep(
        net, opt_g, [d3, d2], opt_d, disc_inputs=["volume", "slice"], image_keys="noddi", rec_weight=4.0,
        adv_weights=[1.0, 1.0], disc_start=0,
    )
    x = torch.stack([brain["t1"], brain["t2"], brain["pd"]])[None, :, :16, :16, :16].repeat(2, 1, 1, 1, 1)
    engine = SimpleNamespace(state=SimpleNamespace(iteration=1, device=torch.device("cpu")), amp=False)
    start = {k: [p.detach().clone() for p in m] for k, m in modules.items()}
    out = step(engine, {"noddi": x})
    assert {"loss_adv_g_volume", "loss_adv_g_slice", "loss_d_volume", "loss_d_slice"} <= set(out)
    assert out["loss_d"] == pytest.approx(out["loss_d_volume"] + out["loss_d_slice"], rel=1e-5)
    assert [e["who"] for e in log] == ["g", "d"]
    at_g, at_d = log
    # generator step: gradients in G (the adversarial term included), none in the discriminators
    assert all(g is None for g in at_g["grads"]["d"])
    assert any(g is not None and float(g.abs().sum()) > 0 for g in at_g["grads"]["g"])
    # discriminator step: its own gradients; the generator's gradients untouched by the D loss
    assert any(g is not None and float(g.abs().sum()) > 0 for g in at_d["grads"]["d"])
    for before, after in zip(at_g["grads"]["g"], at_d["grads"]["g"]):
        assert (before is None and after is None) or torch.equal(before, after)
    # each side moves only at its own step, and both move
    assert all(torch.equal(a, b) for a, b in zip(start["d"], at_d["values"]["d"]))  # D unmoved by the G step
    assert all(torch.equal(a, b) for a, b in zip(at_d["values"]["g"], [p.detach() for p in modules["g"]]))  # G unmoved by the D step
    assert any(not torch.equal(a, b) for a, b in zip(start["g"], at_d["values"]["g"]))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start["d"], modules["d"]))


class _LocalPerceptual(torch.nn.Module):
    """Stands in for a perceptual network loaded from a local file: a fixed random 3D conv feature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.conv(x_hat), self.conv(x))


def test_step_adaptive_weight_and_optional_perceptual_term(brain):
    torch.manual_seed(0)
    net = VQGAN.aldm("tiny")
    disc = aldm_discriminator(in_channels=1, channels=8, num_layers_d=2, norm_num_groups=4)
    engine = SimpleNamespace(state=SimpleNamespace(iteration=1, device=torch.device("cpu")), amp=False)
    batch = {"image": brain["t1"][None, None]}
    kwargs = dict(discriminators=disc, optimizer_d=torch.optim.Adam(disc.parameters()), disc_start=0)
    plain = VQGANTrainingStep(net, torch.optim.Adam(net.parameters()), **kwargs)(engine, batch)
    assert "loss_perceptual" not in plain and plain["adv_weight"] == 1.0
    step = VQGANTrainingStep(
        net, torch.optim.Adam(net.parameters()), adaptive_weight=True, perceptual_loss=_LocalPerceptual(), **kwargs
    )
    out = step(engine, batch)
    assert np.isfinite(out["loss_perceptual"]) and out["loss_perceptual"] > 0
    # taming's weight 0.8 * |grad rec| / |grad adv| on the decoder's last layer, not the constant 1
    assert 0.0 < out["adv_weight"] <= 0.8 * 1e4 and out["adv_weight"] != 1.0


def test_reconstruction_wrapper_runs_each_modality_as_its_own_volume(brain):
    """VQGANReconstruction(per_channel=True) on (B, M, *S) equals the autoencoder on each modality alone;
    per_channel=False passes the channels together (a multi-channel VQ-GAN)."""
    from common.networks.vqgan import VQGANReconstruction

    torch.manual_seed(0)
    net = VQGAN.aldm("tiny").eval()
    x = torch.stack([brain["t1"], brain["t2"], brain["pd"]])[None, :, :16, :16, :16].repeat(2, 1, 1, 1, 1)
    with torch.no_grad():
        both = VQGANReconstruction(net, per_channel=True)(x)
        alone = torch.stack([torch.cat([net(x[b : b + 1, m : m + 1])[0] for m in range(3)], 1)[0] for b in range(2)])
    assert both.shape == x.shape
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
    multi = VQGAN.cldm("tiny").eval()
    with torch.no_grad():
        torch.testing.assert_close(VQGANReconstruction(multi)(x), multi(x)[0])


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(brain):
    """checkpointing=True recomputes the encoder/decoder blocks in the backward pass: the reconstruction and
    every parameter gradient equal those of the plain network (same weights); in eval or without gradients
    nothing is checkpointed, and the cldm style refuses the option."""
    torch.manual_seed(0)
    plain = VQGAN.aldm("tiny")
    ckpt = VQGAN.aldm("tiny", checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = brain["t1"][None, None, :16, :16, :16]
    grads = []
    for net in (plain, ckpt):
        net.train()
        net.zero_grad()
        x_hat, vq_loss, _ = net(x)
        ((x_hat - x).abs().mean() + vq_loss).backward()
        grads.append((x_hat.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) > 10
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, atol=1e-6, rtol=1e-5, msg=name)
    # really checkpointed: torch's checkpoint runs each block again in the backward pass
    calls = []
    block = ckpt.decoder.up[0]
    handle = block.register_forward_pre_hook(lambda *a: calls.append(1))  # the recomputation may stop early
    ckpt.zero_grad()
    x_hat, vq_loss, _ = ckpt(x)
    ((x_hat - x).abs().mean() + vq_loss).backward()
    handle.remove()
    assert len(calls) == 2  # forward, then the recomputation
    with pytest.raises(ValueError, match="checkpointing"):
        VQGAN.cldm("tiny", checkpointing=True)
