from pathlib import Path

import pytest
import yaml

from lightclip.config import ConfigError, Params, load_params, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def written_values_arrive(written: object, loaded: object, where: str = "params") -> None:
    """Every value written in the file is in the loaded params, equal (loaded may add defaults)."""
    if isinstance(written, dict):
        assert isinstance(loaded, dict), where
        for key, value in written.items():
            assert key in loaded, f"{where}.{key} was dropped"
            written_values_arrive(value, loaded[key], f"{where}.{key}")
    elif isinstance(written, list):
        assert isinstance(loaded, list) and len(loaded) == len(written), where
        for i, (value, got) in enumerate(zip(written, loaded)):
            written_values_arrive(value, got, f"{where}[{i}]")
    else:
        assert loaded == written, f"{where}: wrote {written!r}, loaded {loaded!r}"


def test_repo_params_load_and_are_typed():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    written = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    written_values_arrive(written, params.model_dump(by_alias=True, mode="json"))
    assert isinstance(params.synth.n_items, int) and params.synth.n_items == written["synth"]["n_items"]


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


def test_code_defaults_are_params_yaml():
    """Each knob has one value: the code's defaults are exactly the repo's params.yaml."""
    assert load_params(REPO_ROOT / "params.yaml").model_dump(by_alias=True, mode="json") == Params().model_dump(by_alias=True, mode="json")


def test_distill_jobs_for_pipeline_and_ablation():
    params = load_params(REPO_ROOT / "params.yaml")
    ablation = params.distill_ablation
    assert ablation.students == ["xt", "xxt"] and set(ablation.students) <= set(params.distill.students)
    assert {"no_distill", "intra_ts_fd", "sd_ts", "full"} <= set(ablation.variants)
    job = params.distill_job(variant="intra_ts_fd", seed=7)
    assert job.train.seed == 7 and job.student == params.distill.students["xt"] and job.student_name == "xt"  # the first by default
    assert job.run_name == "distill-xt-intra_ts_fd-seed7"
    assert {(e.edge, e.loss) for e in job.edges} == {("inter_ss", "infonce"), ("intra_ts", "fd")}
    assert params.distill_job("xxt", variant="full").student == params.distill.students["xxt"]
    assert params.distill_job(variant="full").train.seed == params.distill.train.seed
    pipeline = params.distill_job("xxt")
    assert pipeline.run_name == "distill-xxt" and pipeline.edges == params.distill.edges and pipeline.variant is None
    assert pipeline.trajectory() == params.distill_job("xxt").trajectory() != params.distill_job("xt").trajectory()
    assert "student_name" not in pipeline.trajectory()
    assert params.distill_job().student_name == "xt"
    no_distill = params.distill_job(variant="no_distill")
    assert no_distill.needs_teacher is False and pipeline.needs_teacher is True
    with pytest.raises(ConfigError, match=r"no variant 'nope'; variants: no_distill"):
        params.distill_job(variant="nope")
    with pytest.raises(ConfigError, match=r"distill_ablation.students has no student 'big'; students: xt, xxt"):
        params.distill_job("big", variant="full")
    with pytest.raises(ConfigError, match=r"distill.students has no student 'big'; students: xt, xxt"):
        params.distill_job("big")
    with pytest.raises(ConfigError, match="distill_ablation.students"):
        parse_params({"distill_ablation": {"students": []}})
    with pytest.raises(ConfigError, match="unknown key 'distill_ablation.student'"):
        parse_params({"distill_ablation": {"student": "xxt"}})
    with pytest.raises(ConfigError, match=r"variants.bad"):
        parse_params({"distill_ablation": {"variants": {"bad": [{"edge": "inter_ss", "loss": "fd"}]}}})
    with pytest.raises(ConfigError, match=r"listed twice"):
        parse_params({"distill": {"edges": [{"edge": "intra_ts", "loss": "fd"}, {"edge": "intra_ts_image", "loss": "fd"}]}})
    with pytest.raises(ConfigError, match=r"ensemble_members"):
        parse_params({"pretrain": {"ensemble_members": 0}})


def test_kg_config_checks_and_records_prototype_selection():
    kg = load_params(REPO_ROOT / "params.yaml").build_kg
    assert kg.prototype_selection() == {"prototypes_per_concept": kg.prototypes_per_concept, "mmr_lambda": kg.mmr_lambda, "prototype_pool": kg.prototype_pool}
    with pytest.raises(ConfigError, match=r"max_run \(2\) must be >= max_modifiers \(4\)"):
        parse_params({"build_kg": {"max_modifiers": 4, "max_run": 2}})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"pretrain": {"train": {"epochs": True}}}, "pretrain.train.epochs"),
        ({"split": {"seed": True}}, "split.seed"),  # `seed: yes` in YAML
        ({"split": {"val": False}}, "split.val"),
        ({"index": {"ivf": {"nlist": False}}}, "index.ivf.nlist"),
        ({"distill": {"edges": [{"edge": "inter_ss", "loss": "infonce", "weight": True}]}}, "distill.edges.0.weight"),
    ],
)
def test_booleans_are_not_numbers(data, key):
    with pytest.raises(ConfigError, match=rf"'{key}': .*must be a number, got .*(True|False)"):
        parse_params(data)


def test_unknown_keys_inside_lists_and_maps_list_the_keys_of_that_entry():
    with pytest.raises(ConfigError, match=r"unknown key 'distill.edges.0.wieght'; allowed keys here: edge, loss, weight, temperature$"):
        parse_params({"distill": {"edges": [{"edge": "inter_ss", "loss": "infonce", "wieght": 1}]}})
    with pytest.raises(ConfigError, match=r"unknown key 'distill.students.xt.arc'; allowed keys here: arch, pretrained, resize_mode$"):
        parse_params({"distill": {"students": {"xt": {"arc": "lc-vit-xt"}}}})
    with pytest.raises(ConfigError, match=r"unknown key 'distill_ablation.variants.v.0.foo'; allowed keys here: edge, loss, weight, temperature$"):
        parse_params({"distill_ablation": {"variants": {"v": [{"edge": "inter_ss", "loss": "infonce", "foo": 1}]}}})
