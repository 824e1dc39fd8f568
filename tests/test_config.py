import pytest

from keplm import config
from keplm.platform.config import flatten, resolve_path
from keplm.platform.errors import ConfigError


def test_demo_config_loads_and_overrides_apply():
    cfg = config.load("configs/demo.yaml", ["prepare.max_seq_len=64", "prepare.link.min_name_chars=3"])
    assert cfg.prepare.max_seq_len == 64
    assert cfg.prepare.link.min_name_chars == 3
    assert cfg.prepare.min_chars == 20  # from the file
    assert resolve_path(cfg.prepare.kg).joinpath("entities.tsv").is_file()


def test_defaults_follow_the_paper():
    cfg = config.load(None)
    assert cfg.prepare.min_chars == 256 and cfg.prepare.max_seq_len == 512


@pytest.mark.parametrize("override, message", [
    ("prepare.nope=1", "config error: prepare.nope: unknown key"),
    ("nosection.key=1", "config error: nosection: unknown key"),
    ("prepare.max_seq_len=abc", "config error: prepare.max_seq_len:"),
    ("prepare.num_workers=0", "config error: prepare.num_workers:"),
    ("prepare.format=xml", "config error: prepare.format:"),
])
def test_bad_keys_and_values_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        config.load(None, [override])
    text = str(exc.value)
    assert text.startswith(message) and "\n" not in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_dump_is_flat_json_and_round_trips():
    cfg = config.load("configs/demo.yaml")
    flat = flatten(config.dump(cfg))
    assert flat["prepare.link.min_name_chars"] == cfg.prepare.link.min_name_chars
    again = config.load(None, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in flat.items()
                               if not isinstance(v, list) and v is not None])
    assert again.prepare == cfg.prepare.model_copy(update={"corpus": []})


def test_extends_deep_merges_the_parent_config(tmp_path):
    from keplm import config
    from keplm.platform.errors import ConfigError

    (tmp_path / "base.yaml").write_text("train: {lr: 0.1, epochs: 3}\nmodel: {kind: mlm}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {lr: 0.2}\n")
    cfg = config.load(tmp_path / "child.yaml", ["train.epochs=4"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.kind) == (0.2, 4, "mlm")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        config.load(tmp_path / "loop.yaml")
