"""A real nginx of the tests' own serving a directory as an HTTP mirror of the blob directory:
a free loopback port, a generated config, its pid file, logs and temp files under a temp dir,
no root needed (``nginx -p <prefix> -c <conf>``), one process (``master_process off``) so a
test can kill it mid-transfer with one signal."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.services import free_port, port_open


def nginx_binary() -> str:
    """nginx on PATH or in an sbin directory; fails (never skips) when it is not installed."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("nginx is not installed: run dev/setup (it installs the Debian package nginx)")


@dataclass
class NginxMirror:
    """``root`` served at ``url``; ``limit_rate`` (e.g. "2m") slows every response."""

    root: Path
    work: Path
    limit_rate: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/blobs"

    @property
    def access_log(self) -> Path:
        return self.work / "access.log"

    def config(self) -> str:
        work = self.work
        temps = "\n".join(
            f"  {name}_temp_path {work / name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        rate = f"limit_rate {self.limit_rate};" if self.limit_rate else ""
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""  # root would drop to nobody
        return f"""
{user}
daemon off;
master_process off;
worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "error.log"} info;
events {{ worker_connections 64; }}
http {{
  access_log {self.access_log};
{temps}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port};
    location /blobs/ {{
      alias {self.root}/;
      {rate}
    }}
  }}
}}
"""

    def start(self) -> NginxMirror:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", str(self.work), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.work / "stderr.log").open("wb"),
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited at start: {(self.work / 'stderr.log').read_text()}")
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """Dies at once, connections and all (SIGKILL), as a mirror host losing power would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
