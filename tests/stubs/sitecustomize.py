"""Lets PyPI's torchvision (a CUDA build) import beside the CPU torch wheel, for test oracles only.

Its C extension needs CUDA torch and fails while registering `torchvision._meta_registrations`;
the pure-Python models (VGG16, Inception3) that `lpips` and `pytorch-fid` build do not need it.
An empty module under that name must exist before anything imports torchvision, and transformers
imports torchvision whenever it is installed, so every test process loads this file first:
the test session through tests/conftest.py, subprocesses through PYTHONPATH.
"""

import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
