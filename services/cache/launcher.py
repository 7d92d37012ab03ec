"""Launching local memcached nodes, for `tessera cache`, `tessera up` and tests; and making a
child process die with its parent, even when the parent is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import IO, Self

_FALLBACK_PATH = "/usr/bin/memcached"
_READY_TIMEOUT_S = 5.0
_STOP_GRACE_S = 2.0
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "::1", "::", ""})
_TAIL_LINES = 20

# Run as `python -c _DIE_WITH_PARENT PARENT_PID ARGV...`: asks Linux to SIGKILL this process when
# the thread that started it dies (PR_SET_PDEATHSIG = 1), then becomes ARGV (exec keeps the pid
# and the setting). A wrapper rather than Popen(preexec_fn=...): preexec_fn is unsafe in a
# process with threads, and `tessera up` has one per child reading its output.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}")
if os.getppid() != int(sys.argv[1]):  # the parent died before prctl took effect
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the process is SIGKILLed when this one dies (Linux; elsewhere as is).

    Linux sends the signal when the *thread* that started the child ends: start children from
    a thread that lives as long as the process (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def find_memcached() -> str:
    """Path of the memcached binary; RuntimeError with the install hint if there is none."""
    path = shutil.which("memcached")
    if path:
        return path
    if os.access(_FALLBACK_PATH, os.X_OK):
        return _FALLBACK_PATH
    raise RuntimeError(
        "memcached not found on PATH or at /usr/bin/memcached; "
        "install it with `apt-get install -y memcached`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (memcached itself rejects port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) → ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_local_address(address: str) -> bool:
    """Whether ``address`` names this machine, i.e. a node this process can launch."""
    host, _ = split_address(address)
    return host in _LOCAL_HOSTS or host == socket.gethostname()


class MemcachedNode:
    """One memcached process listening on ``host:port`` (TCP only), stopped by :meth:`stop`.

    Usable as a context manager: ``with MemcachedNode().start(port=free_port()) as node: ...``.
    With ``die_with_parent`` the node is SIGKILLed when the thread that started it ends (see
    :func:`die_with_parent`): what `tessera up` and `tessera cache` use.
    """

    def __init__(self, binary: str | None = None, *, die_with_parent: bool = False) -> None:
        self._binary = binary
        self._die_with_parent = die_with_parent
        self.returncode: int | None = None  # of the last process, once it exited
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._host = "127.0.0.1"
        self._port = 0

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def poll(self) -> int | None:
        """None while it runs; its exit code once it exited (also after stop())."""
        if self._process is not None and self._process.poll() is not None:
            self.returncode = self._process.returncode
        return None if self.running else self.returncode

    def output_tail(self, lines: int = _TAIL_LINES) -> list[str]:
        """The last lines memcached wrote (it writes only errors)."""
        return self._read_stderr().splitlines()[-lines:]

    def start(
        self, host: str = "127.0.0.1", port: int = 11211, memory_mb: int = 64
    ) -> MemcachedNode:
        """Start memcached and wait (at most ~5 s) until it answers; RuntimeError if it cannot."""
        if self.running:
            raise RuntimeError(f"memcached is already running on {self.address}")
        if port <= 0:
            raise ValueError("memcached cannot pick its own port; use free_port()")
        self._host, self._port = host, port
        # -U 0: no UDP listener; it is unused and a traffic amplification risk.
        binary = self._binary or find_memcached()
        # -I 4m: a prefix block of a whole small model is over memcached's default 1 MiB item.
        command = [binary, "-l", host, "-p", str(port), "-m", str(memory_mb), "-U", "0", "-I", "4m"]
        if os.geteuid() == 0:
            command += ["-u", "root"]  # memcached refuses to run as root without it
        # A file, not a pipe: a long-lived node must never block on a full stderr pipe.
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.returncode = None
        self._process = subprocess.Popen(
            die_with_parent(command) if self._die_with_parent else command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            # Its own process group: a terminal's Ctrl-C reaches only the parent, which stops
            # its children in order.
            process_group=0,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 2 s; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None:
            self.returncode = process.returncode
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def kill(self) -> None:
        """SIGKILL at once, as a crash would (stop() can take up to a second: memcached only
        notices SIGTERM on its once-a-second clock tick)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _READY_TIMEOUT_S
        probe_host = "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host
        probe_host = "::1" if probe_host == "::" else probe_host
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"memcached on {self.address} exited with code {self._process.returncode}: "
                    f"{self._read_stderr() or '(no output)'}"
                )
            # Matching the pid proves we reached our process, not another one on the same port.
            if served_pid(probe_host, self._port) == self._process.pid:
                return
            time.sleep(0.02)
        raise RuntimeError(
            f"memcached on {self.address} did not answer within {_READY_TIMEOUT_S:.0f} s: "
            f"{self._read_stderr() or '(no output)'}"
        )

    def _read_stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()


def served_pid(host: str, port: int) -> int | None:
    """The pid reported by the memcached answering on host:port, None if none answers."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"stats\r\n")
            reply = b""
            deadline = time.monotonic() + 2.0
            while not reply.endswith(b"END\r\n"):
                if time.monotonic() > deadline or len(reply) > 1 << 20:
                    return None
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    for line in reply.split(b"\r\n"):
        parts = line.split()
        if len(parts) == 3 and parts[:2] == [b"STAT", b"pid"]:
            return int(parts[2])
    return None


def run_nodes(addresses: Sequence[str]) -> int:
    """Run one memcached per local address until SIGINT/SIGTERM; the `tessera cache` command.

    Remote addresses are skipped with a note. Returns 0 after a signal, 1 if a node fails to
    start or dies.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    nodes: list[MemcachedNode] = []
    try:
        for address in addresses:
            if not is_local_address(address):
                print(f"cache: {address} is not local, not starting it", flush=True)
                continue
            host, port = split_address(address)
            try:
                nodes.append(MemcachedNode(die_with_parent=True).start(host=host, port=port))
            except RuntimeError as exc:
                print(f"cache: {exc}", file=sys.stderr, flush=True)
                return 1
            print(
                f"cache: memcached ready on {nodes[-1].address} (pid {nodes[-1].pid})", flush=True
            )
        while not stop.wait(0.5):
            dead = [node for node in nodes if not node.running]
            if dead:
                print(f"cache: memcached on {dead[0].address} exited", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        for node in nodes:
            node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
