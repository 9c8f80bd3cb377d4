from pathlib import Path

import pytest

from lightclip.config import ConfigError, Params, load_params, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_are_typed():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.validate_.on_error in ("fail", "quarantine")
    assert params.synth.n_items > 0


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_params({"validate": {"on_eror": "fail"}})
    message = str(err.value)
    assert "validate.on_eror" in message and "on_error" in message


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match=r"unknown key 'splt'.*synth, validate, split"):
        parse_params({"splt": {}})


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"'fail' or 'quarantine'"):
        parse_params({"validate": {"on_error": "ignore"}})


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match=r"synth.n_items"):
        parse_params({"synth": {"n_items": "many"}})


def test_unknown_attribute_column_in_allowed_values():
    with pytest.raises(ConfigError, match=r"colour"):
        parse_params({"validate": {"allowed_values": {"colour": ["Red"]}}})


def test_split_sizes_must_be_sane():
    with pytest.raises(ConfigError, match=r"split.val"):
        parse_params({"split": {"val": 1.5}})
    assert parse_params({"split": {"val": 100, "test": 0.2}}).split.val == 100


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_distill_students_and_ablation_variants():
    params = load_params(REPO_ROOT / "params.yaml")
    ablation = params.distill_ablation
    assert ablation.students == ["xt", "xxt"] and set(ablation.students) <= set(params.distill.students)
    assert {"no_distill", "intra_ts_fd", "sd_ts", "full"} <= set(ablation.variants)
    config = ablation.config_for(params.distill, "intra_ts_fd", seed=7)
    assert config.train.seed == 7 and config.student == params.distill.students["xt"]  # the first by default
    assert ablation.config_for(params.distill, "full", seed=0, student="xxt").student == params.distill.students["xxt"]
    assert {(e.edge, e.loss) for e in config.edges} == {("inter_ss", "infonce"), ("intra_ts", "fd")}
    with pytest.raises(ConfigError, match=r"no variant 'nope'; variants: no_distill"):
        ablation.config_for(params.distill, "nope", seed=0)
    with pytest.raises(ConfigError, match=r"distill_ablation.students has no student 'big'; students: xt, xxt"):
        ablation.config_for(params.distill, "full", seed=0, student="big")
    # the earlier one-student form still reads; both forms at once is an error
    assert parse_params({"distill_ablation": {"student": "xxt"}}).distill_ablation.students == ["xxt"]
    with pytest.raises(ConfigError, match="either student or students"):
        parse_params({"distill_ablation": {"student": "xt", "students": ["xt"]}})
    with pytest.raises(ConfigError, match="students"):
        parse_params({"distill_ablation": {"students": []}})
    with pytest.raises(ConfigError, match=r"no student 'big'; students: xt, xxt"):
        params.distill.for_student("big")
    with pytest.raises(ConfigError, match=r"variants.bad"):
        parse_params({"distill_ablation": {"variants": {"bad": [{"edge": "inter_ss", "loss": "fd"}]}}})
    with pytest.raises(ConfigError, match=r"ensemble_members"):
        parse_params({"pretrain": {"ensemble_members": 0}})
