"""The quickstart entrypoint on the embedded default: every stage config checked and saved, and\nthe stages built so far run."""

from __future__ import annotations

import re

from jobs import quickstart
from pipeline import config as configlib
from pipeline.shards import completed_shards
from pipeline.stage_config import STAGE_CONFIGS
from pipeline.storage import Storage, join


def test_quickstart_runs_the_built_stages(ray_local, tmp_path, capsys) -> None:
    root = str(tmp_path / "qs")
    assert quickstart.main([f"root={root}"]) == 0
    out = capsys.readouterr().out
    assert f"storage root    {root}" in out
    assert f"4000 captioned images in 8 shards at {root}/shards" in out
    assert "4000 rows (0 skipped) by tiny-clip--random" in out
    storage = Storage()
    expected = quickstart.stage_configs(quickstart.QuickstartConfig(root=root))
    for stage, (config_cls, _) in STAGE_CONFIGS.items():
        text = storage.read_text(join(root, "configs", f"{stage}.yaml"))
        saved = configlib.from_dict(config_cls, configlib.read_yaml_text(text), source=stage)
        assert saved == expected[stage]
        assert saved.root == root
    assert completed_shards(storage, join(root, "shards")) == list(range(8))


def test_quickstart_refuses_a_bad_config_before_starting(capsys) -> None:
    assert quickstart.main(["size=huge"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"configs/\w+/huge\.yaml: config file not found", err), err
