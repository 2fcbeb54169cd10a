"""Samplers of the shared package, as ``monai.inferers.Inferer`` subclasses."""

from .diffseg import DiffSegInferer
from .latent_diffusion import LatentDiffusionSampler, set_sampling_timesteps

__all__ = ["DiffSegInferer", "LatentDiffusionSampler", "set_sampling_timesteps"]
from .maisi import MaisiInferer  # noqa: E402

__all__ += ["MaisiInferer"]
from .openvino import OpenVINONetwork  # noqa: E402

__all__ += ["OpenVINONetwork"]
