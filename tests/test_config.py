"""Config loading: defaults < YAML < flags, and errors that name the bad key or value."""

from __future__ import annotations

import pytest

from pipelines.cli import build_parser, overrides_from
from pipelines.config import ConfigError, load
from pipelines.embed import EmbedJobConfig


def _load(tmp_path, yaml_text, argv):
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml_text)
    ns = build_parser().parse_args(["embed", *argv])
    return load(EmbedJobConfig, str(cfg), overrides_from(ns, EmbedJobConfig))


def test_precedence_defaults_yaml_flags(tmp_path):
    job = _load(tmp_path, "max_length: 128\ndims: [896, 256]\npooling: cls\n", ["--max-length", "64"])
    assert job.max_length == 64  # flag beats YAML
    assert job.dims == (896, 256)  # YAML beats default
    assert job.pooling == "cls"
    assert job.normalize is True  # default survives


def test_flags_parse_lists_and_booleans(tmp_path):
    job = _load(tmp_path, "normalize: true\n", ["--dims", "512,64", "--no-normalize", "--keep-columns", "a, b"])
    assert job.dims == (512, 64) and job.normalize is False and job.keep_columns == ("a", "b")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("max_length: many\n", "max_length must be an integer, got 'many'"),
        ("normalize: 3\n", "normalize must be true or false, got 3"),
        ("dims: 512,abc\n", "dims must hold ints, got 'abc'"),
        ("text_kind: passage\n", "text_kind must be one of ['document', 'query'], got 'passage'"),
        ("poolin: mean\n", "unknown config key(s) ['poolin']"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_values_are_named(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, yaml_text, [])
    assert message in str(e.value)
