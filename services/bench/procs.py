"""Child processes for the bench: services started on port 0, found by their ready line.

Each child's output is pumped by a thread into a bounded buffer (shown when it fails to start).
`Fleet.stop_all` sends SIGTERM to every child, waits, then kills what is left; it is safe to call
twice and is called from a `finally`, so Ctrl-C and errors stop everything.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

READY = re.compile(r"tessera (?:router|worker|bench echo) ready.* on (\S+)")
METRICS = re.compile(r"tessera (?:router|worker) metrics on (\S+)")
ROOT = Path(__file__).resolve().parents[2]
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ChildFailed(RuntimeError):
    """A child exited or did not become ready; the message carries its last lines."""


class Child:
    """One `python -m ...` child whose ready line names the address it listens on."""

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.argv = list(argv)
        self.env = env
        self.address = ""
        self.metrics_address = ""  # where it serves /metrics, if it said so
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self.popen: subprocess.Popen[str] | None = None

    def start(self) -> Child:
        self.popen = subprocess.Popen(
            [sys.executable, *self.argv],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, name=f"pump-{self.name}", daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        log = self.log_path.open("w") if self.log_path is not None else None
        try:
            for line in self.popen.stdout:
                self._line(line, log)
        finally:
            if log is not None:
                log.close()

    def _line(self, line: str, log: IO[str] | None) -> None:
        if log is not None:
            log.write(line)
            log.flush()
        self.lines.append(line.rstrip("\n"))
        if not self.metrics_address and (found := METRICS.search(line)):
            self.metrics_address = found.group(1)
        if not self._ready.is_set():
            match = READY.search(line)
            if match:
                self.address = match.group(1)
                self._ready.set()

    def wait_ready(self, deadline: float) -> Child:
        assert self.popen is not None
        while not self._ready.wait(0.1):
            if self.popen.poll() is not None:
                raise ChildFailed(
                    f"{self.name} exited with {self.popen.returncode}:\n" + self.tail()
                )
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} was not ready in time:\n" + self.tail())
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process so far (Linux /proc), None if unknown."""
        if self.popen is None:
            return None
        try:
            stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.lines)[-lines:])

    def terminate(self) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout: float) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def service_env(repository: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TESSERA_MODEL_REPOSITORY": repository,
            "PYTHONUNBUFFERED": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            # A crash (SIGSEGV) in a service leaves its Python stack in the service log.
            "PYTHONFAULTHANDLER": "1",
        }
    )
    env.update(extra or {})
    return env


class Fleet:
    """Every child of one bench run; stops them in reverse start order."""

    def __init__(
        self,
        repository: str,
        log_level: str = "warning",
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.repository = repository
        self.log_dir = log_dir
        self.log_level = log_level
        self.env = service_env(repository, env)
        self.children: list[Child] = []

    def _cli(self, *args: str) -> list[str]:
        return ["-m", "services.cli", "--log-level", self.log_level, *args]

    def router(self, name: str, *, cache: Sequence[str] = ()) -> Child:
        args = ["router", "--host", "127.0.0.1", "--port", "0", "--repository", self.repository]
        if cache:
            args += ["--cache", ",".join(cache)]
        return self._add(Child(name, self._cli(*args), self.env, self._log(name)))

    def worker(
        self,
        name: str,
        model: str,
        routers: Sequence[str],
        *,
        layers: str | None = None,
        threads: int | None = None,
        precision: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        args = [
            "worker",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--router",
            ",".join(routers),
            "--repository",
            self.repository,
        ]
        if layers:
            args += ["--layers", layers]
        if threads:
            args += ["--threads", str(threads)]
        if precision:
            args += ["--precision", precision]
        return self._add(
            Child(name, self._cli(*args), {**self.env, **(env or {})}, self._log(name))
        )

    def echo(self, name: str = "echo") -> Child:
        return self._add(Child(name, ["-m", "services.bench.echo"], self.env, self._log(name)))

    def _log(self, name: str) -> Path | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"{name}.log"

    def _add(self, child: Child) -> Child:
        self.children.append(child.start())
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive:
                code = child.popen.returncode if child.popen else None
                raise ChildFailed(f"{child.name} exited with {code}:\n{child.tail()}")

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far of every child, by name."""
        snapshot = {}
        for child in self.children:
            seconds = child.cpu_seconds()
            if seconds is not None:
                snapshot[child.name] = seconds
        return snapshot

    def stop_all(self, timeout: float = 15.0) -> None:
        for child in reversed(self.children):
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            child.wait_or_kill(deadline - time.monotonic())
        self.children.clear()
