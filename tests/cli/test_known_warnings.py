"""labctl's commands do not print the warnings cryptography 51 gives when asyncssh is imported (DSA names)."""

from __future__ import annotations

import subprocess
import sys

# The warning as cryptography 51 gives it from asyncssh's modules (CryptographyDeprecationWarning is a
# UserWarning), then the same text from elsewhere and another warning from asyncssh: those two must still show.
PROBE = r"""
import warnings
from labctl.cli import quiet_known_warnings
{setup}
dsa = "DSA is deprecated and support will be removed in a future release. Use a more modern signature algorithm."
warnings.warn_explicit(dsa, UserWarning, "asyncssh/crypto/misc.py", 32, module="asyncssh.crypto.misc")
warnings.warn_explicit(dsa, UserWarning, "asyncssh/crypto/dsa.py", 38, module="asyncssh.crypto.dsa")
warnings.warn_explicit(dsa, UserWarning, "elsewhere.py", 1, module="elsewhere")
warnings.warn_explicit("something else", UserWarning, "asyncssh/connection.py", 9, module="asyncssh.connection")
"""


def warned(setup: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                          timeout=60, check=True)
    return [line.split(": UserWarning")[0] for line in done.stderr.splitlines() if "UserWarning" in line]


def test_asyncssh_dsa_warnings_are_quiet_and_nothing_else():
    assert warned("quiet_known_warnings()") == ["elsewhere.py:1", "asyncssh/connection.py:9"]


def test_without_it_every_one_shows():
    """The control: the probe's four warnings reach stderr when labctl does not quiet them."""
    assert warned("") == ["asyncssh/crypto/misc.py:32", "asyncssh/crypto/dsa.py:38", "elsewhere.py:1",
                          "asyncssh/connection.py:9"]
