"""Every hyperparameter section of the model library, in one import for the stage configs.

Each section lives beside the code it configures; defaults are small, the paper's values (Ramesh et al.
2022, appendix C, table 3) are in ``configs/*/paper.yaml``.
"""

from unclip.diffusion_process import DiffusionConfig
from unclip.prior import PriorNetConfig
from unclip.unet import DecoderNetConfig, UpsamplerNetConfig

__all__ = ["DecoderNetConfig", "DiffusionConfig", "PriorNetConfig", "UpsamplerNetConfig"]
