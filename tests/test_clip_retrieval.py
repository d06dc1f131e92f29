"""Importing a broken clip-retrieval folder: embeddings whose dimensions differ (image against text,
or between parts), metadata that is not parquet, files cut short or missing. Each is refused before
anything is written, with one line naming the file (no ArrowInvalid traceback)."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Root
from helpers import TINY_CLIP_CONFIG, tiny_clip_source

from jobs import embed as embed_job
from pipeline.embed.clip_retrieval import import_folder
from pipeline.embed.store import EmbeddingStore
from pipeline.errors import UserFacingError
from pipeline.stage_config import EmbedConfig
from pipeline.storage import Storage

DIM = 64  # the tiny CLIP's embedding dimension


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _embeddings(rows: int, dim: int = DIM, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return _npy(rng.standard_normal((rows, dim)).astype(np.float16))


def _metadata(rows: int) -> bytes:
    return _parquet(
        pa.table(
            {"key": [f"k{i}" for i in range(rows)], "caption": [f"c {i}" for i in range(rows)]}
        )
    )


def _folder(storage: Storage, url: str, parts: int = 2, rows: int = 3) -> dict[str, str]:
    """A well-formed clip-retrieval folder of ``parts`` parts at ``url``; its files' URLs by the
    names ``img_emb_0``, ``text_emb_0``, ``metadata_0``, ..."""
    files = {}
    for part in range(parts):
        for kind, ext, data in (
            ("img_emb", "npy", _embeddings(rows, seed=part)),
            ("text_emb", "npy", _embeddings(rows, seed=100 + part)),
            ("metadata", "parquet", _metadata(rows)),
        ):
            files[f"{kind}_{part}"] = f"{url}/{kind}/{kind}_{part}.{ext}"
            storage.write_bytes(files[f"{kind}_{part}"], data)
    return files


def _cfg(root: Root) -> EmbedConfig:
    return EmbedConfig(
        root=root.url,
        storage=root.storage.options,
        store="imported",
        clip=tiny_clip_source(None),
        import_clip_retrieval="cr",
    )


def _refused(root: Root) -> str:
    """The import's error, checked to be one line; nothing was written to the store."""
    with pytest.raises(UserFacingError) as info:
        import_folder(_cfg(root), root.storage)
    message = str(info.value)
    assert "\n" not in message
    assert not root.storage.list(f"{root.url}/imported")
    return message


@pytest.fixture
def local_root(tmp_path) -> Root:
    return Root("local", str(tmp_path / "root"), Storage())


def test_a_well_formed_folder_imports(local_root: Root) -> None:
    """The control for the cases below: the same folder, unbroken, imports."""
    _folder(local_root.storage, f"{local_root.url}/cr")
    summary = import_folder(_cfg(local_root), local_root.storage)
    assert (summary["rows"], summary["skipped"]) == (6, 0)
    store = EmbeddingStore(local_root.storage, summary["store"])
    assert store.manifest()["embed_dim"] == DIM


# Each case breaks one file of a good two-part folder: (which file, its new bytes or None to
# remove it, the message expected after the file's URL; {url} stands for another file's URL).
BROKEN: list[tuple[str, str, Callable[[], bytes | None], str]] = [
    (
        "dims differ between parts",
        "img_emb_1",
        lambda: _embeddings(3, dim=32),
        ": embeddings have 32 dimensions but {img_emb_0} has 64: every part must come from the "
        "same CLIP",
    ),
    (
        "text dims differ from image dims",
        "text_emb_0",
        lambda: _embeddings(3, dim=32),
        ": shape (3, 32) does not match {img_emb_0} (3, 64)",
    ),
    (
        "text rows differ from image rows",
        "text_emb_1",
        lambda: _embeddings(2),
        ": shape (2, 64) does not match {img_emb_1} (3, 64)",
    ),
    (
        "metadata is csv",
        "metadata_1",
        lambda: b"key,caption\nk0,c 0\nk1,c 1\nk2,c 2\n",
        ": cannot be read as parquet (Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file.)",
    ),
    (
        "metadata cut short",
        "metadata_0",
        lambda: _metadata(3)[:-20],
        ": cannot be read as parquet (Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file.)",
    ),
    (
        "metadata empty",
        "metadata_0",
        lambda: b"",
        ": cannot be read as parquet (Parquet file size is 0 bytes)",
    ),
    (
        "metadata rows differ",
        "metadata_1",
        lambda: _metadata(5),
        ": 5 rows for 3 embeddings in {img_emb_1}",
    ),
    (
        "metadata without captions",
        "metadata_0",
        lambda: _parquet(pa.table({"key": ["a", "b", "c"]})),
        ": no caption column (columns: ['key'])",
    ),
    (
        "embeddings not numpy",
        "img_emb_0",
        lambda: b"this is not an array" * 4,
        ": not a numpy array file (the magic string is not correct; expected b'\\x93NUMPY', got "
        "b'this i')",
    ),
    (
        "embeddings one-dimensional",
        "text_emb_1",
        lambda: _npy(np.zeros(3, np.float16)),
        ": expected an N × D embedding matrix, got shape (3,)",
    ),
    (
        "embeddings of integers",
        "img_emb_1",
        lambda: _npy(np.zeros((3, DIM), np.int64)),
        ": expected float embeddings, got dtype int64",
    ),
    (
        "embeddings cut short",
        "img_emb_1",
        lambda: _embeddings(3, seed=1)[:-10],
        ": cut short: 374 bytes of data for its (3, 64) float16 array (384)",
    ),
]


