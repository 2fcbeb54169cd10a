"""iVAN: invertible, variable-augmented 2D network for modality synthesis and fusion.

Y. Wang, R. Liu, Z. Li, S. Wang, C. Yang, Q. Liu, "Variable Augmented Network for Invertible Modality
Synthesis and Fusion", IEEE JBHI 27(6):2898-2909, 2023. Official code ``yqx7150/iVAN`` (``model/model.py``
``InvISPNet``/``InvBlock``/``DenseBlock``, ``model/modules.py`` ``InvertibleConv1x1``), itself built on
``yzxing87/Invertible-ISP``. Written from the method description; no official code is reused.

Differences from the official code (see the bundle's model card):

- the invertible 1x1 convolution works for any even channel count ``C`` (the official one hard-codes 2);
- the inverse of the 1x1 weight is computed in float64 and cast back, so that ``inverse(forward(x))``
  stays within 1e-4 of ``x`` in float32 after eight blocks;
- the initialisation is explicit (``init``): the official network-level xavier-normal init silently
  overwrites the dense blocks' own init; ``"xavier"`` reproduces that effective init;
- the network runs in float32 even inside an autocast (AMP) region, unless ``reduced_precision`` is set:
  in half precision the eight couplings lose exact invertibility (``f^-1(f(x))`` off by ~1e-2).
"""

# no `from __future__ import annotations`: torch.jit.script (the zoo's export) cannot resolve string annotations
# of @torch.jit.unused methods
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DenseBlock", "InvertibleConv1x1LU", "AffineCouplingBlock", "IVAN", "IVANPredictor", "group_mean"]


