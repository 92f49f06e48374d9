"""Loaded by every Python subprocess the tests start (via PYTHONPATH): refuse any non-loopback connection.

This is how the suite proves that nothing reaches an address other than 127.0.0.0/8.
"""

import ipaddress
import socket

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(address):
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise OSError(f"loopback guard: refusing to connect to a name, {host!r}") from None
        if not ip.is_loopback:
            raise OSError(f"loopback guard: refusing to connect to {host}")


def _connect(self, address):
    _check(address)
    return _real_connect(self, address)


def _connect_ex(self, address):
    _check(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _connect
socket.socket.connect_ex = _connect_ex
