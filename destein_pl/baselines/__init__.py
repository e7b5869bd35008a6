"""Baselines: the detoxification methods a user would pick instead of DeStein, each one file, measured by the same
protocol (`destein_pl.baselines.method`)."""

from destein_pl.baselines.actadd import ActAdd
from destein_pl.baselines.dexperts import DExperts
from destein_pl.baselines.iti import ITI
from destein_pl.baselines.method import METHODS, Method, register
from destein_pl.baselines.prompting import Prompting
from destein_pl.baselines.self_detoxify import SelfDetoxify
from destein_pl.baselines.word_filter import WordFilter
from destein_pl.plugins import build_plugin


def build_method(spec: Method | str) -> Method:
    """The method `spec` names: an instance, a short name of `METHODS`, a class name, an import path, or a
    class_path/init_args mapping."""
    return build_plugin(spec, Method, METHODS, "method")


__all__ = ["ITI", "METHODS", "ActAdd", "DExperts", "Method", "Prompting", "SelfDetoxify", "WordFilter", "build_method", "register"]
