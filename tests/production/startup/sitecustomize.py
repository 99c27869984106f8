"""Registers a folder of open_clip model configs with open_clip in every process that imports it.

tests/production/chain.py puts this folder on PYTHONPATH of the `recap` processes it starts
(torchrun's workers inherit it) and names the config folder in RECAP_OPEN_CLIP_CONFIGS; Python
runs this file at start-up. When a process imports open_clip, the folder is added with
``open_clip.add_model_config`` (what a site with its own architectures calls), so that
``captioner.model_name`` names the small CoCa the way the presets name coca_ViT-L-14: the stages'
named-architecture path, looked up in open_clip's registry. Not at start-up itself: importing
open_clip costs seconds, and most processes (the launcher, reader workers) never do.
"""

import importlib.abc
import importlib.util
import os
import sys

_FOLDER = os.environ.get("RECAP_OPEN_CLIP_CONFIGS")


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds open_clip as usual, then runs add_model_config right after the module has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "open_clip":
            return None
        sys.meta_path.remove(self)  # once; and find_spec below must not come back here
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def load_and_register(module):
            load(module)
            module.add_model_config(_FOLDER)

        spec.loader.exec_module = load_and_register
        return spec


if _FOLDER:
    sys.meta_path.insert(0, _RegisterOnImport())
