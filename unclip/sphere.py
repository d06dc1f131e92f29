"""Geometry on the sphere of CLIP embeddings for the image manipulations of unCLIP (Ramesh et al.
2022, section 3): spherical interpolation and the text-diff direction.

CLIP embeddings are compared by cosine similarity and the decoder reads unit-norm image embeddings
z_i, so the manipulations move z_i along great circles rather than straight lines:

* :func:`slerp` — section 3.2 (figure 4) interpolates two images' embeddings, z_iθ =
  slerp(z_i1, z_i2, θ), and optionally their DDIM-inverted latents; section 3.3 rotates z_i towards
  a text diff, slerp(z_i, z_d, θ);
* :func:`text_diff_direction` — section 3.3 (figure 5): the text diff z_d = normalize(z_t − z_t0).

Pure functions of tensors, apart from every model (:mod:`unclip.generation` runs them through the
decoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["slerp", "text_diff_direction"]


def slerp(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """Spherical linear interpolation along the last dimension (Shoemake 1985), as the paper's
    interpolations (section 3.2: z_iθ = slerp(z_i1, z_i2, θ); section 3.3: slerp(z_i, z_d, θ)):

        slerp(a, b, t) = sin((1 − t)·Ω)/sin Ω · a + sin(t·Ω)/sin Ω · b,  Ω = ∠(a, b).

    ``a``, ``b``: (..., D); ``t``: a float or a tensor broadcastable against the batch shape
    (...) of ``a`` and ``b`` (e.g. a (B, 1, D), t (K,) → (B, K, D)). Unit inputs stay on the unit
    sphere, the angle to ``a`` grows linearly with t, and t = 0 / 1 give ``a`` / ``b`` exactly;
    inputs of other norms (DDIM latents) are interpolated with the same coefficients. Ω is computed
    as 2·atan2(‖â − b̂‖, ‖â + b̂‖), accurate for tiny angles (acos of the dot product is not), and
    where sin Ω < 1e-6 (a ≈ b, or the ill-defined antipodal case) the coefficients fall back to
    their limit, linear interpolation, so the result is always finite. Computed in float32 or wider.
    """
    work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = a.to(work)
    b = b.to(a.device, work)
    t = torch.as_tensor(t, dtype=work, device=a.device)
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = 2.0 * torch.atan2((an - bn).norm(dim=-1), (an + bn).norm(dim=-1))
    omega, t = torch.broadcast_tensors(omega, t)
    sin_omega = torch.sin(omega)
    degenerate = sin_omega < 1e-6
    safe = torch.where(degenerate, torch.ones_like(sin_omega), sin_omega)
    coef_a = torch.where(degenerate, 1.0 - t, torch.sin((1.0 - t) * omega) / safe)
    coef_b = torch.where(degenerate, t, torch.sin(t * omega) / safe)
    return coef_a[..., None] * a + coef_b[..., None] * b


def text_diff_direction(text_emb: Tensor, target_text_emb: Tensor) -> Tensor:
    """The text diff z_d = normalize(z_t − z_t0) (section 3.3): from the CLIP text embedding of a
    caption describing the current image (z_t0) to that of the target caption (z_t), (B, D) each,
    both normalised first. Identical captions give the zero vector (no direction)."""
    z_t0 = F.normalize(text_emb.float(), dim=-1)
    z_t = F.normalize(target_text_emb.to(z_t0.device).float(), dim=-1)
    return F.normalize(z_t - z_t0, dim=-1)
