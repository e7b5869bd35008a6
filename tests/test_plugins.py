"""The pluggable parts, scorers and rewriters, as configs name them: their registries, building from a short name,
class name, import path or class_path/init_args mapping, parsing by induce's options, and what `--help` lists."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonargparse
import pytest
import yaml

from destein_pl.evaluation.scorers import SCORERS, build_scorer
from destein_pl.induce import REWRITERS, build_rewriter, induce
from destein_pl.lightning.cli import main


def import_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def mapping(class_path: str, **init_args: Any) -> str:
    """A class_path/init_args mapping as a command line gives it when the parser refused it: built by `build`, so
    that the error names the problem."""
    return json.dumps({"class_path": class_path, "init_args": init_args})


@dataclass(frozen=True)
class Kind:
    """One kind of plugin, with examples of a config naming one: a (class, options, attributes) triple gives a class
    options, and the values they must set (attributes as dotted paths)."""

    name: str  # as options and errors say it
    registry: dict[str, type]
    build: Callable[[Any], Any]
    names: tuple[str, ...]  # the registry's short names, in order
    default: str  # induce's default
    config: tuple[str, dict[str, Any], dict[str, Any]]  # as class_path/init_args in a config file
    command_line: tuple[str, dict[str, Any], dict[str, Any]]  # as `--kind NAME --kind.option value`
    unknown_option: tuple[str, str]  # a class and an option it does not accept
    refused_value: tuple[str, dict[str, Any], str]  # a class, init_args it refuses, and the error
    help: tuple[str, tuple[str, ...], str]  # a class, its options, and words of its docstring
    listed: tuple[str, ...]  # what the commands' `--help` says of the registry
    options_at: dict[str, str]  # command: the option naming this kind there


SCORER = Kind(
    name="scorer", registry=SCORERS, build=build_scorer, names=("profanity-check", "hf-classifier", "perspective",
                                                             "jigsaw-bilstm"),
    default="profanity-check",
    config=("PerspectiveScorer", {"attribute": "INSULT", "max_consecutive_failures": 3},
            {"attribute": "INSULT", "max_consecutive_failures": 3, "languages": ["en"]}),
    command_line=(import_path(SCORERS["hf-classifier"]), {"model": "some/model", "max_length": 64},
                  {"model_name": "some/model", "max_length": 64}),
    unknown_option=("PerspectiveScorer", "api_key"),
    refused_value=("PerspectiveScorer", {"requests_per_second": 0}, "requests_per_second` must be"),
    help=("PerspectiveScorer", ("api_key_env", "url", "attribute", "languages", "requests_per_second", "max_retries",
                                "backoff_s", "timeout_s", "cache_path", "max_consecutive_failures"),
          "texts in a row got no score"),
    listed=("max_consecutive_failures: int | None = 10", "hf-classifier (HFClassifierScorer): model",
            "perspective (PerspectiveScorer)"),
    options_at={"test": "--model.evaluation.scorer", "induce": "--scorer"},
)
REWRITER = Kind(
    name="rewriter", registry=REWRITERS, build=build_rewriter, names=("self", "lexical", "openai-compatible", "none"),
    default="self",
    config=("OpenAICompatibleRewriter", {"url": "http://localhost:8000/v1", "model": "qwen", "max_retries": 1},
            {"endpoint": "http://localhost:8000/v1/chat/completions", "model": "qwen", "policy.max_retries": 1}),
    command_line=("LexicalRewriter", {"min_weight": 2.5}, {"min_weight": 2.5}),
    unknown_option=("LexicalRewriter", "weight"),
    refused_value=("SelfRewriter", {"max_new_tokens": 0}, "`max_new_tokens` must be at least 1"),
    help=("OpenAICompatibleRewriter", ("url", "model", "api_key_env", "instruction", "temperature", "max_tokens",
                                       "max_retries", "backoff_s", "timeout_s", "requests_per_second"),
          "sent as a bearer token when set"),
    listed=("min_weight: float = 1.0", "none (NonParallelRewriter): no options"),
    options_at={"induce": "--rewriter"},
)
KINDS = [SCORER, REWRITER]
SITES = [(kind, command) for kind in KINDS for command in kind.options_at]


def kind_id(value):
    return value.name if isinstance(value, Kind) else None


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    """Configs are built and parsed for every command, before any key is set: none may be read."""
    for variable in ("PERSPECTIVE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(variable, raising=False)


def assert_built(plugin, kind: Kind, class_name: str, attributes: dict[str, Any]) -> None:
    assert type(plugin).__name__ == class_name.rpartition(".")[2] and type(plugin) in kind.registry.values()
    for path, value in attributes.items():
        assert operator.attrgetter(path)(plugin) == value, path


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_registry_names_match_the_plugins(kind):
    assert {name: cls.name for name, cls in kind.registry.items()} == {n: n for n in kind.registry}
    assert tuple(kind.registry) == kind.names


@pytest.mark.parametrize("kind, spec, built, attributes", [
    (SCORER, "profanity-check", "ProfanityCheckScorer", {}),
    (SCORER, mapping("perspective", attribute="INSULT"), "PerspectiveScorer", {"attribute": "INSULT"}),
    (SCORER, "PerspectiveScorer", "PerspectiveScorer", {}),
    (SCORER, mapping(import_path(SCORERS["hf-classifier"]), model="some/model"), "HFClassifierScorer",
     {"model_name": "some/model"}),
    (REWRITER, "none", "NonParallelRewriter", {}),
    (REWRITER, mapping("self", max_new_tokens=4), "SelfRewriter", {}),
    (REWRITER, mapping("lexical", min_weight=2.0), "LexicalRewriter", {"min_weight": 2.0}),
    (REWRITER, "LexicalRewriter", "LexicalRewriter", {}),
    (REWRITER, import_path(REWRITERS["none"]), "NonParallelRewriter", {}),
], ids=kind_id)
def test_a_plugin_is_built_from_what_a_config_names_and_an_instance_is_taken_as_is(kind, spec, built, attributes):
    plugin = kind.build(spec)
    assert_built(plugin, kind, built, attributes)
    assert kind.build(plugin) is plugin


@pytest.mark.parametrize("kind, spec, message", [
    (SCORER, "detoxify", "unknown scorer 'detoxify'; accepted: profanity-check, hf-classifier, perspective"),
    (SCORER, mapping("perspective", api_key="secret"),
     "unexpected keyword argument 'api_key'.*accepted options: api_key_env, url"),
    (REWRITER, "gpt", "unknown rewriter 'gpt'; accepted: self, lexical, openai-compatible, none"),
    (REWRITER, mapping("openai-compatible", model="m"),
     "missing a required argument: 'url'.*accepted options: url, model"),
    (REWRITER, mapping("LexicalRewriter", weight=3), "unexpected keyword argument 'weight'; accepted options: min_weight"),
], ids=kind_id)
def test_a_plugin_that_cannot_be_built_is_an_error_naming_what_is_accepted(kind, spec, message):
    with pytest.raises(ValueError, match=message):
        kind.build(spec)


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_a_plugin_of_the_other_kind_is_refused(kind):
    (other,) = [k for k in KINDS if k is not kind]
    with pytest.raises(ValueError, match=f"not a {kind.name}"):
        kind.build(import_path(next(iter(other.registry.values()))))


def induce_parser() -> jsonargparse.ArgumentParser:
    """The parser of induce's options, which name a scorer and a rewriter."""
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(induce)
    return parser


