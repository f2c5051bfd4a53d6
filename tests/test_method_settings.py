"""Every method's settings are a typed dataclass checked by one strict checker (``lvlm_cl.settings.build``).

The cases are generated from the dataclasses themselves, so a new method, or a new setting, is covered without
editing this file: every numeric setting of every registered method is tried out of its range, with NaN, with
infinities, with a bool and with a string, through the constructor and through the registry's load-time check,
and the message must name the method, the setting, what it allows and the value. docs/methods.md's settings
tables must match the dataclasses (names, defaults, help).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml

from conftest import write_recipe
from lvlm_cl.config import ConfigError, MethodSpec, load_recipe
from lvlm_cl.methods import _lookup, available, build_methods, check_methods
from lvlm_cl.settings import (SEED_MAX, Range, Settings, SettingsError, allowed, build, fields, seed_setting,
                              setting, types_of)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def _base(tp) -> tuple[object, bool]:
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _fields(name: str):
    """(setting, its type without None, takes None, its range) for every field of method ``name``."""
    cls = _lookup(name).settings_class
    hints = types_of(cls)
    for key, f in fields(cls).items():
        base, nullable = _base(hints[key])
        yield key, base, nullable, f.metadata.get("range")


def _outside(rng: Range, integer: bool) -> list:
    """Values just outside ``rng`` (its bounds themselves when they are excluded)."""
    step = 1 if integer else 0.5
    out = []
    if rng.low is not None:
        out.append(rng.low if rng.low_open else rng.low - step)
    if rng.high is not None:
        out.append(rng.high if rng.high_open else rng.high + step)
    return [int(v) if integer else float(v) for v in out]


def _bad_values() -> list:
    """(method, setting, value) for every value each setting of each method must refuse."""
    cases = []
    for name in available():
        for key, base, nullable, rng in _fields(name):
            if base in (int, float):
                bad = _outside(rng, base is int) + [math.nan, math.inf, -math.inf, True, False, "1", [1]]
                bad.append(1.5 if base is int else 10 ** 400)          # not an integer; beyond any float
            elif base is bool:
                bad = [1, 0, "yes", "true"]
            else:                                        # a string or a Literal of strings
                bad = [1, True]
                if typing.get_origin(base) is Literal:
                    bad.append("no-such-choice")
            if not nullable:
                bad.append(None)
            cases += [pytest.param(name, key, value, id=f"{name}-{key}-{value!r:.12}") for value in bad]
    return cases


def test_every_setting_is_typed_documented_and_numbers_have_a_range():
    for name in available():
        cls = _lookup(name).settings_class
        assert dataclasses.is_dataclass(cls) and issubclass(cls, Settings), name
        assert cls.__dataclass_params__.frozen, f"{name}: settings are read-only"
        for key, base, nullable, rng in _fields(name):
            assert fields(cls)[key].metadata.get("help"), f"{name}.{key} has no help"
            allowed(types_of(cls)[key], rng)                       # a type the checker knows
            if base in (int, float):
                assert rng is not None, f"{name}.{key}: a number declares its range"
            if key == "seed":
                assert base is int and rng == Range(low=0, high=SEED_MAX), f"{name}.seed is seed_setting()"


@pytest.mark.parametrize("name", available())
def test_defaults_build_and_are_readable(name):
    cls = _lookup(name)
    method = cls()
    assert method.settings == cls.settings_class()
    assert dict(method.hparams) == dict(cls.defaults) == dataclasses.asdict(cls.settings_class())
    check_methods([MethodSpec(name)])
    [built] = build_methods([MethodSpec(name)])
    assert type(built) is cls
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(method.settings, "x", 1)
    with pytest.raises(TypeError):
        method.hparams["x"] = 1                                  # a read-only view


@pytest.mark.parametrize("name, key, value", _bad_values())
def test_a_bad_value_is_refused_naming_the_method_the_setting_the_range_and_the_value(name, key, value):
    cls = _lookup(name)
    words = allowed(types_of(cls.settings_class)[key], fields(cls.settings_class)[key].metadata.get("range"))
    expected = f"method '{name}': setting '{key}' must be {words}, got {value!r}"
    with pytest.raises(SettingsError) as e:
        cls(**{key: value})
    assert str(e.value).startswith(expected)
    with pytest.raises(ValueError) as e:
        check_methods([MethodSpec(name, {key: value})])
    assert str(e.value).startswith(expected)


@pytest.mark.parametrize("name", available())
def test_an_unknown_setting_lists_the_settings(name):
    settings = sorted(fields(_lookup(name).settings_class))
    message = f"method '{name}' has no setting 'no_such_setting'; its settings: {settings}"
    with pytest.raises(SettingsError, match=re.escape(message)):
        _lookup(name)(no_such_setting=1)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_methods([MethodSpec(name, {"no_such_setting": 1})])


def test_messages_say_the_range():
    cases = [("lwf", "temperature", 0, "must be a finite number > 0, got 0"),
             ("ewc", "gamma", 1.5, "must be a finite number > 0 and <= 1, got 1.5"),
             ("replay", "replay_ratio", 1, "must be a finite number >= 0 and < 1, got 1"),
             ("replay", "total_budget", -5, "must be an integer >= 0, or null, got -5"),
             ("replay", "seed", -1, "must be an integer from 0 to 4294967295, got -1"),
             ("task_prompts", "key_mode", "random", "must be one of ['prototypes', 'learned'], got 'random'"),
             ("task_lora", "vision", "yes", "must be true or false, got 'yes'"),
             ("cross_modal_moe", "anchors_per_task", 1, "must be an integer >= 2, got 1")]
    for name, key, value, words in cases:
        with pytest.raises(SettingsError, match=re.escape(f"method '{name}': setting '{key}' {words}")):
            _lookup(name)(**{key: value})


def test_an_integer_is_taken_for_a_float_and_stored_as_one():
    method = _lookup("task_lora")(alpha=32, key_weight=0)
    assert method.settings.alpha == 32.0 and isinstance(method.settings.alpha, float)
    assert isinstance(method.settings.key_weight, float)
    assert _lookup("replay")(memory_per_task=5).settings.memory_per_task == 5


def test_cross_field_rules_name_their_settings():
    cases = [("replay", {"memory_per_task": 5, "memory_fraction": 0.1}, "set exactly one of the settings"),
             ("replay", {"selection": "reservoir"}, "needs setting 'total_budget'"),
             ("ewc", {"online": False, "gamma": 0.9}, "'gamma' applies only with 'online: true'"),
             ("moelora", {"r": 6, "experts": 4}, "r=6 must be a multiple of experts=4"),
             ("task_lora", {"vision": False, "language": False}, "'vision' and 'language'")]
    for name, args, words in cases:
        with pytest.raises(SettingsError, match=re.escape(f"method '{name}': ") + ".*" + re.escape(words)):
            check_methods([MethodSpec(name, args)])


def test_a_recipe_value_yaml_reads_as_text_is_refused_with_the_fix(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"key 'methods': method 'ewc': setting 'lambda_' .*got '1e-4' .*1\.0e-4"):
        load_recipe(recipe, ["methods=[{name: ewc, lambda_: 1e-4}]"])
    cfg = load_recipe(recipe, ["methods=[{name: ewc, lambda_: 1.0e-4}]"])
    assert build_methods(cfg.methods)[0].settings.lambda_ == 1e-4


def test_the_checker_on_a_settings_class_of_its_own():
    @dataclasses.dataclass(frozen=True)
    class Toy(Settings):
        n: int = setting(3, low=1, high=9, help="a count")
        w: float | None = setting(None, above=0, help="a weight")
        mode: Literal["a", "b"] = setting("a", help="a choice")
        seed: int = seed_setting()

    assert build(Toy, {}, owner="toy") == Toy()
    assert build(Toy, {"n": 9, "w": 2, "mode": "b", "seed": SEED_MAX}, owner="toy") == Toy(9, 2.0, "b", SEED_MAX)
    for args, words in [({"n": 10}, "setting 'n' must be an integer from 1 to 9, got 10"),
                        ({"w": 0}, "setting 'w' must be a finite number > 0, or null, got 0"),
                        ({"w": -math.inf}, "setting 'w' must be a finite number > 0, or null, got -inf"),
                        ({"mode": None}, "setting 'mode' must be one of ['a', 'b'], got None"),
                        ({"seed": SEED_MAX + 1}, "setting 'seed' must be an integer from 0 to 4294967295")]:
        with pytest.raises(SettingsError, match=re.escape(f"toy: {words}")):
            build(Toy, args, owner="toy")

    @dataclasses.dataclass(frozen=True)
    class Unsupported(Settings):
        names: list = setting(None, help="a list")

    with pytest.raises(TypeError, match="a setting's type"):
        build(Unsupported, {"names": [1]}, owner="toy")
    with pytest.raises(TypeError, match="low or above"):
        setting(1.0, low=0, above=0, help="both")


# docs/methods.md


def _documented() -> dict[str, dict[str, tuple[object, str]]]:
    """method -> setting -> (default, meaning) from docs/methods.md's tables (| setting | default | meaning |)."""
    out = {}
    for section in re.split(r"^### ", DOCS.read_text(encoding="utf-8"), flags=re.M)[1:]:
        name = re.match(r"`(\w+)`", section)
        lines = section.splitlines()
        for i, line in enumerate(lines):
            if re.fullmatch(r"\|\s*setting\s*\|\s*default\s*\|\s*meaning\s*\|", line.strip()):
                rows = out.setdefault(name.group(1), {})
                for row in lines[i + 2:]:
                    if not row.startswith("|"):
                        break
                    key, default, meaning = (c.strip() for c in row.strip().strip("|").split("|"))
                    rows[key.strip("`")] = (yaml.safe_load(default.strip("`")), meaning)
    return out


def test_docs_tables_match_the_settings():
    documented = _documented()
    for name in available():
        cls = _lookup(name).settings_class
        declared = fields(cls)
        rows = documented.get(name, {})
        assert set(rows) == set(declared), f"docs/methods.md's table of {name} lists {sorted(rows)}, " \
                                           f"the settings are {sorted(declared)}"
        for key, (default, meaning) in rows.items():
            assert default == declared[key].default, f"{name}.{key}: docs say {default!r}, code {declared[key].default!r}"
            assert meaning.replace("`", "") == declared[key].metadata["help"], f"{name}.{key}: docs and help differ"
