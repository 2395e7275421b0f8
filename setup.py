"""The compiled parts, both optional: without a C compiler the install goes on.

- the agent's vfork child (agent/runners/_vspawn.c); without it the agent forks in Python
  (rune.agent.runners.spawn picks whichever is there);
- rune-parked (agent/runners/parked.c), a static program the agent parks in a container
  for its next exec there (rune.agent.runners.parked); without it every exec into a
  container starts runc.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PARKED_SOURCE = "agent/runners/parked.c"
PARKED_PROGRAM = "rune-parked"


class BuildWithParked(build_ext):
    """build_ext, and rune-parked linked statically beside the agent's extension (a
    container may have no libc, or another one)."""

    def run(self) -> None:
        super().run()
        target = os.path.join(os.path.dirname(self.get_ext_fullpath(
            "rune.agent.runners._vspawn")), PARKED_PROGRAM)
        try:
            objects = self.compiler.compile([PARKED_SOURCE], output_dir=self.build_temp,
                                            extra_postargs=["-Os"])
            self.compiler.link_executable(objects, PARKED_PROGRAM,
                                          output_dir=os.path.dirname(target),
                                          extra_preargs=["-static", "-s"])
        except Exception as exc:  # no compiler or no static libc: the agent starts runc
            print(f"warning: {PARKED_PROGRAM} not built ({exc}); execs into containers "
                  "will start runc each time")


setup(ext_modules=[Extension("rune.agent.runners._vspawn", ["agent/runners/_vspawn.c"],
                             optional=True)],
      cmdclass={"build_ext": BuildWithParked})
