import dataclasses

import pytest

from pipeline.core.config import PRESETS, ConfigError, load_config, parse_override


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.cluster.num_experts <= cfg.cluster.fine_k


def test_laion_preset_is_the_paper_shape():
    cfg = load_config("laion")
    assert (cfg.cluster.fine_k, cfg.cluster.num_experts, cfg.train.model) == (1024, 4, "ViT-B-16")
    assert "simcse" in cfg.embed.model.lower()


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"unknown field cluster\.fine_kk.*fine_k"):
        load_config("demo", ["cluster.fine_kk=3"])


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clusterz:\n  fine_k: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'clusterz'.*cluster"):
        load_config(str(path))


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"data\.format.*'csv'.*\['webdataset', 'parquet'\]"):
        load_config("demo", ["data.format=csv"])


def test_bad_type_and_range_are_named():
    with pytest.raises(ConfigError, match=r"cluster\.fine_k: expected an integer"):
        load_config("demo", ["cluster.fine_k=many"])
    with pytest.raises(ConfigError, match=r"cluster\.fine_k: must be > 0"):
        load_config("demo", ["cluster.fine_k=0"])
    with pytest.raises(ConfigError, match=r"train\.seed_fraction"):
        load_config("demo", ["train.seed_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"train\.max_relaunches: must be >= 0"):
        load_config("demo", ["train.max_relaunches=-1"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_relaunches_a_run_whose_control_processes_died(preset):
    """A run's controller or helper lost at night is started again without anyone there."""
    assert load_config(preset).train.max_relaunches >= 1


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'demoo'.*'demo'"):
        load_config("demoo")


def test_overrides_and_yaml_round_trip(tmp_path):
    cfg = load_config("demo", ["cluster.fine_k=32", "train.lr=1e-3", "storage.s3_endpoint_url=http://x:1"])
    assert (cfg.cluster.fine_k, cfg.train.lr, cfg.storage.s3_endpoint_url) == (32, 1e-3, "http://x:1")
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    fit = ["cluster.fine_k", "cluster.seed"]
    assert again.view(fit).hash() == cfg.view(fit).hash() != load_config("demo").view(fit).hash()
    assert cfg.view(["data.format"]).hash() == load_config("demo").view(["data.format"]).hash()


def test_config_is_frozen():
    cfg = load_config("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cluster.fine_k = 3


def test_parse_override_rejects_malformed():
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("cluster.fine_k")
    with pytest.raises(ConfigError, match="section.field"):
        parse_override("fine_k=3")
