"""The build backend: setuptools', run so that the extension is compiled against the torch the
package will run with, never a second one.

pip builds in an isolated environment that holds only the build requirements. Listing torch among
them would download a torch (a CUDA build of several GB, often another version than the user's)
just to compile against, and the extension would then not match the torch it runs with. Instead,
when torch is not importable here, the target environment's own site-packages (which pip's
isolation hides, though the interpreter is the target's) are appended to sys.path, after the
build requirements, so that setup.py compiles against the user's torch. With no torch installed
at all, setup.py builds a wheel without the extension, and `fastlm build` compiles it later.
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig

if importlib.util.find_spec("torch") is None:
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in sys.path:
            sys.path.append(path)

from setuptools.build_meta import *  # noqa: E402,F401,F403
