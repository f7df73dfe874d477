"""Authenticated, encrypted node traffic: CurveZMQ with keys made for one run (``security: curve``).

A run makes two key pairs (``zmq.curve_keypair``): the *server* pair of every socket that binds
(a shard node's upstream side) and the *client* pair of every socket that connects (the device's
driver, a shard node's link to the next hop).  They reach the node programs as files in the run's
folder, mode 0600, whose path is a field of the programs' typed settings (never a key on a
command line):

- ``curve-node.json`` for shard nodes: both pairs (a node serves upstream and connects downstream);
- ``curve-device.json`` for drivers: the client pair and the server's public key only.

A node program builds its ZeroMQ context with :func:`context`; every socket of that context is
then secured where it is bound or connected (:class:`CurveContext`), so code that makes sockets
(``ctx.socket(...)``) needs no change.  A bound socket is a CURVE server whose ZAP handler
(pyzmq's ``ThreadAuthenticator``) admits the run's client key and nothing else: a peer without
the run's keys never completes the handshake, gets no reply and cannot put a message on a node's
queue.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from testbed.spec.errors import SpecError

NODE_FILE = "curve-node.json"
DEVICE_FILE = "curve-device.json"
ZAP_DOMAIN = "edgellm"
_FIELDS = ("server_public", "server_secret", "client_public", "client_secret")
Z85_KEY_LEN = 40  # a 32-byte key in Z85 text


@dataclass(frozen=True)
class CurveKeys:
    """One run's keys (Z85 text, as ``zmq.curve_keypair`` makes them); ``server_secret`` is None in
    a device's file."""

    server_public: bytes
    server_secret: bytes | None
    client_public: bytes
    client_secret: bytes

    @classmethod
    def new(cls) -> CurveKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def for_device(self) -> CurveKeys:
        """The same keys without the server's secret."""
        return CurveKeys(self.server_public, None, self.client_public, self.client_secret)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (never a moment with wider permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_run_keys(run_dir: str | Path, keys: CurveKeys | None = None) -> tuple[Path, Path]:
    """Make (or take) a run's keys and write the node and device files into ``run_dir``.

    Returns ``(node_file, device_file)``.  Files of an earlier run in the same folder are replaced
    (each run has its own keys)."""
    keys = keys or CurveKeys.new()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = run_dir / NODE_FILE, run_dir / DEVICE_FILE
    for path, k in zip(paths, (keys, keys.for_device()), strict=True):
        path.unlink(missing_ok=True)
        _write_private(path, json.dumps({f: (v.decode() if (v := getattr(k, f)) else None) for f in _FIELDS}))
    return paths


def run_key_files(security: str, run_dir: str | Path) -> tuple[str | None, str | None]:
    """``(node_file, device_file)`` for a run whose topology says ``security: security``:
    fresh keys written into ``run_dir`` for ``curve``, ``(None, None)`` for ``none``."""
    if security == "none":
        return None, None
    if security != "curve":
        raise ValueError(f"unknown security {security!r}")
    node, device = write_run_keys(run_dir)
    return str(node), str(device)


def key_file_problem(path: str | None) -> str | None:
    """What is wrong with a settings field naming a keys file, or None (None: no security)."""
    if path is None:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot read the keys file ({e.strerror or e})"
    if not stat.S_ISREG(mode):
        return "must be a keys file"
    if mode & 0o077:
        return f"the keys file must be readable by its owner only (mode 0600, not {stat.S_IMODE(mode):04o})"
    return None


def read_keys(path: str | Path) -> CurveKeys:
    """The keys in a file written by :func:`write_run_keys`; SpecError (one line) if it is not one."""
    problem = key_file_problem(str(path))
    if problem:
        raise SpecError(path, "file", problem)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SpecError(path, "file", f"not a keys file ({e})") from None
    if not isinstance(data, dict) or set(data) != set(_FIELDS):
        raise SpecError(path, "file", f"must hold exactly {', '.join(_FIELDS)}")
    values: dict[str, bytes | None] = {}
    for f in _FIELDS:
        v = data[f]
        if v is None and f == "server_secret":
            values[f] = None
            continue
        if not isinstance(v, str) or len(v) != Z85_KEY_LEN or not v.isascii():
            raise SpecError(path, f, f"must be a {Z85_KEY_LEN}-character Z85 key")
        values[f] = v.encode()
    return CurveKeys(**values)  # type: ignore[arg-type]


class _Admit:
    """ZAP credentials check: the run's client key, and no other."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public

    def callback(self, _domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.client_public)


class CurveSocket(zmq.Socket):
    """A socket that is a CURVE server where it binds and a CURVE client where it connects."""

    def bind(self, addr: str) -> Any:
        keys: CurveKeys = self.context._curve_keys  # type: ignore[attr-defined]
        if keys.server_secret is None:
            raise PermissionError("this program's keys cannot serve (no server secret key)")
        self.context._start_auth()  # type: ignore[attr-defined]
        self.setsockopt(zmq.CURVE_SERVER, 1)
        self.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
        self.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        return super().bind(addr)

    def connect(self, addr: str) -> Any:
        keys: CurveKeys = self.context._curve_keys  # type: ignore[attr-defined]
        self.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        self.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        self.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
        return super().connect(addr)


class CurveContext(zmq.Context):
    """A ZeroMQ context whose sockets all use CurveZMQ with one run's keys."""

    _socket_class = CurveSocket
    # declared here: pyzmq takes any other attribute name for a socket option
    _curve_keys: CurveKeys
    _auth: ThreadAuthenticator | None
    _auth_lock: threading.Lock

    def __init__(self, keys: CurveKeys, io_threads: int = 1) -> None:
        super().__init__(io_threads)
        self._curve_keys = keys
        self._auth: ThreadAuthenticator | None = None
        self._auth_lock = threading.Lock()

    def _start_auth(self) -> None:
        """The ZAP handler (one thread), started with the first bound socket."""
        with self._auth_lock:
            if self._auth is None:
                auth = ThreadAuthenticator(self)
                auth.start()
                admit = _Admit(self._curve_keys.client_public)
                auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=admit)
                self._auth = auth

    def term(self) -> None:
        with self._auth_lock:
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
        super().term()


def context(keys_file: str | None) -> zmq.Context:
    """The context a node program makes its sockets from: CurveZMQ with the keys in ``keys_file``,
    or the plain shared context without one."""
    if keys_file is None:
        return zmq.Context.instance()
    return CurveContext(read_keys(keys_file))
