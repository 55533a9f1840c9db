"""ml_collections config files loaded by path: configs/NAME.py define get_config(arg) and configs/
is not a package, so a config that builds on another (configs/shapes_vq.py, configs/evals/shapes.py
on configs/shapes_tiny.py), the benchmarks and the tests load them with these."""
from __future__ import annotations

import importlib.util
import os
import types


def load_config_module(path: str) -> types.ModuleType:
    """The config file at `path` as a fresh module (not entered in sys.modules)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist; pass the path of a configs/NAME.py file.")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str, arg: str | None = None):
    """`get_config(arg)` of the config file at `path` (an ml_collections.ConfigDict)."""
    module = load_config_module(path)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} has no get_config(arg) function.")
    return module.get_config(arg)
