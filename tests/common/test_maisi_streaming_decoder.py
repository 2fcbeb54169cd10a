"""The slab-by-slab MAISI VAE decode equals the whole-volume decode, and the inferer uses it where it can."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from common.inferers.maisi import MaisiInferer
from common.networks.maisi import maisi_autoencoder, maisi_mask_autoencoder, set_num_splits
from common.networks.maisi_streaming_decoder import streaming_decode, supports_streaming


def _vae(tiny: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    vae = set_num_splits(maisi_autoencoder(tiny=tiny, device="cpu").eval(), 1)
    for m in vae.modules():  # non-trivial GroupNorm affines, so a wrong per-channel scale or shift shows
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return vae


@pytest.mark.parametrize(
    "tiny, shape, chunk",
    [
        (True, (2, 4, 6, 5, 7), 2),  # two samples; slabs of 2 with a remainder; odd sizes
        (True, (1, 4, 5, 6, 9), 3),
        (True, (1, 4, 4, 4, 4), 64),  # one slab: the volume's own border on both sides
        (False, (1, 4, 8, 8, 10), 3),  # the official CT VAE configuration (channels 64-128-256, 2 res blocks)
    ],
)
def test_streaming_decode_equals_whole_volume_decode(tiny, shape, chunk):
    vae = _vae(tiny)
    z = torch.randn(shape)
    with torch.no_grad():
        ref = vae.decode_stage_2_outputs(z)
    out = streaming_decode(vae, z, chunk=chunk)
    assert out.shape == ref.shape == (shape[0], 1, *(4 * s for s in shape[2:]))
    assert float((out - ref).abs().max()) < 2e-5 * float(ref.abs().max())  # float32 rounding only


def test_streaming_decode_leaves_the_latent_unchanged():
    vae = _vae(True)
    z = torch.randn(1, 4, 5, 5, 6)
    before = z.clone()
    streaming_decode(vae, z, chunk=2)
    assert torch.equal(z, before)


def test_inferer_auto_decodes_by_slabs_on_cpu_and_sliding_window_stays_available(monkeypatch):
    import common.inferers.maisi as MI

    vae = _vae(True)
    z = torch.randn(1, 4, 6, 6, 20)
    sched = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True)
    calls = []
    monkeypatch.setattr(MI, "streaming_decode", lambda ae, lat, **kw: (calls.append(kw), streaming_decode(ae, lat, **kw))[1])
    auto = MaisiInferer(sched, vae, None, scale_factor=2.0, decode_roi_size=(6, 6, 8), decode_chunk=5, progress=False)
    out = auto.decode(z)
    assert calls == [{"chunk": 5}]  # the default 'auto' took the slab path, with the configured chunk
    with torch.no_grad():
        whole = vae.decode_stage_2_outputs(z / 2.0)
    assert float((out - whole).abs().max()) < 1e-4  # exact, where a sliding window over 6x6x8 latent windows is not
    sw = MaisiInferer(sched, vae, None, scale_factor=2.0, decode_roi_size=(6, 6, 8), decode_overlap=0.25,
                      decode_mode="sliding_window", progress=False).decode(z)
    assert len(calls) == 1 and sw.shape == out.shape
    assert float((sw - whole).abs().max()) > 1e-3  # per-window GroupNorm statistics: why the slab path is the default


def test_unsupported_decoders_are_refused_or_fall_back():
    mask_vae = maisi_mask_autoencoder(device="cpu")  # transposed-convolution upsampling
    assert not supports_streaming(mask_vae) and supports_streaming(_vae(True))
    sched = RFlowScheduler(num_train_timesteps=1000)
    with pytest.raises(ValueError, match="decode_mode 'streaming'"):
        MaisiInferer(sched, mask_vae, None, decode_mode="streaming", progress=False)
    with pytest.raises(ValueError, match="decode_mode must be"):
        MaisiInferer(sched, _vae(True), None, decode_mode="slabs", progress=False)
    assert MaisiInferer(sched, mask_vae, None, progress=False).decode_mode == "auto"
