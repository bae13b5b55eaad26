"""`mmdata build`'s options are generated from the config model: none missing, none declared twice,
help readable at 80 columns."""
import os
import re

import pytest
from typer.testing import CliRunner

from mmdata.cli.build_options import PANELS, build_fields, build_parameters
from mmdata.cli.main import app
from mmdata.config import BuildConfig

runner = CliRunner()


def help_at(columns: int, flag: str = "--help-all") -> str:
    res = runner.invoke(app, ["build", flag], env={"COLUMNS": str(columns)}, terminal_width=columns)
    assert res.exit_code == 0, res.output
    return res.output


def test_every_config_field_is_an_option_in_one_panel():
    listed = [n for names in PANELS.values() for n in names]
    assert len(listed) == len(set(listed)), "a field is in two panels"
    fields = set(build_fields())
    assert fields <= set(listed), f"fields with no help panel: {sorted(fields - set(listed))}"
    assert set(listed) - {"config"} <= fields, f"panels name fields the model lacks: {set(listed) - fields}"
    text = help_at(200)
    for name in fields:
        flag = {"beam_options": "--beam-option", "augment_seed": "--seed", "index_memory_gb": "--index-memory"}.get(
            name, "--" + name.replace("_", "-"))
        assert re.search(rf"(^|[\s,/]){re.escape(flag)}([\s,/]|$)", text, re.M), f"{flag} missing from build --help"


def test_no_default_is_written_twice():
    """Every option defaults to 'not given'; the model's default is the one used and shown."""
    for param in build_parameters():
        if param.name == "help_all":
            continue
        assert param.default.default is None, param.name
    field = BuildConfig.model_fields["samples_per_shard"]
    assert f"(default: {field.default})" in help_at(200)


def test_basic_help_is_short_and_names_the_other_panels():
    from mmdata.cli.build_options import BASIC_PANELS

    text = help_at(80, "--help")
    assert len(text.splitlines()) < len(help_at(80).splitlines()) * 0.7
    for panel in PANELS:
        assert (f"{panel}:" in text) == (panel in BASIC_PANELS), panel
        if panel not in BASIC_PANELS:
            assert f"{panel} ({len(PANELS[panel])})" in text
    assert "--help-all" in text and max(len(line) for line in text.splitlines()) <= 80


def test_help_fits_80_columns_with_whole_option_names():
    text = help_at(80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert not re.search(r"--[\w-]+(…|\.\.\.)", text), "an option name is cut"
    for panel in PANELS:
        assert f"{panel}:" in text
    assert "--resize-only-if-bigger / --resize-always" in text and "--dask-gpu-resource" in text


@pytest.mark.parametrize("flag,value,field", [("--max-caption-chars", "0", "max_caption_chars"),
                                              ("--n-mels", "0", "n_mels"), ("--image-quality", "101", "image_quality")])
def test_a_flag_reaches_the_model(flag, value, field, tmp_path):
    (tmp_path / "in").mkdir()
    res = runner.invoke(app, ["build", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), flag, value])
    assert res.exit_code == 2 and field in res.output, res.output
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
