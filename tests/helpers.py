"""What many test modules share: free ports, one intra-op thread, random weights in zero-initialised
layers, and the tiny CLIP (a 3.4M-parameter open_clip config in ``configs/clip/tiny-clip.json``)
with the embedding and synthetic-data configs built around it."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pipeline.train.sources import Source

if TYPE_CHECKING:
    from conftest import Root

    from pipeline.stage_config import ClipSource, EmbedConfig
    from unclip.unet import DecoderNetConfig

TINY_CLIP_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "clip", "tiny-clip.json"
)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are chosen, so the kernel
    cannot hand the same port out twice (it did, to two of a Ray head's components)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights in the zero-initialised layers (output projections), so that an untrained
    model's outputs depend on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny_decoder_net(**changes: Any) -> DecoderNetConfig:
    """A 16 px decoder UNet of two levels with a one-layer caption encoder: milliseconds a step."""
    from unclip.unet import DecoderNetConfig

    base = dict(
        image_size=16,
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=16,
        text_context=8,
        text_width=32,
        text_depth=1,
        text_heads=2,
    )
    return DecoderNetConfig(**{**base, **changes})


def caption_tokens(batch: int, vocab: int, seed: int = 0, length: int = 9) -> torch.Tensor:
    """Token ids like open_clip's: start-of-text (``vocab - 2``), words, end-of-text
    (``vocab - 1``), then zero padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(2, length - 2, (1,), generator=g))
        tokens[i, 0] = vocab - 2
        tokens[i, 1 : n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
        tokens[i, n + 1] = vocab - 1
    return tokens


def tiny_clip_checkpoint(path: str, seed: int) -> str:
    """A random tiny CLIP saved as safetensors at ``path`` (what ``clip.pretrained`` names)."""
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(TINY_CLIP_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def tiny_clip_source(checkpoint: str | None) -> ClipSource:
    from pipeline.stage_config import ClipSource

    return ClipSource(model="tiny-clip", model_config=TINY_CLIP_CONFIG, pretrained=checkpoint)


def embed_cfg(root: Root, checkpoint: str | None, **changes: Any) -> EmbedConfig:
    """The embedding job's config for ``root`` with the tiny CLIP at ``checkpoint``."""
    from pipeline.stage_config import EmbedConfig

    options = dict(
        root=root.url,
        storage=root.storage.options,
        clip=tiny_clip_source(checkpoint),
        batch_size=8,
    )
    return EmbedConfig(**{**options, **changes})


def write_synth(root: Root, num_samples: int, per_shard: int) -> None:
    """``num_samples`` captioned-shapes scenes at 64 px under ``root``'s ``shards`` (on Ray)."""
    from pipeline.data import synth
    from pipeline.stage_config import SynthConfig

    cfg = SynthConfig(
        root=root.url,
        storage=root.storage.options,
        num_samples=num_samples,
        samples_per_shard=per_shard,
        image_size=64,
    )
    synth.generate(cfg, root.storage)


def stage_cfg(cls: type, name: str, root: Root, *overrides: str) -> Any:
    """The stage's tiny config (``configs/<name>/tiny.yaml``) under ``root``, with overrides."""
    import dataclasses

    from pipeline import config as configlib

    path = os.path.join(os.path.dirname(__file__), "..", "configs", name, "tiny.yaml")
    cfg = configlib.load(cls, path, [f"root={root.url}", "train.log_every=5", *overrides])
    return dataclasses.replace(cfg, storage=root.storage.options)


@dataclass
class Memory(Source):
    """An in-memory training source: piece ``p``'s slot ``k`` holds the row ``{"key": "p/k"}``;
    ``bad`` slots are unreadable, reading ``fail_piece`` raises, ``decoded`` lists what was
    decoded."""

    bad: frozenset = frozenset()
    fail_piece: int | None = None
    decoded: list = field(default_factory=list)

    def rows(self, piece, epoch, wanted):
        if piece == self.fail_piece:
            raise OSError(f"cannot read piece {piece}")
        for slot in range(self.pieces[piece].slots):  # front to back, like a tar
            if slot in wanted:
                yield slot, (None if (piece, slot) in self.bad else f"{piece}/{slot}")

    def decode(self, raw):
        self.decoded.append(raw)
        return {"key": raw}
