"""The names callers import from `labctl.runner.ssh` (the runner before it was split into `runner.reach`,
`runner.setup` and `runner.system_ssh`): the package's own, plus `DEFAULT_USER`. One list, in `labctl.runner`.
"""

from labctl.runner import *  # noqa: F403 - the package's names, listed once in its __all__
from labctl.runner import __all__ as _package_names
from labctl.runner.reach import DEFAULT_USER

__all__ = [*_package_names, "DEFAULT_USER"]
