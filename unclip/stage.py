"""What the stage models of the cascade share (Ramesh et al. 2022, section 2).

* :class:`ImageDiffusionStage` — the base of the image stages, the 64px decoder and the upsamplers
  (section 2.1): a UNet ``net`` trained under a :class:`~unclip.diffusion.GaussianDiffusion` kept
  as the plain attribute ``diffusion``. A subclass writes its loss terms (``terms``: the diffusion
  losses, Ho et al. 2020 eq. 14 or Nichol & Dhariwal 2021 eq. 16, on its own conditioning) and its
  model function for sampling; the base gives the trainer's ``loss``, runs the sampler (in eval
  mode, on the network's device) and says which device and dtype batches are moved to.
  The trainer calls ``loss`` through its own wrapper module (the one DDP / FSDP wrap), so a stage
  model has no ``forward`` of its own.
* :func:`eval_mode` — sampling runs a model without dropout and leaves its train/eval mode as it
  found it, for every stage model (the priors of section 2.2 included).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from unclip.diffusion import GaussianDiffusion
from unclip.diffusion_process import DiffusionConfig, ModelFn

__all__ = ["ImageDiffusionStage", "eval_mode"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block; the module's mode is restored afterwards, also when
    the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class ImageDiffusionStage(nn.Module):
    """An image stage model: ``loss`` for the trainer, ``sample`` (in the subclass) for generation.

    Holds the config as ``cfg``, the network as ``net`` (a UNet wrapper whose ADM body is
    ``net.unet``, :class:`unclip.adm_unet.UNet`) and the diffusion process as the plain attribute
    ``diffusion``. Subclasses implement :meth:`terms`, and a ``sample`` that builds their model
    function and runs it through :meth:`_sample`.
    """

    def __init__(self, cfg: object, net: nn.Module, diffusion_cfg: DiffusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = net
        self.diffusion = GaussianDiffusion(diffusion_cfg)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the network's weights live and their dtype: what batches are moved and cast to."""
        weight = self.net.unet.input_conv.weight
        return weight.device, weight.dtype

    def terms(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Batch means of the diffusion loss terms: "loss" (what to minimise), "mse", and "vb" with
        learned variance."""
        raise NotImplementedError

    def loss(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mean diffusion loss over the batch (:meth:`terms`' "loss")."""
        return self.terms(batch, generator)["loss"]

    def _sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        sampler: Literal["ddpm", "ddim"] | None,
        steps: int | None,
        eta: float | None,
        noise: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """:meth:`GaussianDiffusion.sample` of ``model_fn`` on the network's device, with the model
        in eval mode (its mode restored afterwards); ``noise`` (x_T) is moved there in float32."""
        device, _ = self._device_dtype()
        with eval_mode(self):
            return self.diffusion.sample(
                model_fn,
                shape,
                sampler=sampler,
                steps=steps,
                eta=eta,
                noise=None if noise is None else noise.to(device, torch.float32),
                generator=generator,
                device=device,
            )
