"""Configuration is declared once, and the README documents every option."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Settings, options

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_option_is_in_the_readme():
    text = README.read_text()
    missing = [name for name, _, _ in options() if name not in text]
    assert not missing, f"options missing from README.md: {missing}"


def test_environment_then_flags():
    env = {"PREHEAT_PORT": "9000", "PREHEAT_CAPTURE": "off", "PREHEAT_READ_TIMEOUT": "2.5",
           "PREHEAT_ENGINE_ARGS": "--a --b"}
    s = Settings.from_env(env, port=9100)
    assert s.port == 9100 and s.capture is False and s.read_timeout == 2.5
    assert s.engine_args == ("--a", "--b")


def test_retention_is_unset_unless_asked_for():
    assert Settings.from_env({}).retain_days is None
    assert Settings.from_env({"PREHEAT_RETAIN_DAYS": "0.5"}).retain_days == 0.5
    assert Settings.from_env({"PREHEAT_CAPTURE_QUEUE_BYTES": "1024"}).capture_queue_bytes == 1024


def test_bad_value_says_which_variable():
    with pytest.raises(ValueError, match="PREHEAT_PORT='eighty' is not a valid int"):
        Settings.from_env({"PREHEAT_PORT": "eighty"})


def test_every_optimisation_has_a_flag_that_switches_it_off():
    from proxy import cli

    args = cli.build_parser().parse_args(
        ["serve", "--no-admission", "--no-admission-suspend", "--no-admission-guests",
         "--no-admission-evict-done", "--no-admission-handoff", "--no-admission-priority", "--no-ordering", "--no-prompt-cache", "--no-prewarm",
         "--no-prewarm-static"])
    settings = cli._settings(args, **{n: getattr(args, n) for n in cli.OPTIMISATIONS})
    assert all(getattr(settings, n) is False for n in cli.OPTIMISATIONS)
    untouched = cli.build_parser().parse_args(["serve"])
    env = {"PREHEAT_PREWARM_STATIC": "0"}
    flags = {n: getattr(untouched, n) for n in cli.OPTIMISATIONS}
    assert flags == dict.fromkeys(cli.OPTIMISATIONS)  # no flag: the environment decides
    assert not cli.Settings.from_env(env, **flags).prewarm_static


def test_a_switch_off_by_default_has_a_flag_that_switches_it_on():
    from proxy import cli

    on = cli.build_parser().parse_args(["serve", "--admission-bound-guests"])
    assert cli._settings(on, admission_bound_guests=on.admission_bound_guests).admission_bound_guests
    off = cli.build_parser().parse_args(["serve"])
    assert off.admission_bound_guests is None  # no flag: the environment decides
    env = {"PREHEAT_ADMISSION_BOUND_GUESTS": "1"}
    assert cli.Settings.from_env(env, admission_bound_guests=None).admission_bound_guests
    assert not cli.Settings.from_env({}, admission_bound_guests=None).admission_bound_guests
