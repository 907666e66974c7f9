"""A private standalone ZooKeeper for tests and benches (Debian's ``zookeeper``).

Started in the foreground on 127.0.0.1 with its own data directory, stopped
by its pid. ``missing()`` says why one cannot run here (no java, no jars), so
callers skip with the reason instead of failing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapper_zone.fleet.local import free_port

__all__ = ["JAR", "LocalZooKeeper", "missing"]

# Its manifest's Class-Path names every jar the server needs (Debian 12: 3.8.0).
JAR = Path("/usr/share/java/zookeeper.jar")


def missing() -> str | None:
    """Why a ZooKeeper cannot be started here, or None."""
    if shutil.which("java") is None:
        return "no java (apt-get install --no-install-recommends zookeeper)"
    if not JAR.exists():
        return f"no {JAR} (apt-get install --no-install-recommends zookeeper)"
    return None


def ruok(port: int, timeout: float = 1.0) -> bool:
    """The four-letter health check: True once the server answers ``imok``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"ruok")
            return s.recv(16) == b"imok"
    except OSError:
        return False


@dataclass
class LocalZooKeeper:
    """One server; ``hosts`` is the connect string once ``start`` returns."""

    root: Path
    # 500 ms ticks: sessions may be as short as 1 s (2 ticks), so a test can
    # lose one quickly.
    tick_ms: int = 500
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        cfg = self.root / "zoo.cfg"
        cfg.write_text(f"tickTime={self.tick_ms}\ndataDir={self.root / 'data'}\n"
                       f"clientPort={self.port}\nclientPortAddress=127.0.0.1\n"
                       "admin.enableServer=false\n4lw.commands.whitelist=ruok,stat,srvr\n"
                       # no per-address limit: every client here is 127.0.0.1
                       "maxClientCnxns=0\n")
        log = (self.root / "zookeeper.log").open("wb")
        self.proc = subprocess.Popen(
            ["java", "-Xmx256m", "-Dzookeeper.admin.enableServer=false", "-cp", str(JAR),
             "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not ruok(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited {self.proc.returncode}; see "
                                   f"{self.root / 'zookeeper.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ZooKeeper on {self.hosts} not up in {timeout:g} s")
            time.sleep(0.1)  # polling another process's port, with a deadline

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
