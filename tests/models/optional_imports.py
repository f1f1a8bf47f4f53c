"""Importing the optional reference packages (transformers, open_clip) in the model tests."""

import sys
import types

import pytest


def import_or_skip(name: str):
    """``pytest.importorskip(name)``, working around a PyPI torchvision wheel (a CUDA build) beside the CPU
    torch: it fails while registering its meta kernels (nms, roi_align), which these tests never use."""
    try:
        return pytest.importorskip(name)
    except RuntimeError as err:
        if "torchvision" not in str(err):
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", name))]:
            del sys.modules[mod]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        return pytest.importorskip(name)
