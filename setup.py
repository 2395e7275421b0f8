"""The one compiled part: the agent's vfork child (agent/runners/_vspawn.c).

Optional: without a C compiler the install goes on and the agent forks in Python instead
(rune.agent.runners.spawn picks whichever is there).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rune.agent.runners._vspawn", ["agent/runners/_vspawn.c"],
                             optional=True)])
