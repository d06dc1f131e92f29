"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021), apart from every network.

Every stage of unCLIP is a diffusion model (Ramesh et al. 2022, sections 2.1-2.2): the prior over
CLIP image embeddings, the 64px decoder and the two upsamplers. :class:`GaussianDiffusion` is the
one process object they all use; the networks only see a *model function* ``fn(x_t, t) -> Tensor``
(docs/ARCHITECTURE.md, "The model function") and know nothing about schedules.

The structure follows improved-diffusion's ``GaussianDiffusion``: a process object built from a β
schedule precomputes every schedule quantity and takes the model as an argument. Its parts are
written one concept per module, and this one puts them together:

* :mod:`unclip.diffusion_process` — the config, the β schedules and their respacing, the forward
  process and its posterior, the parameterisations and the model's reverse step (Ho et al. eqs.
  4-7; Nichol & Dhariwal §3-4);
* :mod:`unclip.diffusion_losses` — the training objective: L_simple and the hybrid loss with the
  variational bound (Ho et al. eq. 14; Nichol & Dhariwal eq. 16);
* :mod:`unclip.diffusion_sampling` — the DDPM and DDIM samplers, DDIM inversion and
  classifier-free guidance (Ho et al. Algorithm 2; Song et al. 2021 eq. 12, §4.3; Ho & Salimans
  2022).
"""

from __future__ import annotations

from unclip.diffusion_losses import DiffusionLosses
from unclip.diffusion_sampling import DiffusionSampling

__all__ = ["GaussianDiffusion"]


class GaussianDiffusion(DiffusionLosses, DiffusionSampling):
    """The diffusion process of one stage: forward noising, the training loss, and the samplers.

    Built from a :class:`~unclip.diffusion_process.DiffusionConfig` (and, for a respaced process,
    ``use_timesteps``; prefer :meth:`respace`), as
    :class:`~unclip.diffusion_process.DiffusionProcess` describes. The process holds no parameters:
    a stage model keeps it as a plain attribute, and the same object serves training
    (:meth:`training_losses`) and sampling (:meth:`sample`) so the noising formula exists once.
    """
