"""The quickstart entrypoint on the embedded default: every stage config checked and saved."""

from __future__ import annotations

from jobs import quickstart
from pipeline import config as configlib
from pipeline.stage_config import STAGE_CONFIGS
from pipeline.storage import Storage, join


def test_quickstart_checks_and_saves_every_stage_config(ray_local, tmp_path, capsys) -> None:
    root = str(tmp_path / "qs")
    assert quickstart.main([f"root={root}"]) == 0
    out = capsys.readouterr().out
    assert f"storage root     {root}" in out
    storage = Storage()
    expected = quickstart.stage_configs(quickstart.QuickstartConfig(root=root))
    for stage, (config_cls, _) in STAGE_CONFIGS.items():
        text = storage.read_text(join(root, "configs", f"{stage}.yaml"))
        saved = configlib.from_dict(config_cls, configlib.read_yaml_text(text), source=stage)
        assert saved == expected[stage]
        assert saved.root == root


def test_quickstart_refuses_a_bad_config_before_starting(capsys) -> None:
    assert quickstart.main(["size=huge"]) == 2
    assert "configs/embed/huge.yaml: config file not found" in capsys.readouterr().err