def class_config(path, kind: Kind, class_path: str, init_args: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump({kind.name: {"class_path": class_path, "init_args": init_args}}))
    return str(path)


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_a_plugin_parses_as_short_name_or_class_path(kind, tmp_path):
    parser = induce_parser()
    assert getattr(parser.parse_args([]), kind.name) == kind.default
    for name in kind.registry:
        assert getattr(parser.parse_args([f"--{kind.name}", name]), kind.name) == name
    class_path, init_args, attributes = kind.config
    config = class_config(tmp_path / "config.yaml", kind, class_path, init_args)
    assert_built(getattr(parser.instantiate(parser.parse_args(["--config", config])), kind.name), kind, class_path,
                 attributes)
    spec, options, attributes = kind.command_line
    args = [f"--{kind.name}", spec, *[arg for o, v in options.items() for arg in (f"--{kind.name}.{o}", str(v))]]
    plugin = getattr(parser.instantiate(parser.parse_args(args)), kind.name)
    assert_built(plugin, kind, spec, attributes)
    assert kind.build(plugin) is plugin


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_plugin_config_errors_name_the_option(kind, tmp_path):
    parser = induce_parser()
    class_path, option = kind.unknown_option
    config = class_config(tmp_path / "config.yaml", kind, class_path, {option: 2})
    with pytest.raises(jsonargparse.ArgumentError, match=f"Option '{option}' is not accepted"):
        parser.parse_args(["--config", config])
    class_path, init_args, message = kind.refused_value
    config = class_config(tmp_path / "config.yaml", kind, class_path, init_args)
    with pytest.raises((jsonargparse.ArgumentError, ValueError), match=message):
        parser.instantiate(parser.parse_args(["--config", config]))


def printed_help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("kind, command", SITES, ids=kind_id)
def test_help_lists_every_plugin_with_its_options(kind, command, capsys):
    printed = printed_help(capsys, command, "--help")
    for name, cls in kind.registry.items():
        assert f"{name} ({cls.__name__}):" in printed
    for text in kind.listed:
        assert text in printed


@pytest.mark.parametrize("kind, command", SITES, ids=kind_id)
def test_a_plugin_class_help_lists_its_options(kind, command, capsys):
    option = kind.options_at[command]
    class_name, options, description = kind.help
    printed = printed_help(capsys, command, f"{option}.help", class_name)
    for name in options:
        assert f"{option}.{name}" in printed
    assert description in " ".join(printed.split())  # the docstring's description of an option
