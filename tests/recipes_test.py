"""The recipe registry and the flags a config declares on its fields: each command's flags come from its
recipe's config, a flag sets exactly its field, a resume names the flags that contradict the recorded run,
and no command resumes, overwrites or writes beside another kind of run."""

import argparse
import dataclasses
import os
import sys

import procs
import pytest

from jmaml import cli
from jmaml.core import flags
from jmaml.engine import runstore
from jmaml.run import runs
from jmaml.run.config import TrainConfig
from jmaml.run.rl_recipe import RLConfig

_EXAMPLES = {int: "7", float: "0.25"}


def _example(option):
    """A command-line value for a flag and the field value it should give, other than the default."""
    f = option.flag
    if f.const is not flags._NO_CONST:
        return [], f.const
    if f.choices:
        value = next(c for c in f.choices if c != option.default)
        return [str(value)], value
    if f.parse is flags.ints:
        return ["3,4"], (3, 4)
    if f.parse is flags.floats:
        return ["0.5,0.25"], (0.5, 0.25)
    if f.parse in _EXAMPLES:
        return [_EXAMPLES[f.parse]], f.parse(_EXAMPLES[f.parse])
    if f.parse is not None and f.parse.__name__ == "block_size":
        return ["5"], 5
    return ["some-text"], "some-text"


@pytest.mark.parametrize("cls", [TrainConfig, RLConfig])
def test_every_flag_sets_exactly_its_field(cls):
    table = flags.options(cls)
    assert table, f"{cls.__name__} declares no flags"
    for dest, option in table.items():
        parser = argparse.ArgumentParser()
        flags.add_flags(parser, cls)
        words, value = _example(option)
        args = parser.parse_args([option.spelling, *words])
        got = flags.given(args, cls)
        assert got == {field: value for field in option.fields}, dest
        assert value != option.default, dest  # the example can tell the flag was read
        config = dataclasses.replace(cls(), **got)
        for field in option.fields:
            assert getattr(config, field) == value, (dest, field)
        assert flags.given(parser.parse_args([]), cls) == {}  # nothing given, nothing set


def test_the_commands_take_their_recipes_flags():
    """jmaml train takes every TrainConfig flag and jmaml rl every RLConfig flag, with the field's help."""
    parser = cli.build_parser()
    commands = {a.dest: a for a in parser._subparsers._group_actions}["command"].choices
    for recipe in runs.RECIPES.values():
        sub = commands[recipe.command]
        spellings = {s for a in sub._actions for s in a.option_strings}
        for option in flags.options(recipe.config).values():
            assert option.spelling in spellings, (recipe.command, option.spelling)
        assert runs.for_task(recipe.tasks[0]) is recipe
    with pytest.raises(ValueError, match="task must be one of .*'pendulum'.*got 'chess'"):
        runs.for_task("chess")


def test_conflicts_name_the_flag_its_value_and_the_recorded_one():
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, RLConfig)
    recorded = RLConfig(horizon=50)
    args = parser.parse_args(["--horizon", "60", "--episodes", "20", "--no-pretrain"])
    assert flags.conflicts(args, RLConfig, recorded) == ["--horizon 60 (recorded 50)",
                                                        "--no-pretrain (recorded True)"]
    with pytest.raises(ValueError, match=r"recorded in D/rl_config.json; these flags contradict it: --horizon 60 "
                                         r"\(recorded 50\); --no-pretrain"):
        flags.refuse_conflicts(args, RLConfig, recorded, "D/rl_config.json")
    flags.refuse_conflicts(parser.parse_args(["--horizon", "50"]), RLConfig, recorded, "D")  # agreeing: fine


def test_a_config_cannot_declare_one_flag_twice():
    @dataclasses.dataclass(frozen=True)
    class Twice:
        a: int = flags.setting(1, "a", name="x", parse=int)
        b: int = flags.setting(2, "b", name="x", parse=int)

    with pytest.raises(TypeError, match="declares the flag --x twice"):
        flags.options(Twice)


def test_the_recipes_records_are_the_run_stores(tmp_path):
    for recipe in runs.RECIPES.values():
        assert runstore.RUN_RECORDS[recipe.config_file] == recipe.name
        folder = tmp_path / recipe.name
        folder.mkdir()
        (folder / recipe.config_file).write_text("{}")
        assert runstore.run_record(str(folder)) == (recipe.name, recipe.config_file)
        recipe.refuse_other_runs(str(folder))  # its own kind: fine
    assert runstore.run_record(str(tmp_path / "missing")) is None


def _folder_of(kind, tmp_path):
    """A folder holding a run of ``kind`` as its record file marks it (the command refuses before reading it)."""
    folder = tmp_path / kind
    folder.mkdir(parents=True)
    name = {"supervised": "config.json", "rl": "rl_config.json", "sweep": "sweep-args.json"}[kind]
    (folder / name).write_text('{"kept": true}')
    return folder


