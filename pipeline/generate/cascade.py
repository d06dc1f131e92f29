"""Trained stage models for inference: the unCLIP cascade (section 2, figure 2) from checkpoints.

Generation loads what the training stages wrote (``pipeline.train.checkpoints``): for each stage a run
folder (its latest *whole* checkpoint is used) or one checkpoint folder, on local disk or object
storage. Two steps, so every check runs before any weight is read or any Ray resource is asked for:

* :func:`plan_cascade` reads each checkpoint's ``state.json`` and ``config.yaml`` only, and refuses
  what cannot work together: a folder with no whole checkpoint, a checkpoint of another stage (a
  decoder passed as the prior), a prior and a decoder trained on the embeddings of different CLIPs,
  upsamplers whose resolutions do not chain on from the decoder's (64 → 256 → 1024), or a CLIP for
  the prompts and images that is not the one that made the decoder's embedding store. The result,
  a :class:`CascadePlan`, is plain data: Ray Data actors receive it and load the same checkpoints
  even if training writes newer ones meanwhile.
* :func:`load_cascade` builds each stage model with its stage's build function (``pipeline.train.stages``;
  nothing is fitted: the autoregressive prior's PCA quantizer comes back from its buffers), loads
  the EMA weights (what the paper samples with) with safetensors, never a pickle, and the CLIP,
  all in eval mode on one device. The :class:`Cascade` encodes prompts and images with that CLIP
  (its tokenizer and its own preprocessing, as the embedding job did) into the unit-norm embeddings
  and caption tokens that ``unclip.generation`` takes.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import config as configlib
from pipeline.embed import clip_model
from pipeline.embed.store import MANIFEST, EmbeddingStore
from pipeline.errors import UserFacingError
from pipeline.stage_config import ClipSource
from pipeline.storage import Storage, is_local, join, resolve
from pipeline.train import checkpoints
from pipeline.train.stages import STAGES

log = logging.getLogger(__name__)

PRIOR, DECODER, UPSAMPLER = "train-prior", "train-decoder", "train-upsampler"


# ----------------------------------------------------------------------------------------------
# Planning: which checkpoints, checked against each other, without their weights


@dataclass(frozen=True)
class StageCheckpoint:
    """One whole checkpoint of a stage run, described by its ``state.json`` and ``config.yaml``.

    ``role`` is the config key that named it (``decoder``, ``prior``, ``upsamplers[0]``), so errors
    point at what to change; ``cfg`` is the stage config that trained it, ``info`` what the
    training driver told its workers (embedding dim, the store and its CLIP).
    """

    role: str
    stage: str
    url: str
    step: int
    cfg: Any
    info: dict[str, Any]

    def with_sampler(self, sampler: str | None) -> StageCheckpoint:
        """The same checkpoint sampled with another sampler ("ddpm" or "ddim"; None: its own)."""
        if sampler is None:
            return self
        diffusion = dataclasses.replace(self.cfg.diffusion, sampler=sampler)
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, diffusion=diffusion))

    def describe(self) -> dict[str, Any]:
        """What an index file records about the checkpoint."""
        return {"url": self.url, "step": self.step, "run": getattr(self.cfg, "run", None)}


def _check_whole(storage: Storage, folder: str, role: str) -> None:
    marker = storage.read_json(join(folder, checkpoints.MARKER))
    for name, size in marker.get("files", {}).items():
        url = join(folder, name)
        if not storage.exists(url) or storage.size(url) != size:
            raise UserFacingError(
                f"{role}: the checkpoint {folder} is incomplete ({name} is missing or cut short): "
                "give its run folder to use the latest whole checkpoint"
            )


def find_checkpoint(storage: Storage, url: str, stage: str, role: str) -> StageCheckpoint:
    """The checkpoint ``url`` names (itself, or the latest whole one of a run folder), which must
    be one of ``stage``; errors name the URL and the config key ``role``."""
    if storage.exists(join(url, checkpoints.MARKER)):
        folder = url
        _check_whole(storage, folder, role)
    else:
        found = checkpoints.list_checkpoints(storage, url)
        if not found:
            raise UserFacingError(
                f"{role}: no complete checkpoint at {url}: train that stage first "
                f"(unclip {stage}), or give its run folder"
            )
        folder = found[-1][1]
    state = storage.read_json(join(folder, "state.json"))
    saved_stage = state.get("stage")
    if saved_stage != stage:
        raise UserFacingError(
            f"{role}: {folder} is a {saved_stage or 'unknown'} checkpoint, not a {stage} one"
        )
    spec = STAGES[stage]
    config_url = join(folder, "config.yaml")
    try:
        cfg = configlib.from_dict(
            spec.config_cls,
            configlib.read_yaml_text(storage.read_text(config_url), source=config_url),
            source=config_url,
        )
    except configlib.ConfigError as exc:
        raise UserFacingError(
            f"{role}: cannot read the config it was trained with: {exc}"
        ) from None
    return StageCheckpoint(
        role, stage, folder, int(state["step"]), cfg, dict(state.get("info", {}))
    )


@dataclass(frozen=True)
class CascadePlan:
    """The checked checkpoints of a cascade and the CLIP that encodes its inputs (plain data).

    ``clip`` is the CLIP source with its weights as an absolute URL (or an open_clip tag),
    ``clip_id`` the identity of the CLIP that made the decoder's embedding store, and
    ``clip_checkpoint`` its weights as the planning process resolved them
    (:func:`clip_model.resolve_checkpoint`: a local path, or a ref pinned by sha256 that each
    process fetches into its node's cache), so every actor loads the CLIP that was checked.
    """

    decoder: StageCheckpoint
    prior: StageCheckpoint | None
    upsamplers: tuple[StageCheckpoint, ...]
    clip: ClipSource
    clip_id: str
    clip_checkpoint: clip_model.Checkpoint | None

    @property
    def resolutions(self) -> list[int]:
        """Image side after the decoder and after each upsampler."""
        sides = [int(self.decoder.cfg.model.image_size)]
        sides += [int(u.cfg.model.high_res) for u in self.upsamplers]
        return sides

    def with_samplers(self, decoder: str | None = None, upsamplers: str | None = None):
        """The plan with the decoder's and the upsamplers' samplers replaced (None: their own)."""
        return dataclasses.replace(
            self,
            decoder=self.decoder.with_sampler(decoder),
            upsamplers=tuple(u.with_sampler(upsamplers) for u in self.upsamplers),
        )

    def describe(self) -> dict[str, Any]:
        """The checkpoints and CLIP used, for index files."""
        return {
            "prior": self.prior.describe() if self.prior else None,
            "decoder": self.decoder.describe(),
            "upsamplers": [u.describe() for u in self.upsamplers],
            "clip": self.clip_id,
        }


def check_same_clip(prior: StageCheckpoint, decoder: StageCheckpoint) -> None:
    """A prior predicts image embeddings of its store's CLIP; the decoder must read the same."""
    if prior.info.get("clip") != decoder.info.get("clip"):
        raise UserFacingError(
            f"the prior {prior.url} and the decoder {decoder.url} were trained on embeddings of "
            f"different CLIPs ({prior.info.get('clip')!r} and {decoder.info.get('clip')!r}): "
            "use a prior and a decoder trained on the same embedding store"
        )
    if prior.info.get("embed_dim") != decoder.info.get("embed_dim"):
        raise UserFacingError(
            f"the prior {prior.url} makes {prior.info.get('embed_dim')}-d embeddings, the decoder "
            f"{decoder.url} reads {decoder.info.get('embed_dim')}-d ones"
        )


def _check_chain(decoder: StageCheckpoint, upsamplers: Sequence[StageCheckpoint]) -> None:
    """Each upsampler must take the resolution the stage before it makes (section 2.1)."""
    side, source = int(decoder.cfg.model.image_size), f"the decoder {decoder.url}"
    for up in upsamplers:
        low, high = int(up.cfg.model.low_res), int(up.cfg.model.high_res)
        if low != side:
            raise UserFacingError(
                f"{up.role}: the upsampler {up.url} takes {low}px images but {source} makes "
                f"{side}px ones: list upsamplers lowest resolution first, each taking the "
                "previous one's output"
            )
        side, source = high, f"the upsampler {up.url}"


def _absolute_clip(source: ClipSource, storage: Storage, root: str) -> ClipSource:
    """``source`` with a path-like ``pretrained`` made an absolute URL of the weights file (a
    train-clip run folder becomes its latest checkpoint's weights), so any process can load it."""
    url = clip_model.checkpoint_url(source, storage, root)
    return dataclasses.replace(source, pretrained=url) if url else source


def _store_clip(storage: Storage, decoder: StageCheckpoint) -> ClipSource:
    """The CLIP that made the decoder's embedding store, from the store's manifest: a recorded
    source if the manifest has one, else the open_clip model and pretrained tag it names."""
    store_url = decoder.info.get("store")
    clip_id = decoder.info.get("clip")
    hint = (
        "set clip.model, clip.pretrained (its checkpoint or train-clip run) and clip.model_config"
    )
    if not store_url or not storage.exists(join(store_url, MANIFEST)):
        raise UserFacingError(
            f"the decoder {decoder.url} was trained on the embedding store {store_url}, which is "
            f"not there to say which CLIP ({clip_id}) encodes prompts and images: {hint}"
        )
    manifest = EmbeddingStore(storage, store_url).manifest()
    recorded = manifest.get("clip_source")
    if recorded:
        return ClipSource(**{k: recorded.get(k) for k in ("model", "pretrained", "model_config")})
    ident = manifest["clip"]
    if ident.get("pretrained"):
        return ClipSource(model=ident["model"], pretrained=ident["pretrained"])
    kind = "a checkpoint" if ident.get("checkpoint_sha256") else "random weights"
    raise UserFacingError(
        f"the decoder {decoder.url} was trained on embeddings of {ident['id']!r}, a CLIP from "
        f"{kind} that its store's manifest cannot locate: {hint}"
    )


def plan_cascade(
    storage: Storage,
    root: str,
    *,
    decoder: str,
    prior: str | None = None,
    upsamplers: Sequence[str] = (),
    clip: ClipSource | None = None,
) -> CascadePlan:
    """Find and check every checkpoint of a cascade, and the CLIP for its inputs (module
    docstring). Paths are relative to ``root`` unless absolute URLs; ``clip`` None takes the CLIP
    from the decoder's embedding store. Reads no weights except the CLIP checkpoint's, which is
    hashed (streamed, not copied) to check that it is the store's CLIP."""
    dec = find_checkpoint(storage, resolve(root, decoder), DECODER, "decoder")
    pri = find_checkpoint(storage, resolve(root, prior), PRIOR, "prior") if prior else None
    ups = tuple(
        find_checkpoint(storage, resolve(root, url), UPSAMPLER, f"upsamplers[{i}]")
        for i, url in enumerate(upsamplers)
    )
    if pri is not None:
        check_same_clip(pri, dec)
    _check_chain(dec, ups)
    source = _absolute_clip(clip, storage, root) if clip is not None else _store_clip(storage, dec)
    expected = dec.info.get("clip")
    checkpoint = clip_model.resolve_checkpoint(source, storage, root)
    found = clip_model.identity(source, checkpoint).id
    if expected and found != expected:
        raise UserFacingError(
            f"the CLIP {source.model} from {source.pretrained or 'random weights'} is {found!r}, "
            f"but the decoder {dec.url} was trained on embeddings of {expected!r}: give the CLIP "
            "that made its embedding store (config key: clip)"
        )
    return CascadePlan(dec, pri, ups, source, expected or found, checkpoint)


# ----------------------------------------------------------------------------------------------
# Loading: the models, the CLIP, and encoding inputs with it


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first GPU if there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserFacingError(
            "device cuda was asked for, but no GPU is visible (config key: device)"
        )
    return torch.device(device)


def _read_weights(storage: Storage, url: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load, load_file

    if is_local(url):
        return load_file(url[len("file://") :] if url.startswith("file://") else url)
    return load(storage.read_bytes(url))


def load_stage_model(
    storage: Storage, checkpoint: StageCheckpoint, device: torch.device | str = "cpu"
) -> nn.Module:
    """The stage model of ``checkpoint`` with its EMA weights (its training weights if it has no
    EMA, said in a log line), in eval mode without gradients, on ``device``."""
    model = STAGES[checkpoint.stage].build(checkpoint.cfg, checkpoint.info)
    ema_url = join(checkpoint.url, "ema.safetensors")
    if storage.exists(ema_url):
        weights = _read_weights(storage, ema_url)
    else:
        log.warning(
            "%s: %s has no EMA weights (ema.safetensors); using its training weights "
            "(model.safetensors)",
            checkpoint.role,
            checkpoint.url,
        )
        weights = _read_weights(storage, join(checkpoint.url, "model.safetensors"))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserFacingError(
            f"{checkpoint.role}: the weights in {checkpoint.url} do not fit the model its "
            f"config.yaml describes: {str(exc).splitlines()[0]}"
        ) from None
    return model.to(device).eval().requires_grad_(False)


def read_image(storage: Storage, url: str):
    """An image file (local path, ``file://`` or ``s3://``) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if not storage.exists(url):
        raise UserFacingError(f"no image at {url}")
    try:
        image = Image.open(io.BytesIO(storage.read_bytes(url)))
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserFacingError(f"{url} is not an image this can read: {exc}") from None


def square(image: Any, size: int) -> np.ndarray:
    """A PIL image centre-cropped to a square and resized to ``size`` (area when shrinking, as the
    training images were; bicubic when growing), as (size, size, 3) uint8."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.convert("RGB").crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.BOX if side > size else Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class Cascade:
    """The loaded cascade: the CLIP (model, tokenizer, preprocessing), the prior (optional), the
    64px decoder and the upsamplers, lowest resolution first, all in eval mode on ``device``."""

    plan: CascadePlan
    clip: clip_model.LoadedClip
    decoder: nn.Module
    prior: nn.Module | None
    upsamplers: list[nn.Module]
    device: torch.device
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.clip.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.clip.std, device=self.device).view(1, 3, 1, 1)

    @property
    def resolutions(self) -> list[int]:
        return self.plan.resolutions

    @torch.no_grad()
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Caption tokens (N, L) as the embedding store holds them: the CLIP tokenizer's ids,
        padded or cut to its context length (the prior and decoder cut to what they read)."""
        return self.clip.tokenizer([str(p) for p in prompts]).long()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit-norm CLIP text embeddings (N, D) float32, caption tokens (N, L)) on the device."""
        tokens = self.tokenize(prompts).to(self.device)
        emb = self.clip.model.encode_text(tokens).float()
        return F.normalize(emb, dim=-1), tokens

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (N, D) float32 of PIL images, preprocessed as the
        embedding job did (the CLIP's own resize and crop, then its normalisation)."""
        pixels = np.stack([clip_model.prepare_image(self.clip.image_transform, i) for i in images])
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 255
        emb = self.clip.model.encode_image((x - self._mean) / self._std).float()
        return F.normalize(emb, dim=-1)

    def decoder_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images as the decoder's inputs (N, 3, S, S) in [-1, 1] on the device: centre-cropped
        and resized to its side S (for DDIM inversion, section 3)."""
        size = int(self.plan.decoder.cfg.model.image_size)
        pixels = np.stack([square(image, size) for image in images])
        return torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_cascade(
    plan: CascadePlan, storage: Storage, device: torch.device | str = "auto"
) -> Cascade:
    """Load every model of ``plan`` (EMA weights, eval mode) and its CLIP onto ``device``."""
    device = pick_device(device) if isinstance(device, str) else device
    clip = clip_model.load_clip(plan.clip, plan.clip_checkpoint, str(device), storage)
    for ckpt in (plan.prior, plan.decoder):
        if ckpt is not None and int(ckpt.info.get("embed_dim", clip.embed_dim)) != clip.embed_dim:
            raise UserFacingError(
                f"{ckpt.role}: {ckpt.url} reads {ckpt.info['embed_dim']}-d embeddings, but the "
                f"CLIP {plan.clip.model} makes {clip.embed_dim}-d ones"
            )
    cascade = Cascade(
        plan=plan,
        clip=clip,
        decoder=load_stage_model(storage, plan.decoder, device),
        prior=load_stage_model(storage, plan.prior, device) if plan.prior else None,
        upsamplers=[load_stage_model(storage, u, device) for u in plan.upsamplers],
        device=device,
    )
    log.info(
        "cascade on %s: %s%s, %s",
        device,
        f"prior step {plan.prior.step}, " if plan.prior else "",
        f"decoder step {plan.decoder.step}",
        " → ".join(f"{s}px" for s in plan.resolutions),
    )
    return cascade
