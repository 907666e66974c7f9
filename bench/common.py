"""What the streaming benches share: pools and data, a private sshd, a snapperd
process, the kernel's accounting of CPU and memory, and the report.

``Bench`` makes a source pool holding one dataset of ``size`` random bytes
(incompressible) with one snapshot, an unmounted destination pool, an
OpenSSH ``sshd`` on 127.0.0.1 (its own host key, root's keys in its own
authorized_keys, AES-GCM only) and a ``snapperd`` process into the
destination pool, each CN key registered as a CN. Subclasses add their
methods; ``cleanup`` stops every daemon by pid and destroys every pool.
Pools come from ``snapper_zone.fleet.pools`` (zfs-fuse file pools on a host
without kernel ZFS).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncssh  # noqa: E402

from snapper_zone.fleet import pools as localpool  # noqa: E402
from snapper_zone.fleet import sshd  # noqa: E402
from snapper_zone.fleet.local import free_port  # noqa: E402
from snapper_zone.fleet.pools import FilePool  # noqa: E402
from snapper_zone.transfer.remote import AES_GCM, SLOW_KEX  # noqa: E402
from snapper_zone.zfs import proc  # noqa: E402
from snapper_zone.zfs.names import Dataset  # noqa: E402
from snapper_zone.zfs.zfs import SendSpec, Zfs  # noqa: E402

VM = "5b6c1d0e-6f0a-4c5e-9d1e-0b3f7a2c9e41"
CN_ID = "bench-cn"
ZONE_UUID = "9f1e2d3c-4b5a-4968-8776-655443322110"
SNAP = "bench"
CIPHER = AES_GCM[0]  # what snapper's own clients negotiate first

_TICK = os.sysconf("SC_CLK_TCK")


# -- waiting for daemons ------------------------------------------------------------


async def wait_file(path: Path, daemon: proc.Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(path.exists):
        if not daemon.alive():
            raise RuntimeError(f"snapperd exited: {tail(daemon)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        await asyncio.sleep(0.05)  # polling a condition with a deadline


def tail(daemon: proc.Daemon) -> str:
    return Path(daemon.log_path).read_text()[-2000:]


# -- keys and commands -------------------------------------------------------------


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)
    return path


def ssh_argv(key: Path, known_hosts: Path, port: int, user: str, command: str) -> list[str]:
    # The baselines' ssh gets snapper's cipher and key exchange: the same login.
    return ["ssh", "-c", CIPHER, "-o", f"KexAlgorithms=-{','.join(SLOW_KEX)}",
            "-o", "Compression=no", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
            "-i", str(key), "-p", str(port), f"{user}@127.0.0.1", command]


async def timed(argv: list[str], *, stdin: Path | None = None,
                env: Mapping[str, str] | None = None) -> float:
    """Run ``argv`` (with a file on stdin); seconds until it exits OK."""
    start = time.monotonic()
    if stdin is None:
        child = await proc.spawn(argv, env=env)
        done = await child.wait()
    else:
        with open(stdin, "rb") as f:  # noqa: ASYNC230 - opening is instant; the child reads
            child = await proc.spawn(argv, stdin=f, env=env)
            done = await child.wait()
    took = time.monotonic() - start
    if not done.ok:
        raise RuntimeError(f"{' '.join(argv[:3])}... failed: {done.stderr.strip()[-800:]}")
    return took


# -- the kernel's accounting ------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` (reaped children included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / _TICK


def cpu_self_seconds(pid: int) -> float:
    """utime + stime of ``pid`` alone (none of its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / _TICK


def cpu_by_process(names: Mapping[int, str] | None = None) -> dict[
        tuple[int, int], tuple[str, float, float]]:
    """Every process, by (pid, start time): its command name (or ``names[pid]``),
    own CPU-seconds and its reaped children's, now (``/proc/*/stat``)."""
    out: dict[tuple[int, int], tuple[str, float, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # A kernel worker's name changes with its work: one name per kind.
        comm = text[text.index("(") + 1:text.rindex(")")].split("/")[0]
        f = text.rsplit(")", 1)[1].split()
        pid = int(d.name)
        out[(pid, int(f[19]))] = ((names or {}).get(pid, comm),
                                  (int(f[11]) + int(f[12])) / _TICK,
                                  (int(f[13]) + int(f[14])) / _TICK)
    return out


def cpu_split(before: Mapping[tuple[int, int], tuple[str, float, float]],
              after: Mapping[tuple[int, int], tuple[str, float, float]]) -> dict[str, float]:
    """CPU-seconds between two ``cpu_by_process`` samples, by command: each live
    process's own (all of it for one started since), and as "<command>'s
    children" what a process alive at both reaped meanwhile (children that
    came and went)."""
    split: dict[str, float] = {}
    for key, (name, own, kids) in after.items():
        was = before.get(key)
        split[name] = split.get(name, 0.0) + own - (was[1] if was else 0.0)
        if was is not None and kids > was[2]:
            split[f"{name}'s children"] = split.get(f"{name}'s children", 0.0) + kids - was[2]
    return split


def machine_cpu() -> float:
    """CPU-seconds the whole machine has spent busy since boot (``/proc/stat``:
    user, nice, system, irq, softirq; not idle, iowait or a hypervisor's steal)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in first[1:8])
    return (user + nice + system + irq + softirq) / _TICK


async def stream_bytes(zfs: Zfs, spec: SendSpec) -> int:
    """The size of ``spec``'s stream, counted (no estimate: zfs-fuse has none)."""
    child = await zfs.send(spec, stdout=proc.PIPE)
    n = 0
    while chunk := await child.stdout.read(1 << 20):
        n += len(chunk)
    await zfs.check(child)
    return n


def fill(path: Path, size: int) -> int:
    """Write ``size`` random (incompressible) bytes to ``path``; return the size."""
    chunk = 4 << 20
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        f.write(os.urandom(size % chunk))
    return size


async def between_children(source: Sequence[str], sink: Sequence[str]
                           ) -> tuple[int, int, list[proc.Spawned]]:
    """``source`` writing into a pipe and ``sink`` reading from another, both
    widened as snapperd widens its pipes: (the source's read end, the sink's
    write end, the two children) for a pump to move bytes between."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    for fd in (src_r, dst_w):
        proc.widen_pipe(fd)
    children = [await proc.spawn(list(source), stdout=src_w),
                await proc.spawn(list(sink), stdin=dst_r)]
    os.close(src_w)
    os.close(dst_r)
    return src_r, dst_w, children


async def interleaved(kinds: Sequence[str], repeat: int, size: int,
                      one: Callable[[str], Awaitable[tuple[float, float, int]]]
                      ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``repeat`` rounds of ``one(kind)`` -> (seconds, CPU seconds, bytes counted)
    for every kind, each round starting one kind later so drift hits all alike;
    each run printed (stderr). (seconds, CPU seconds) per kind; a run that
    counted other than ``size`` bytes ends the bench."""
    secs: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(repeat):
        for k in [*kinds[i % len(kinds):], *kinds[:i % len(kinds)]]:
            t, c, n = await one(k)
            if n != size:
                raise SystemExit(f"{k}: counted {n} bytes of {size}")
            secs[k].append(t)
            cpus[k].append(c)
            print(f"  run {i + 1}: {k:<7} {size / t / 1e6:8.1f} MB/s  "
                  f"{c / (size / 1e9):5.2f} CPU-s/GB", file=sys.stderr, flush=True)
    return secs, cpus


async def reap(children: Sequence[proc.Spawned]) -> None:
    """Wait for each child; a failed one fails the bench."""
    for child in children:
        got = await child.wait()
        assert got.ok, got.stderr


def cpu_here() -> float:
    """This process's own CPU-seconds (user + system), not its children's."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_with_children() -> float:
    """This process's CPU-seconds and its reaped children's (zfs, ssh)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return cpu_here() + kids.ru_utime + kids.ru_stime


def _children_by_parent() -> dict[int, list[int]]:
    """Every live (or unreaped) process, under its parent's pid (``/proc``)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def children(pid: int) -> list[int]:
    """Live (or unreaped) children of ``pid``."""
    return _children_by_parent().get(pid, [])


def cpu_tree_seconds(pid: int) -> float:
    """``cpu_seconds`` of ``pid`` and of every live descendant: what a process
    tree spent so far, with children that stay (a kept connection's sshd)."""
    kids = _children_by_parent()
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
        except OSError:
            continue  # gone meanwhile: its time is in its parent's now
        todo.extend(kids.get(p, ()))
    return total


async def cpu_since(pid: int, before: float, timeout: float = 30.0) -> float:
    """The CPU ``pid`` used since ``before``, once it has reaped its children
    (their time is added to its own only then)."""
    deadline = time.monotonic() + timeout
    while children(pid) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # waiting for another process's wait(), bounded
    return cpu_seconds(pid) - before


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now (``VmRSS``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssPeak:
    """The highest ``VmRSS`` of a process while the ``async with`` body runs,
    sampled every ``every`` seconds (peaks shorter than that may be missed;
    a stream's buffers live as long as the stream, so they are not)."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.before = 0
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(self.every)  # a sampling period, not a synchronisation

    async def __aenter__(self) -> RssPeak:
        self.before = self.peak = rss_bytes(self.pid)
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.before


# -- the report --------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank: p99 of 32 values is the largest."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def header(nbytes: int, flavour: str, repeat: int, what: str = "stream") -> str:
    return (f"{what}: {nbytes} bytes ({nbytes / 1e6:.0f} MB), ZFS: {flavour}, cipher {CIPHER}, "
            f"median of {repeat}, {os.cpu_count()} CPUs")


def rate_rows(nbytes: int, times: Mapping[str, Sequence[float]],
              labels: Mapping[str, str] | None = None,
              extra: Mapping[str, str] | None = None) -> list[str]:
    """One line per method: median MB/s and each run's, plus an ``extra`` column."""
    out = []
    for k, runs in times.items():
        rate = nbytes / statistics.median(runs) / 1e6
        spread = ", ".join(f"{nbytes / t / 1e6:.0f}" for t in runs)
        label = (labels or {}).get(k, k)
        more = (extra or {}).get(k, "")
        out.append(f"  {label:<44} {rate:8.1f} MB/s {more}  (runs: {spread})")
    return out


def add_ssh_client_option(p: Any) -> None:
    p.add_argument("--ssh-client", choices=("openssh", "asyncssh"),
                   help="what carries snapper push's stream (default: the CLI's, OpenSSH "
                   "where installed)")


def run_line(i: int, label: str, nbytes: int, seconds: float) -> None:
    print(f"  run {i + 1}: {label:<44} {nbytes / seconds / 1e6:8.1f} MB/s",
          file=sys.stderr, flush=True)


# -- the bench's machinery -------------------------------------------------------


@dataclass(frozen=True)
class CnKey:
    """A CN as the zone knows it: its id, its private key file, the VMs it pushes."""

    cn_id: str
    key: Path
    vms: tuple[str, ...]

    @property
    def public(self) -> str:
        return self.key.with_suffix(".pub").read_text().strip()


class Bench:
    """Pools with the data, sshd and snapperd (see the module's docstring).

    ``copies``: of the data the source pool must hold at once; ``dst_copies``:
    of the data the destination pool must hold at once.
    """

    copies = 1
    dst_copies = 1

    def __init__(self, workdir: Path, size_mib: int, repeat: int) -> None:
        self.workdir = workdir
        self.size = size_mib << 20
        self.repeat = repeat
        self.zfs = Zfs()
        self.fuse: localpool.ZfsFuse | None = None
        self.pools: list[FilePool] = []
        self.daemons: list[proc.Daemon] = []
        self.snapperd_config: dict[str, Any] = {}  # extra keys for snapperd's config
        self.ssh_client: str | None = None  # snapper push --ssh-client
        # snapperd with a [gate]: a second private sshd, its front door for streams
        self.gate = False
        self.snapperd_log_level = "warn"  # "info" for a bench that reloads it (reconfigure)

    async def setup(self) -> None:
        if localpool.tier() == "fuse":
            self.fuse = localpool.ZfsFuse(self.workdir / "fuse")
            await asyncio.to_thread(self.fuse.start)  # shares a running daemon
        slack = self.size // 4 + (256 << 20)
        src = await localpool.create_pool(self.zfs, self.workdir, "bsrc",
                                          size=self.size * self.copies + slack)
        self.pools.append(src)
        dst = await localpool.create_pool(self.zfs, self.workdir, "bdst",
                                          size=self.size * self.dst_copies + slack,
                                          mounted=False)
        self.pools.append(dst)
        self.src = Dataset(src.name)
        self.dst = Dataset(dst.name)
        self.data = self.src.child("data")
        await self.zfs.create(self.data)
        assert src.mountpoint is not None
        await asyncio.to_thread(fill, src.mountpoint / "data" / "random", self.size)
        await self.zfs.snapshot([self.data.snapshot(SNAP)])
        self.client_key = keygen(self.workdir / "client_ed25519")

    async def send_bytes(self, spec: SendSpec) -> int:
        return await stream_bytes(self.zfs, spec)

    async def start_sshd(self, keys: Sequence[Path]) -> None:
        """A private sshd; root's authorized keys are ``keys``' public halves."""
        d = self.workdir / "sshd"
        d.mkdir()
        host = keygen(d / "host_ed25519")
        (d / "authorized_keys").write_text(
            "".join(k.with_suffix(".pub").read_text() for k in keys))
        self.sshd_port = free_port()
        self.sshd_pid = await self._sshd(d, self.sshd_port, host, [
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PermitRootLogin prohibit-password"])
        self.sshd_known = d / "known_hosts"
        self.sshd_known.write_text(f"[127.0.0.1]:{self.sshd_port} "
                                   f"{host.with_suffix('.pub').read_text()}")

    async def start_snapperd(self, cns: Sequence[CnKey]) -> None:
        """snapperd into ``<dst>/snapper``; each CN's key registered, its VMs mapped."""
        d = self.workdir / "snapperd"
        d.mkdir()
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(d / "host_ed25519"))
        os.chmod(d / "host_ed25519", 0o600)
        self.zone_root = self.dst.child("snapper")
        cfg = {
            "uuid": ZONE_UUID, "name": "bench", "root": str(self.zone_root),
            "ssh": {"port": 0, "host_key": str(d / "host_ed25519")}, "http": {"port": 0},
            "durability": "local",
            "keys": [{"role": "cn", "cn_id": c.cn_id, "public_key": c.public} for c in cns],
            "vms": {vm: c.cn_id for c in cns for vm in c.vms},
            **self.snapperd_config,
        }
        if self.gate:
            self.gate_port = free_port()
            cfg["gate"] = {"socket": str(d / "gate.sock"), "port": self.gate_port,
                           "authorized_keys": str(d / "gate_authorized_keys"),
                           "min_bytes": 0}
        (d / "snapperd.json").write_text(json.dumps(cfg))
        ready = d / "ready.json"
        daemon = proc.Daemon([sys.executable, "-m", "snapper_zone.daemon.main", "--config",
                              str(d / "snapperd.json"), "--ready-file", str(ready),
                              "--create-root", "--log-level", self.snapperd_log_level],
                             str(d / "snapperd.log"),
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        self.daemons.append(daemon)
        self.snapperd_pid = daemon.pid
        await wait_file(ready, daemon)
        self.zone_port = int(json.loads(ready.read_text())["ssh_port"])
        self.zone_known = d / "known_hosts"
        self.zone_known.write_text(f"[127.0.0.1]:{self.zone_port} "
                                   + key.export_public_key().decode())
        if self.gate:
            await self.start_gate_sshd(d / "host_ed25519", d / "gate_authorized_keys")

    async def reconfigure(self, **fields: Any) -> None:
        """Put ``fields`` into snapperd's config, SIGHUP it, and return once it says
        "config reloaded" (the bench set ``snapperd_log_level = "info"``)."""
        d = self.workdir / "snapperd"
        cfg = json.loads((d / "snapperd.json").read_text())
        for name, value in fields.items():  # "limits.copy_buffer_bytes" -> nested
            *tables, key = name.split(".")
            at = cfg
            for t in tables:
                at = at.setdefault(t, {})
            at[key] = value
        (d / "snapperd.json").write_text(json.dumps(cfg))
        log = d / "snapperd.log"
        before = log.read_text().count("config reloaded")
        os.kill(self.snapperd_pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while log.read_text().count("config reloaded") == before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"snapperd did not reload its config: {log}")
            await asyncio.sleep(0.02)  # polling a condition with a deadline

    async def _sshd(self, d: Path, port: int, host_key: Path,
                    options: Sequence[str]) -> int:
        """A private sshd on 127.0.0.1:``port`` (config and log in ``d``); its pid."""
        daemon = await sshd.start_sshd(d, port, host_key, options, timeout=30.0)
        self.daemons.append(daemon)
        return daemon.pid

    async def start_gate_sshd(self, host_key: Path, keys: Path) -> None:
        """sshd as snapperd's gate (etc/sshd_config.gate.example, as root): the keys
        file snapperd writes, every login forced to ``snapper-gate``."""
        d = self.workdir / "gate-sshd"
        d.mkdir()
        self.gate_pid = await self._sshd(d, self.gate_port, host_key, sshd.gate_options(keys))
        # The CNs log in as root here (the gate's user on a zone is "snapper").
        self.cn_config = {True: d / "cn-gate.toml", False: d / "cn-no-gate.toml"}
        self.cn_config[True].write_text('ssh_user = "root"\n')
        self.cn_config[False].write_text("use_gate = false\n")

    def push_argv(self, key: Path, vm: str, dataset_root: str,
                  via_gate: bool = True, name: str = SNAP,
                  config: Path | None = None) -> list[str]:
        """``snapper push VM --name NAME``'s arguments (after the program); the stream
        through ``ssh_client`` (None: the CLI's default, OpenSSH where installed), and
        through snapperd's gate if it has one and ``via_gate``; ``config``: this CN
        config file instead."""
        client = ["--ssh-client", self.ssh_client] if self.ssh_client else []
        if config is not None:
            client += ["--config", str(config)]
        elif self.gate:
            client += ["--config", str(self.cn_config[via_gate])]
        return ["--zone", f"127.0.0.1:{self.zone_port}", "--key", str(key),
                "--known-hosts", str(self.zone_known), "--dataset-root", dataset_root,
                *client, "push", vm, "--name", name, "--progress", "none"]

    async def cleanup(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        for pool in reversed(self.pools):
            try:
                await pool.destroy(self.zfs)
            except Exception as exc:  # keep cleaning the rest; say what was left
                print(f"could not destroy pool {pool.name}: {exc}", file=sys.stderr)
        if self.fuse is not None:
            self.fuse.stop()  # a no-op when the daemon was someone else's