class DenseBlock(nn.Module):
    """Five 3x3 convolutions with dense connections (the coupling sub-networks F, G, H).

    ``conv_k`` sees the input and every earlier feature map: ``c -> g``, ``c+g -> g``, ``c+2g -> g``,
    ``c+3g -> g``, ``c+4g -> out``; LeakyReLU(0.2) after the first four.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``. For ``in = out = 1`` and growth 32 the
    block has 57,738 parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, growth: int = 32) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(in_channels + k * growth, growth, 3, padding=1, bias=True) for k in range(4)]
            + [nn.Conv2d(in_channels + 4 * growth, out_channels, 3, padding=1, bias=True)]
        )
        self.act = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one loop over the whole ModuleList: torch.jit.script (the zoo's export) cannot call a sliced ModuleList
        feats = [x]
        out = x
        last = len(self.convs) - 1
        for k, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, dim=1))
            if k < last:
                out = self.act(out)
                feats.append(out)
        return out


class InvertibleConv1x1LU(nn.Module):
    """Glow's invertible 1x1 convolution with an LU-decomposed weight, for any channel count ``C``.

    ``W = P @ L @ (U + diag(sign_s * exp(log_s)))`` with ``L`` unit lower-triangular and ``U`` strictly
    upper-triangular (both stored as full ``C x C`` parameters and masked, as in Glow), ``P`` and ``sign_s``
    fixed buffers. Initialised from the QR decomposition of a random Gaussian matrix, so ``W`` starts as a
    random rotation. ``log|det W| = sum(log_s)`` per pixel.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)`` both ways. Parameters: ``2 C^2 + C``.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.channels = int(channels)
        w = torch.randn(self.channels, self.channels, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(w)
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(self.channels, self.channels), -1))
        self.register_buffer("eye", torch.eye(self.channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def weight(self) -> torch.Tensor:
        """The ``C x C`` weight ``P L (U + diag(sign_s exp(log_s)))``."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def logdet(self, x: torch.Tensor) -> torch.Tensor:
        """``log|det|`` of the map on a ``(B, C, H, W)`` tensor: ``H * W * sum(log_s)`` (one value)."""
        return self.log_s.sum() * x.shape[-2] * x.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight().to(x.dtype)
        return F.conv2d(x, w.view(self.channels, self.channels, 1, 1))

    @torch.jit.export  # called from IVAN.inverse, which torch.jit.script compiles through forward(rev=True)
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # float64 inverse: a float32 inverse of a product of three matrices loses ~1e-6 per block
        w_inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y, w_inv.view(self.channels, self.channels, 1, 1))


class AffineCouplingBlock(nn.Module):
    """One iVAN block: invertible 1x1 convolution, then an IRN-style affine coupling.

    Forward, with ``x = W z`` split into halves ``x1 | x2``::

        y1 = x1 + F(x2);  s = clamp * (2 sigmoid(H(y1)) - 1);  y2 = x2 * exp(s) + G(y1)

    Inverse: ``x2 = (y2 - G(y1)) * exp(-s)``, ``x1 = y1 - F(x2)``, then ``W^-1``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, ``C`` even.
    """

    def __init__(self, channels: int, clamp: float = 0.8, growth: int = 32, generator: torch.Generator | None = None):
        super().__init__()
        if channels % 2 != 0 or channels < 2:
            raise ValueError(f"iVAN needs an even channel count >= 2, got {channels}")
        self.half = channels // 2
        self.clamp = float(clamp)
        self.conv1x1 = InvertibleConv1x1LU(channels, generator=generator)
        self.f = DenseBlock(self.half, self.half, growth)
        self.g = DenseBlock(self.half, self.half, growth)
        self.h = DenseBlock(self.half, self.half, growth)

    def scale(self, y1: torch.Tensor) -> torch.Tensor:
        """Log-scale of the coupling, bounded in ``(-clamp, clamp)``."""
        return self.clamp * (2.0 * torch.sigmoid(self.h(y1)) - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1x1(x)
        x1, x2 = x[:, : self.half], x[:, self.half :]
        y1 = x1 + self.f(x2)
        y2 = x2 * torch.exp(self.scale(y1)) + self.g(y1)
        return torch.cat([y1, y2], dim=1)

    @torch.jit.export  # called from IVAN.inverse, which torch.jit.script compiles through forward(rev=True)
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, : self.half], y[:, self.half :]
        x2 = (y2 - self.g(y1)) * torch.exp(-self.scale(y1))
        x1 = y1 - self.f(x2)
        return self.conv1x1.inverse(torch.cat([x1, x2], dim=1))


class IVAN(nn.Module):
    """Invertible variable-augmented network (iVAN): a stack of :class:`AffineCouplingBlock`.

    Fully convolutional at full resolution (no squeeze, no down-sampling, no ActNorm): any ``H x W``.

    Args:
        channels: channel count ``C`` of the (augmented) input and output; must be even.
        num_blocks: number of invertible blocks (8 in the paper/code).
        clamp: bound of the coupling log-scale (0.8 in the code).
        growth: growth rate of the dense blocks (32 in the code).
        init: ``"xavier"`` (the official code's effective init: xavier-normal weights on every conv of
            F, G, H including the last, zero biases), ``"zero_last"`` (as ``"xavier"`` but the last conv of
            F, G, H is zero, so each coupling starts as the identity), or ``"default"`` (PyTorch's init).
        seed: seed of the QR initialisation of the 1x1 convolutions (``None``: the global generator).
        reduced_precision: ``False`` (default): ``forward`` and ``inverse`` disable any enclosing autocast
            (AMP) region and run in the dtype of the parameters (float32), so the inverse stays exact
            (``|f^-1(f(x)) - x|`` ~1e-6) whatever ``amp`` says; the output is float32. ``True``: the layers
            follow the enclosing autocast (fp16/bf16), faster on GPUs but no longer exactly invertible
            (measured cost in the bundle's model card).

    Shapes: ``forward``: ``(B, C, H, W) -> (B, C, H, W)``; ``inverse`` (or ``forward(y, rev=True)``): the same. For ``C = 2``, 8 blocks
    and growth 32 the network has 1,385,792 parameters (1,385,712 in F/G/H, 80 in the 1x1 convolutions).
    """

    def __init__(
        self,
        channels: int = 2,
        num_blocks: int = 8,
        clamp: float = 0.8,
        growth: int = 32,
        init: str = "xavier",
        seed: int | None = None,
        reduced_precision: bool = False,
    ) -> None:
        super().__init__()
        self.reduced_precision = bool(reduced_precision)
        if int(channels) != channels or channels < 2 or channels % 2 != 0:
            raise ValueError(f"iVAN needs an even channel count >= 2 (split C/2 | C/2), got {channels}")
        if init not in ("xavier", "zero_last", "default"):
            raise ValueError(f"init must be 'xavier', 'zero_last' or 'default', got {init!r}")
        self.channels = int(channels)
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.blocks = nn.ModuleList(
            [AffineCouplingBlock(self.channels, clamp, growth, generator=gen) for _ in range(num_blocks)]
        )
        self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        if init == "default":
            return
        for block in self.blocks:
            for sub in (block.f, block.g, block.h):
                for conv in sub.convs:
                    nn.init.xavier_normal_(conv.weight)
                    nn.init.zeros_(conv.bias)
                if init == "zero_last":
                    nn.init.zeros_(sub.convs[-1].weight)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        """``f(x)``, or ``f^-1(x)`` when ``rev`` is true (so a ``DistributedDataParallel`` wrapper runs both)."""
        if rev:
            return self.inverse(x)
        if self._autocast_off():
            return self._without_autocast(x, False)
        return self._forward(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self._autocast_off():
            return self._without_autocast(y, True)
        return self._inverse(y)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._cast(x)
        for block in self.blocks:
            x = block(x)
        return x

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self._cast(y)
        for block in self.blocks[::-1]:  # reversed() of a ModuleList does not compile in torch.jit.script
            y = block.inverse(y)
        return y

    def _autocast_off(self) -> bool:
        """Whether to switch autocast off for the invertible layers (eager runs without ``reduced_precision``)."""
        return not (self.reduced_precision or torch.jit.is_tracing() or torch.jit.is_scripting())

    @torch.jit.unused
    def _without_autocast(self, x: torch.Tensor, rev: bool) -> torch.Tensor:
        # kept out of the scripted module: torch.jit.script (the zoo's export) compiles no context manager but
        # autocast, and a scripted or traced module runs in the caller's precision as before
        device = self.blocks[0].conv1x1.log_s.device.type if len(self.blocks) else "cpu"
        with torch.autocast(device_type=device, enabled=False):
            return self._inverse(x) if rev else self._forward(x)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduced_precision or not len(self.blocks):
            return x
        dtype = self.blocks[0].conv1x1.log_s.dtype
        return x if x.dtype == dtype else x.to(dtype)

    def logdet_conv1x1(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the 1x1 convolutions' ``log|det|`` for an input shaped like ``x``."""
        return sum(b.conv1x1.logdet(x) for b in self.blocks)


def group_mean(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, C, ...) -> (B, n, ...)``: output ``j`` is the mean of the channels ``c`` with ``c mod n == j``."""
    return torch.stack([x[:, j::n].mean(dim=1) for j in range(n)], dim=1)


class IVANPredictor(nn.Module):
    """Inference wrapper: clamp, de-augment and (optionally) run the network backwards.

    ``direction``:
      - ``"forward"``: ``(B, C, H, W)`` augmented sources -> ``(B, n_out, H, W)`` prediction
        ``P(clamp(f(x), 0, 1))``;
      - ``"reverse"``: ``(B, C, H, W)`` augmented targets -> ``(B, n_in, H, W)`` source estimates
        ``Q(clamp(f^-1(y), 0, 1))``;
      - ``"both"``: augmented sources -> ``(B, n_out + n_in, H, W)``: the prediction, then the sources
        reconstructed from the clamped forward output (the official test).

    ``P``/``Q`` follow the augmentation scheme: channel-group mean for ``"replicate"``, first channels for
    ``"dummy_copy"`` and ``"zeros"``.

    Pixels where every input channel is exactly 0 (zero padding, outside the acquired field of view) are 0 in
    every output: the network's biases would otherwise paint a value into a region that holds no signal, so
    the same image padded into a larger field of view gives the same output inside and background outside.
    Images with a noise floor have no exact zeros and are not affected.
    """

    def __init__(self, network: IVAN, n_in: int, n_out: int, direction: str = "forward", augmentation: str = "replicate"):
        super().__init__()
        if direction not in ("forward", "reverse", "both"):
            raise ValueError(f"direction must be forward, reverse or both, got {direction!r}")
        if augmentation not in ("replicate", "dummy_copy", "zeros"):
            raise ValueError(f"unknown augmentation {augmentation!r}")
        self.network = network
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.direction = direction
        self.augmentation = augmentation

    def _extract(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return group_mean(x, n) if self.augmentation == "replicate" else x[:, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outside = (x == 0).all(dim=1, keepdim=True)  # no signal in any channel: outside the field of view
        if self.direction == "reverse":
            out = self._extract(torch.clamp(self.network(x, rev=True), 0.0, 1.0), self.n_in)
            return out.masked_fill(outside, 0.0)
        y = torch.clamp(self.network(x), 0.0, 1.0)
        pred = self._extract(y, self.n_out)
        if self.direction == "forward":
            return pred.masked_fill(outside, 0.0)
        rec = self._extract(torch.clamp(self.network(y, rev=True), 0.0, 1.0), self.n_in)
        return torch.cat([pred, rec], dim=1).masked_fill(outside, 0.0)