_COMMANDS = {"supervised": ["train", "--steps", "2", "--log-every", "1", "--no-eval"],
             "rl": ["rl", "--steps", "2", "--no-eval"],
             "sweep": ["sweep", "--steps", "2", "--log-every", "1", "--alpha", "0.01", "--beta", "0.01"]}


@pytest.mark.parametrize("kind", ["supervised", "rl", "sweep"])
@pytest.mark.parametrize("mode", ["--overwrite", "--resume"])
def test_no_command_touches_another_kind_of_run(tmp_path, capsys, kind, mode):
    """Every (command, other kind of run) pair: refused by name, before a file is written or removed."""
    for command, argv in _COMMANDS.items():
        if command == kind:
            continue
        folder = _folder_of(kind, tmp_path / command)
        before = sorted(os.listdir(folder))
        code = cli.main([*argv, "--out", str(folder), mode])
        err = capsys.readouterr().err
        assert code == 2, (command, kind, err)
        named = {"supervised": "a jmaml train run", "rl": "a jmaml rl run", "sweep": "a jmaml sweep run"}[kind]
        assert "holds another kind of run" in err and named in err, err
        assert sorted(os.listdir(folder)) == before, (command, kind)
        assert '"kept": true' in (folder / before[0]).read_text()


def test_a_python_sweep_refuses_a_training_run_folder(tmp_path):
    from jmaml.run import sweep

    folder = _folder_of("supervised", tmp_path)
    with pytest.raises(ValueError, match="holds another kind of run .*jmaml train run: config.json"):
        sweep.run_sweep(TrainConfig(steps=2, log_every=1, checkpoint_every=1, pretrain=False),
                        sweep.Grid((0.01,), (0.01,), (1,), (0,)), run_dir=str(folder))
    assert sorted(os.listdir(folder)) == ["config.json"]


def test_jmaml_rl_resume_refuses_a_contradicting_flag_by_name(tmp_path):
    """The recorded RLConfig is the run: a flag that contradicts it is named, a flag that agrees is fine."""
    folder = tmp_path / "rl"
    folder.mkdir()
    recorded = RLConfig(horizon=8, steps=4)
    import json

    (folder / "rl_config.json").write_text(json.dumps(dataclasses.asdict(recorded)))
    args = cli.build_parser().parse_args(["rl", "--out", str(folder), "--resume", "--horizon", "9", "--steps", "4"])
    with pytest.raises(ValueError, match=r"--horizon 9 \(recorded 8\)\. Drop them"):
        cli._rl_config(args)
    args = cli.build_parser().parse_args(["rl", "--out", str(folder), "--resume", "--steps", "4"])
    assert cli._rl_config(args) == recorded
    # --steps lengthens the recorded run, as in jmaml train (rl_recipe.train refuses shortening it)
    args = cli.build_parser().parse_args(["rl", "--out", str(folder), "--resume", "--steps", "10"])
    assert cli._rl_config(args) == dataclasses.replace(recorded, steps=10)


def test_jmaml_train_help_comes_from_the_config(capsys):
    out = procs.run([sys.executable, "-m", "jmaml", "train", "--help"])
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for option in flags.options(TrainConfig).values():
        assert " ".join(option.flag.help.split())[:40] in text, option.dest


def test_jmaml_rl_takes_the_papers_settings_for_locomotion_where_no_flag_says_otherwise(tmp_path, monkeypatch):
    """The locomotion families train with the paper's horizon 200 and 40 tasks per meta-step (ant direction: 40
    episodes per step); a flag wins; navigation keeps RLConfig's defaults (its own paper settings)."""
    monkeypatch.setattr(RLConfig, "parts", lambda self: None)  # validate builds the env: brax is an optional extra
    parse = cli.build_parser().parse_args
    out = str(tmp_path / "rl")
    cheetah = cli._rl_config(parse(["rl", "--out", out, "--env", "halfcheetah_velocity"]))
    assert (cheetah.horizon, cheetah.meta_batch_size, cheetah.inner_episodes) == (200, 40, 20)
    ant = cli._rl_config(parse(["rl", "--out", out, "--env", "ant_direction"]))
    assert (ant.inner_episodes, ant.outer_episodes) == (40, 40)
    small = cli._rl_config(parse(["rl", "--out", out, "--env", "ant_direction", "--horizon", "8", "--episodes", "3"]))
    assert (small.horizon, small.meta_batch_size, small.inner_episodes, small.outer_episodes) == (8, 40, 3, 3)
    assert cli._rl_config(parse(["rl", "--out", out])) == RLConfig()
    assert RLConfig(env="ant_velocity").horizon == 100  # the dataclass keeps its plain defaults
    with pytest.raises(ValueError, match="env must be one of .*got 'chess'"):
        RLConfig.paper("chess")