@pytest.mark.parametrize(
    ("case", "name", "data", "expected"), BROKEN, ids=[case for case, *_ in BROKEN]
)
def test_a_broken_file_is_named_in_one_line(
    local_root: Root, case: str, name: str, data: Callable[[], bytes | None], expected: str
) -> None:
    files = _folder(local_root.storage, f"{local_root.url}/cr")
    local_root.storage.write_bytes(files[name], data())
    assert _refused(local_root) == files[name] + expected.format(**files)


@pytest.mark.parametrize(
    ("name", "present"),
    [
        ("text_emb_1", "img_emb_1.npy"),
        ("metadata_0", "img_emb_0.npy"),
        ("img_emb_1", "text_emb_1.npy"),
    ],
)
def test_a_missing_file_is_named(local_root: Root, name: str, present: str) -> None:
    files = _folder(local_root.storage, f"{local_root.url}/cr")
    local_root.storage.remove(files[name])
    part = name.rsplit("_", 1)[1]
    assert _refused(local_root) == (
        f"{files[name]} is missing (part {part} has {present}; the prior needs image and text "
        "embeddings and captions)"
    )


def test_a_missing_folder_is_named(local_root: Root) -> None:
    assert _refused(local_root) == f"no img_emb/img_emb_N.npy files under {local_root.url}/cr"


def test_a_part_given_twice_is_named(local_root: Root) -> None:
    files = _folder(local_root.storage, f"{local_root.url}/cr")
    again = f"{local_root.url}/cr/img_emb/img_emb_01.npy"
    local_root.storage.write_bytes(again, _embeddings(3))
    # listed in name order: 01 comes first
    assert _refused(local_root) == f"{files['img_emb_1']}: part 1 again (also {again})"


def test_on_object_storage_and_through_the_command_line(
    storage_root: Root, capsys: pytest.CaptureFixture[str]
) -> None:
    """The headers and footers are read the same way from S3; the command prints the one line and
    exits with status 1."""
    files = _folder(storage_root.storage, f"{storage_root.url}/cr")
    storage_root.storage.write_bytes(files["img_emb_1"], _embeddings(3, dim=32))
    storage_root.storage.write_bytes(files["metadata_0"], b"key,caption\n")
    endpoint = storage_root.storage.options.endpoint_url
    code = embed_job.main(
        [
            f"root={storage_root.url}",
            "store=imported",
            "clip.model=tiny-clip",
            f"clip.model_config={TINY_CLIP_CONFIG}",
            *([f"storage.endpoint_url={endpoint}"] if endpoint else []),
            "--import-clip-retrieval",
            "cr",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [
        f"python -m jobs.embed: error: {files['metadata_0']}: cannot be read as parquet "
        "(Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
        "parquet file.)"
    ]
    assert "Traceback" not in err
    storage_root.storage.write_bytes(files["metadata_0"], _metadata(3))
    assert (
        embed_job.main(
            [
                f"root={storage_root.url}",
                "store=imported",
                "clip.model=tiny-clip",
                f"clip.model_config={TINY_CLIP_CONFIG}",
                *([f"storage.endpoint_url={endpoint}"] if endpoint else []),
                "--import-clip-retrieval",
                "cr",
            ]
        )
        == 1
    )
    assert f"error: {files['img_emb_1']}: embeddings have 32 dimensions but " in (
        capsys.readouterr().err
    )
    assert not storage_root.storage.list(f"{storage_root.url}/imported")
