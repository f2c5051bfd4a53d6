import pytest

from lvlm_cl.config import ConfigError, LoraSettings, load_recipe, to_dict


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "output_dir: out\nbenchmark: seq5\n"


def test_minimal_recipe_gets_typed_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE))
    assert cfg.benchmark.name == "seq5" and cfg.trainer.lr == 3e-4 and cfg.model.path == "builtin:tiny-llava"
    assert cfg.methods == [] and cfg.model.lora is None


def test_unknown_key_names_the_key_and_file(tmp_path):
    p = write(tmp_path, BASE + "trainer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert "trainer.learning_rate" in str(e.value) and str(p) in str(e.value) and "lr" in str(e.value)


@pytest.mark.parametrize("line, key", [
    ("trainer:\n  lr: fast\n", "trainer.lr"),
    ("trainer:\n  batch_size: 2.5\n", "trainer.batch_size"),
    ("model:\n  freeze_vision_tower: maybe\n", "model.freeze_vision_tower"),
    ("trainer:\n  lr_schedule: exponential\n", "trainer.lr_schedule"),
    ("seed: true\n", "seed"),
])
def test_wrong_type_names_the_key(tmp_path, line, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(write(tmp_path, BASE + line))


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_recipe(p, ["trainer.lr=1e-4", "model.tiny.text_layers=3", "model.lora.r=4", "methods=[multitask]"])
    assert cfg.trainer.lr == 1e-4 and cfg.model.tiny.text_layers == 3
    assert isinstance(cfg.model.lora, LoraSettings) and cfg.model.lora.r == 4
    assert [m.name for m in cfg.methods] == ["multitask"]
    with pytest.raises(ConfigError, match="trainer.nope"):
        load_recipe(p, ["trainer.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(p, ["trainer.lr"])


def test_unknown_method_and_setting_list_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown method 'magic'.*finetune"):
        load_recipe(write(tmp_path, BASE + "methods: [magic]\n"))
    with pytest.raises(ConfigError, match="has no setting 'alpha'"):
        load_recipe(write(tmp_path, BASE + "methods:\n  - {name: multitask, alpha: 1}\n"))


def test_unknown_metric_is_rejected(tmp_path):
    text = "output_dir: out\ntasks:\n  - {name: a, train: a.jsonl, eval: b.jsonl, metric: bleu9}\n"
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.metric"):
        load_recipe(write(tmp_path, text))


def test_benchmark_and_tasks_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        load_recipe(write(tmp_path, "output_dir: out\n"))
    with pytest.raises(ConfigError, match="exactly one"):
        load_recipe(write(tmp_path, BASE + "tasks:\n  - {name: a, train: a, eval: b, metric: vqa}\n"))


def test_steps_or_epochs(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'trainer.steps_per_task'"):
        load_recipe(write(tmp_path, BASE + "trainer:\n  epochs_per_task: 1\n"))
    cfg = load_recipe(write(tmp_path, BASE + "trainer:\n  epochs_per_task: 1.5\n  steps_per_task: null\n"))
    assert cfg.trainer.epochs_per_task == 1.5


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = load_recipe(write(tmp_path, BASE + "methods:\n  - multitask\n"), ["trainer.lr=5e-4"])
    resolved = to_dict(cfg)
    again = write(tmp_path, yaml.safe_dump(resolved))
    assert to_dict(load_recipe(again)) == resolved


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_method_setting_value_fails_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match=r"methods.*replay.*replay_ratio"):
        load_recipe(write(tmp_path, BASE + "methods:\n  - {name: replay, replay_ratio: 1.5}\n"))


def test_nested_optional_section_error_names_the_inner_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.lora\.r'.*expected an integer"):
        load_recipe(write(tmp_path, BASE + "model:\n  lora: {r: eight}\n"))
