"""The typed config system: base inheritance, overrides, and errors that say what to fix."""
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deco.model.config import ModelConfig
from deco.pipeline.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(kw_only=True)
class Inner:
    width: int = 4
    scale: float = 1.0
    name: str = "x"
    sizes: list[int] = field(default_factory=list)
    interval: tuple[float, float] = (0.0, 1.0)
    maybe: int | None = None


@dataclass(kw_only=True)
class Outer:
    enabled: bool = False
    inner: Inner = field(default_factory=Inner)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_inheritance_merges_deeply_and_child_wins(tmp_path):
    write(tmp_path / "base.yaml", "enabled: true\ninner:\n  width: 8\n  name: base\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ninner:\n  width: 16\n")
    cfg = load_config(Outer, child)
    assert cfg.enabled is True
    assert cfg.inner.width == 16 and cfg.inner.name == "base" and cfg.inner.scale == 1.0


def test_nested_base_and_relative_paths(tmp_path):
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts" / "inner.yaml", "width: 32\nsizes: [1, 2]\n")
    top = write(tmp_path / "top.yaml", "inner:\n  base: parts/inner.yaml\n  scale: 2\n")
    cfg = load_config(Outer, top)
    assert cfg.inner.width == 32 and cfg.inner.sizes == [1, 2]
    assert cfg.inner.scale == 2.0 and isinstance(cfg.inner.scale, float)


def test_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path / "c.yaml", "inner:\n  width: 8\n")
    cfg = load_config(Outer, path, ["inner.width=64", "enabled=true", "inner.interval=[0.1, 0.9]", "inner.maybe=null"])
    assert cfg.inner.width == 64 and cfg.enabled is True
    assert cfg.inner.interval == (0.1, 0.9) and cfg.inner.maybe is None


def test_unknown_key_names_key_file_and_nearest(tmp_path):
    path = write(tmp_path / "typo.yaml", "inner:\n  widht: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    message = str(err.value)
    assert "'inner.widht'" in message and str(path) in message and "'inner.width'" in message


def test_unknown_key_from_a_base_file_names_that_file(tmp_path):
    base = write(tmp_path / "base.yaml", "enabeld: true\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ninner: {width: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, child)
    assert str(base) in str(err.value) and "'enabled'" in str(err.value)


def test_override_typo_is_reported_as_override(tmp_path):
    path = write(tmp_path / "c.yaml", "{}\n")
    with pytest.raises(ConfigError, match=r"'inner.scael' in --set; did you mean 'inner.scale'"):
        load_config(Outer, path, ["inner.scael=3"])


@pytest.mark.parametrize("text", ["inner: {width: 2.5}\n", "inner: {width: true}\n", "enabled: 1\n",
                                  "inner: {sizes: [1, a]}\n", "inner: {interval: [1, 2, 3]}\n", "inner: 3\n"])
def test_mistyped_values_are_errors(tmp_path, text):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match="expected"):
        load_config(Outer, path)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="a.b.c=value"):
        load_config(Outer, write(tmp_path / "c.yaml", "{}"), ["inner.width"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "absent.yaml")


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Outer, tmp_path / "a.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path / "evil.yaml", "inner: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Outer, path)


def test_shipped_model_configs_load_and_validate():
    for name in ("tiny", "t2i_l16", "t2i_xxl16"):
        cfg = load_config(ModelConfig, CONFIGS / "model" / f"{name}.yaml")
        assert cfg.resolution % cfg.dit.patch_size == 0
    tiny = load_config(ModelConfig, CONFIGS / "model" / "tiny.yaml")
    assert tiny.dit.text_len == 32 and tiny.decoder.width == 32  # tiny overrides, XXL base fills the rest


def test_model_validation_errors_surface_as_config_errors():
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(ModelConfig, CONFIGS / "model" / "tiny.yaml", ["dit.heads=5"])
    with pytest.raises(ConfigError, match="repa.block"):
        load_config(ModelConfig, CONFIGS / "model" / "tiny.yaml", ["repa.enabled=true", "repa.block=9"])
