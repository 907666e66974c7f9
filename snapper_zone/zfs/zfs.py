"""The ZFS layer: async functions over the ``zfs`` and ``zpool`` commands.

Every part of Snapper (the zone daemon, the CN client, replication, the
rebalancer and the tests) talks to ZFS through this module and nothing else.

- Names arrive as validated ``Dataset``/``Snapshot``/``Bookmark`` values, so
  argv is built only from checked strings; no shell is ever involved.
- Output is read with ``-H -p`` (``zfs get``, which zfs-fuse also has; it
  lacks ``zfs list -p``), so numbers are exact.
- Every failure becomes one of the typed errors in ``errors``, decided in one
  place (``classify``) from ZFS's stderr, and carries argv and stderr.
- ``send``/``receive`` start streaming children; the caller wires their
  stdout/stdin to a pipe, socket or SSH channel. ``pipe`` joins a local send
  to a local receive through a kernel pipe, so bytes never enter Python.
- What this host's ZFS can do (resumable receive, bookmarks, zvols,
  ``send -n -P``, ``receive -x``, encryption and raw sends, ``send -c -L -e``)
  is detected once per process and binary; ``choose_send_options`` (pure)
  decides a stream's options from both sides' ``stream_features``: raw for an
  encrypted dataset or nothing, else every option both have.
- A stream's properties never take effect on a receive that asks for it
  (``protect``): ``PROTECTED_PROPS`` are excluded with ``receive -x`` where
  ZFS has it (OpenZFS, illumos), and where it lacks it (zfs-fuse) overridden
  right after the receive (``override_received``: inherited from the safe
  container, or set), which also unmounts what the stream mounted.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from snapper_zone.errors import (
    DatasetBusy,
    DatasetExists,
    DatasetNotFound,
    DestinationModified,
    EncryptionUnsupported,
    IncrementalSourceMismatch,
    InvalidName,
    OutOfSpace,
    PartialReceiveExists,
    ResumeTokenInvalid,
    ResumeTokenStale,
    StreamInvalid,
    UnsupportedFeature,
    ZfsError,
)
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Bookmark, Dataset, Snapshot, check_component, check_user_property

_TOKEN = re.compile(r"[0-9A-Za-z-]{8,65536}")
_USER_VALUE_MAX = 8191  # ZFS's limit on a user property value (ZAP_MAXVALUELEN - 1)
_SNAP_PROPS = ("guid", "createtxg", "creation", "used", "referenced", "userrefs")
_DATASET_PROPS = ("type", "guid", "used", "referenced", "available")

# What a stream may never set on a zone (mounting customer filesystems, or
# running their setuid binaries, inside the snapper zone; sharing them;
# reserving the pool). The inheritable ones come from the container above,
# which ``SAFE_CONTAINER_PROPS`` make safe; the others get the value here.
PROTECTED_PROPS = ("mountpoint", "canmount", "sharenfs", "sharesmb", "setuid", "exec",
                   "devices", "refreservation")
_NOT_INHERITABLE = {"canmount": "off", "refreservation": "none"}
# Of those, what applies to a volume: ``receive -x`` of a filesystem-only
# property fails a zvol's (non-recursive) receive outright.
_VOLUME_PROTECTED = ("refreservation",)


def protected_props(volume: bool) -> tuple[str, ...]:
    """``PROTECTED_PROPS`` that apply to a stream of a volume (True) or a filesystem."""
    return _VOLUME_PROTECTED if volume else PROTECTED_PROPS
# The delegated root and each VM container: never mounted, nothing runnable.
SAFE_CONTAINER_PROPS = {"mountpoint": "none", "canmount": "off", "setuid": "off",
                        "exec": "off", "devices": "off"}

# Ordered: the first pattern found in stderr decides the error class. More
# specific phrases come before the generic ones they contain.
_CLASSIFY: tuple[tuple[re.Pattern[str], type[ZfsError]], ...] = tuple(
    (re.compile(p, re.I), cls)
    for p, cls in (
        (r"(used in the initial send|resume).*no longer exist", ResumeTokenStale),
        (r"no longer exists?.*resum|cannot resume send", ResumeTokenStale),
        (r"(invalid|corrupt|bad).{0,20}resume token|resume token.{0,20}(invalid|corrupt)",
         ResumeTokenInvalid),
        (r"partially-complete state|contains partially", PartialReceiveExists),
        (r"has been modified", DestinationModified),
        (r"does not match incremental source|incremental source .* no longer exists"
         r"|not an earlier snapshot|destination already has snapshots|"
         r"does not have snapshots? .*incremental", IncrementalSourceMismatch),
        (r"out of space|no space left|quota exceeded|insufficient space", OutOfSpace),
        (r"invalid backup stream|checksum mismatch|invalid stream|incomplete stream"
         r"|bad magic|unsupported stream|stream ends|premature|unexpected end",
         StreamInvalid),
        (r"destination has snapshots|destination '.*' exists|already exists", DatasetExists),
        (r"is busy|dependent clones|is held|being held"
         r"|receive in progress|device busy", DatasetBusy),
        (r"does not exist|no such pool|no such dataset|could not find any snapshots"
         r"|cannot open", DatasetNotFound),
    )
)


def classify(argv: Sequence[str], stderr: str, returncode: int | None) -> ZfsError:
    """Turn a failed command's stderr into the most specific typed error."""
    flat = " ".join(stderr.split())
    for pattern, cls in _CLASSIFY:
        if pattern.search(flat):
            return cls(argv, stderr, returncode)
    return ZfsError(argv, stderr, returncode)


@dataclass(frozen=True)
class Capabilities:
    """What this host's ZFS can do, found from its own usage text."""

    flavour: str  # "openzfs", "illumos" or "zfs-fuse"
    resumable_receive: bool  # receive -s / -A, send -t
    bookmarks: bool
    zvols: bool
    send_size_estimate: bool  # send -n -P
    receive_unmounted: bool  # receive -u
    receive_exclude: bool  # receive -x PROPERTY (a stream's value never applied)
    holds_list: bool  # zfs holds (zfs-fuse's needs a missing python helper)
    # Send stream options (OpenZFS, illumos); a host that writes them reads them too.
    encryption: bool = False  # native encryption (load-key), with raw sends (send -w)
    compressed_send: bool = False  # send -c: blocks as compressed on disk
    large_blocks: bool = False  # send -L: records over 128 KiB kept whole
    embedded_data: bool = False  # send -e: embedded-data block pointers kept

    def stream_features(self) -> frozenset[str]:
        """What this host can send and receive beyond a plain stream (``STREAM_FEATURES``)."""
        have = {"raw": self.encryption, "compressed": self.compressed_send,
                "large_blocks": self.large_blocks, "embedded": self.embedded_data}
        return frozenset(k for k, v in have.items() if v)

    def require(self, feature: str) -> None:
        if not getattr(self, feature):
            raise UnsupportedFeature(feature, f"{self.flavour} lacks it")


def _flags(usage: str, command: str) -> str:
    """Single-letter flags listed for ``command`` in usage text, e.g. 'vnsFu'."""
    letters = ""
    for m in re.finditer(rf"^\s*{command}\s+((?:\[-[A-Za-z]+\]\s*)+)", usage, re.M):
        letters += "".join(re.findall(r"\[-([A-Za-z]+)\]", m.group(1)))
    return letters


def parse_capabilities(usage: str, system: str, has_dev_zfs: bool) -> Capabilities:
    """Pure: capabilities from ``zfs``'s usage text and the platform."""
    if system == "SunOS":
        flavour = "illumos"
    elif has_dev_zfs or re.search(r"^\s*version\b", usage, re.M):
        flavour = "openzfs"
    else:
        flavour = "zfs-fuse"
    recv = _flags(usage, "receive")
    send = _flags(usage, "send")
    return Capabilities(
        flavour=flavour,
        resumable_receive="s" in recv and bool(re.search(r"receive\s+-A", usage)),
        bookmarks=bool(re.search(r"^\s*bookmark\s", usage, re.M)),
        zvols=flavour != "zfs-fuse",
        send_size_estimate="n" in send and "P" in send,
        receive_unmounted="u" in recv,
        receive_exclude=bool(re.search(r"^\s*receive\b.*\[-x\s", usage, re.M)),
        holds_list=flavour != "zfs-fuse",
        encryption="w" in send and bool(re.search(r"^\s*load-key\b", usage, re.M)),
        compressed_send="c" in send,
        large_blocks="L" in send,
        embedded_data="e" in send,
    )


# The stream options two hosts agree on: the names one side says it takes
# (the SSH grammar's ``features`` answer and ``send --accept``).
STREAM_FEATURES = ("raw", "compressed", "large_blocks", "embedded")


@dataclass(frozen=True)
class SendOptions:
    """How a stream is written: ``-w`` (raw), else any of ``-c``, ``-L``, ``-e``."""

    raw: bool = False
    compressed: bool = False
    large_blocks: bool = False
    embedded: bool = False

    def flags(self) -> list[str]:
        if self.raw:
            # -w implies -L -e -c in OpenZFS: the blocks go as they are on disk.
            return ["-w"]
        return [f for f, on in (("-c", self.compressed), ("-L", self.large_blocks),
                                ("-e", self.embedded)) if on]

    def features(self) -> frozenset[str]:
        have = {"raw": self.raw, "compressed": self.compressed,
                "large_blocks": self.large_blocks, "embedded": self.embedded}
        return frozenset(k for k, v in have.items() if v)


def choose_send_options(sender: frozenset[str], receiver: frozenset[str], *, encrypted: bool,
                        what: str = "the dataset") -> SendOptions:
    """Pure: the options of a send from a host with ``sender``'s stream features to
    one with ``receiver``'s, for an encrypted dataset or not.

    An encrypted dataset goes raw, always: the zone keeps ciphertext (and
    without the key it cannot send it any other way). When either side
    cannot, ``EncryptionUnsupported`` says which, before a byte moves.
    Otherwise every option both sides have is used: ``-c``/``-L``/``-e``
    only shorten the stream and keep large records whole.
    """
    if encrypted:
        for side, feats in (("sending", sender), ("receiving", receiver)):
            if "raw" not in feats:
                raise EncryptionUnsupported(
                    f"{what} is encrypted and the {side} host's ZFS has no native "
                    "encryption (raw send/receive): it is never sent decrypted; use an "
                    "OpenZFS or illumos zone for encrypted VMs")
        return SendOptions(raw=True)
    both = sender & receiver
    return SendOptions(compressed="compressed" in both, large_blocks="large_blocks" in both,
                       embedded="embedded" in both)


def parse_features(words: Iterable[str]) -> frozenset[str]:
    """The known stream features among ``words`` (unknown ones: a newer peer's, ignored)."""
    return frozenset(w for w in words if w in STREAM_FEATURES)


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot: Snapshot
    guid: int
    createtxg: int
    creation: int
    used: int
    referenced: int
    userrefs: int
    user_props: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.snapshot.name


@dataclass(frozen=True)
class BookmarkInfo:
    bookmark: Bookmark
    guid: int
    createtxg: int
    creation: int


@dataclass(frozen=True)
class DatasetInfo:
    dataset: Dataset
    type: str  # filesystem | volume
    guid: int
    used: int
    referenced: int
    available: int
    resume_token: str | None
    user_props: Mapping[str, str] = field(default_factory=dict)
    encrypted: bool = False  # ZFS native encryption (read where ZFS has it)


class Tree(NamedTuple):
    """A dataset's filesystems and volumes, their snapshots and (asked for, where
    ZFS has them) their bookmarks, from one ``zfs get`` (``Zfs.tree``)."""

    datasets: list[DatasetInfo]
    snapshots: list[SnapshotInfo]
    bookmarks: list[BookmarkInfo] | None = None  # None: not asked for, or no bookmarks here


@dataclass(frozen=True)
class SendSpec:
    """What to send. Exactly one of ``snapshot`` and ``resume_token``."""

    snapshot: Snapshot | None = None
    base: Snapshot | Bookmark | None = None  # incremental source
    intermediates: bool = False  # -I: every snapshot between base and snapshot
    resume_token: str | None = None
    # -w or -c -L -e (``choose_send_options``); a resumed send takes its token's own.
    options: SendOptions = field(default_factory=SendOptions)

    def __post_init__(self) -> None:
        if (self.snapshot is None) == (self.resume_token is None):
            raise InvalidName("a send names a snapshot or a resume token, not both or neither")
        if self.resume_token is not None and not _TOKEN.fullmatch(self.resume_token):
            raise InvalidName("malformed resume token")
        if self.intermediates and not isinstance(self.base, Snapshot):
            raise InvalidName("-I needs a base snapshot")
        if self.base is not None and self.snapshot is not None:
            if self.base.dataset != self.snapshot.dataset:
                raise InvalidName("incremental base must be of the same dataset")


def _check_value(value: str) -> str:
    if "\0" in value or "\n" in value or len(value.encode()) > _USER_VALUE_MAX:
        raise InvalidName("user property value must be one line of at most 8191 bytes")
    return value


_caps_cache: dict[str, Capabilities] = {}


class Zfs:
    """One host's ZFS. Cheap to construct; capability detection is cached."""

    def __init__(self, zfs: str = "zfs", zpool: str = "zpool", timeout: float = 300.0) -> None:
        self.zfs_bin = zfs
        self.zpool_bin = zpool
        self.timeout = timeout
        self._caps_lock = asyncio.Lock()

    # -- plumbing ---------------------------------------------------------

    async def _run(self, *args: str, input: bytes | None = None) -> proc.Completed:
        done = await proc.run([self.zfs_bin, *args], input=input, timeout=self.timeout)
        if not done.ok:
            raise classify(done.argv, done.stderr, done.returncode)
        return done

    async def _zpool(self, *args: str) -> proc.Completed:
        done = await proc.run([self.zpool_bin, *args], timeout=self.timeout)
        if not done.ok:
            raise classify(done.argv, done.stderr, done.returncode)
        return done

    async def capabilities(self) -> Capabilities:
        if (caps := _caps_cache.get(self.zfs_bin)) is not None:
            return caps
        async with self._caps_lock:
            if (caps := _caps_cache.get(self.zfs_bin)) is None:
                # `zfs` with no command prints its usage and exits non-zero.
                done = await proc.run([self.zfs_bin, "-?"], timeout=60)
                usage = done.stdout.decode("utf-8", "replace") + done.stderr
                caps = parse_capabilities(usage, platform.system(), _has_dev_zfs())
                _caps_cache[self.zfs_bin] = caps
        return caps

    # -- datasets ---------------------------------------------------------

    async def create(
        self,
        ds: Dataset,
        *,
        parents: bool = False,
        props: Mapping[str, str] | None = None,
        volsize: int | None = None,
    ) -> None:
        args = ["create"]
        if parents:
            args.append("-p")
        for k, v in (props or {}).items():
            args += ["-o", f"{_check_native_prop(k)}={_check_value(v)}"]
        if volsize is not None:
            (await self.capabilities()).require("zvols")
            args += ["-V", str(int(volsize))]
        await self._run(*args, str(ds))

    async def destroy(self, target: Dataset | Snapshot | Bookmark, *,
                      recursive: bool = False) -> None:
        args = ["destroy"]
        if recursive:
            args.append("-r")
        await self._run(*args, str(target))

    async def rename(self, ds: Dataset, to: Dataset) -> None:
        """``zfs rename``: one step, so a reader sees the old name or the new one.
        Both names stay in one pool (ZFS cannot rename across pools)."""
        if to.pool != ds.pool:
            raise InvalidName(f"cannot rename {ds} to {to}: another pool")
        await self._run("rename", str(ds), str(to))

    async def exists(self, target: Dataset | Snapshot) -> bool:
        try:
            await self._run("get", "-H", "-p", "-o", "value", "guid", str(target))
        except DatasetNotFound:
            return False
        return True

    async def snapshot(self, snaps: Iterable[Snapshot], *, recursive: bool = False,
                       props: Mapping[str, str] | None = None) -> None:
        """Atomic: every snapshot named is taken in one transaction group."""
        names = [str(s) for s in snaps]
        if not names:
            return
        args = ["snapshot"]
        if recursive:
            args.append("-r")
        for k, v in (props or {}).items():
            args += ["-o", f"{check_user_property(k)}={_check_value(v)}"]
        await self._run(*args, *names)

    async def rollback(self, snap: Snapshot, *, destroy_later: bool = False) -> None:
        args = ["rollback"]
        if destroy_later:
            args.append("-r")
        await self._run(*args, str(snap))

    async def _get(self, targets: Sequence[str], props: Sequence[str], *,
                   depth: int | None = None, recursive: bool = False,
                   sources: str | None = None, types: str | None = None
                   ) -> dict[str, dict[str, tuple[str, str]]]:
        """``zfs get -H -p``: {name: {prop: (value, source)}} in ZFS's order;
        ``sources``: only rows of those sources (``-s``); ``types``: of those (``-t``)."""
        args = ["get", "-H", "-p", "-o", "name,property,value,source"]
        if recursive:
            args.append("-r")
        if depth is not None:
            args += ["-d", str(depth)]
        if sources is not None:
            args += ["-s", sources]
        if types is not None:
            args += ["-t", types]
        done = await self._run(*args, ",".join(props), *targets)
        rows: dict[str, dict[str, tuple[str, str]]] = {}
        for line in done.stdout.decode("utf-8", "replace").splitlines():
            parts = line.split("\t")
            if len(parts) != 4:
                continue
            name, prop, value, source = parts
            rows.setdefault(name, {})[prop] = (value, source)
        return rows

    async def get_user_props(self, target: Dataset | Snapshot,
                             names: Sequence[str]) -> dict[str, str]:
        """The ``snapper:*`` properties set (locally or received) on target."""
        props = [check_user_property(n) for n in names]
        rows = await self._get([str(target)], props)
        return _user_props(rows.get(str(target), {}), props)

    async def set_user_props(self, target: Dataset | Snapshot, props: Mapping[str, str]) -> None:
        if not props:
            return
        for k, v in props.items():
            await self._run("set", f"{check_user_property(k)}={_check_value(v)}", str(target))

    async def inherit_user_prop(self, target: Dataset | Snapshot, name: str) -> None:
        await self._run("inherit", check_user_property(name), str(target))

    async def props(self, target: Dataset, names: Sequence[str]) -> dict[str, str]:
        """Native properties' values (``-p``: exact numbers)."""
        rows = await self._get([str(target)], [_check_native_prop(n) for n in names])
        return {k: v for k, (v, _src) in rows.get(str(target), {}).items()}

    async def encrypted(self, ds: Dataset) -> bool:
        """Whether ``ds`` is encrypted (ZFS native encryption); never where ZFS lacks it.
        ``datasets`` and ``tree`` say it of each dataset they list."""
        if not (await self.capabilities()).encryption:
            return False
        return _is_encrypted((await self.props(ds, ["encryption"])).get("encryption"))

    async def load_key(self, ds: Dataset, location: str | None = None) -> None:
        """``zfs load-key [-L LOCATION] ds``: open a dataset received raw with its key."""
        (await self.capabilities()).require("encryption")
        if location is not None and ("\0" in location or "\n" in location
                                     or location.startswith("-")):
            raise InvalidName("invalid key location")
        await self._run("load-key", *(["-L", location] if location else []), str(ds))

    async def set_props(self, target: Dataset, props: Mapping[str, str]) -> None:
        for k, v in props.items():
            await self._run("set", f"{_check_native_prop(k)}={_check_value(v)}", str(target))

    async def dataset(self, ds: Dataset, user_props: Sequence[str] = ()) -> DatasetInfo:
        got = await self.datasets(ds, user_props=user_props, depth=0)
        if not got:
            raise DatasetNotFound(["zfs", "get", str(ds)], f"cannot open '{ds}': "
                                  "dataset does not exist")
        return got[0]

    async def _dataset_props(self, extra: Sequence[str]) -> list[str]:
        props = [*_DATASET_PROPS, *extra]
        caps = await self.capabilities()
        if caps.resumable_receive:
            props.append("receive_resume_token")
        if caps.encryption:  # read with the rest: a push asks it of every part
            props.append("encryption")
        return props

    async def datasets(self, root: Dataset, *, user_props: Sequence[str] = (),
                       depth: int | None = None) -> list[DatasetInfo]:
        """``root`` and the filesystems/volumes below it (to ``depth``)."""
        extra = [check_user_property(n) for n in user_props]
        recursive = depth is None
        rows = await self._get([str(root)], await self._dataset_props(extra), depth=depth,
                               recursive=recursive)
        return [info for name, p in rows.items() if (info := _dataset_info(name, p, extra))]

    async def snapshots(self, ds: Dataset, *, user_props: Sequence[str] = (),
                        recursive: bool = False, depth: int | None = None
                        ) -> list[SnapshotInfo]:
        """Snapshots of ``ds`` (and of its descendants if recursive, ``depth`` levels
        down when given: 2 is its children's own snapshots), oldest first."""
        extra = [check_user_property(n) for n in user_props]
        rows = await self._get([str(ds)], [*_SNAP_PROPS, *extra],
                               depth=depth if recursive else 1, recursive=recursive)
        return _snapshot_infos(rows, extra, None if recursive else ds)

    async def tree(self, root: Dataset, *, user_props: Sequence[str] = (),
                   depth: int | None = None, inherited: bool = True,
                   bookmarks: bool = False) -> Tree:
        """``datasets(root, depth=depth)`` and ``snapshots(root, recursive=True,
        depth=depth)`` from one ``zfs get`` instead of two (a VM's inventory is
        read for every push and every reconcile round, a dataset's snapshots and
        resume token before every receive); ``user_props`` are read on both.
        ``inherited=False``: a user property only where it is set, not on every
        row below (a long one on ``root`` is read once, not once per snapshot).
        ``bookmarks``: the bookmarks too, where ZFS has them (a CN plans from them)."""
        extra = [check_user_property(n) for n in user_props]
        props = list(dict.fromkeys([*await self._dataset_props(extra), *_SNAP_PROPS]))
        marks = bookmarks and (await self.capabilities()).bookmarks
        # The native properties read here are all read-only: their source is "none".
        rows = await self._get([str(root)], props, depth=depth, recursive=depth is None,
                               sources=None if inherited else "local,none",
                               types="filesystem,volume,snapshot,bookmark" if marks else None)
        return Tree([info for name, p in rows.items() if (info := _dataset_info(name, p, extra))],
                    _snapshot_infos(rows, extra, None),
                    _bookmark_infos(rows) if marks else None)

    async def bookmarks(self, ds: Dataset) -> list[BookmarkInfo]:
        (await self.capabilities()).require("bookmarks")
        done = await self._run("list", "-H", "-p", "-t", "bookmark", "-d", "1",
                               "-o", "name,guid,createtxg,creation", str(ds))
        out = []
        for line in done.stdout.decode().splitlines():
            name, guid, txg, creation = line.split("\t")
            bm = Bookmark.parse(name)
            if bm.dataset == ds:
                out.append(BookmarkInfo(bm, int(guid), int(txg), int(creation)))
        out.sort(key=lambda b: b.createtxg)
        return out

    async def bookmark(self, snap: Snapshot, name: str) -> Bookmark:
        (await self.capabilities()).require("bookmarks")
        bm = Bookmark(snap.dataset, check_component(name, "bookmark name"))
        await self._run("bookmark", str(snap), str(bm))
        return bm

    # -- holds ------------------------------------------------------------

    async def hold(self, tag: str, snaps: Iterable[Snapshot]) -> None:
        names = [str(s) for s in snaps]
        if names:
            await self._run("hold", check_component(tag, "hold tag"), *names)

    async def release(self, tag: str, snaps: Iterable[Snapshot]) -> None:
        names = [str(s) for s in snaps]
        if names:
            await self._run("release", check_component(tag, "hold tag"), *names)

    async def holds(self, snap: Snapshot) -> set[str]:
        (await self.capabilities()).require("holds_list")
        done = await self._run("holds", "-H", str(snap))
        return {line.split("\t")[1] for line in done.stdout.decode().splitlines()
                if line.count("\t") >= 2}

    # -- streams ----------------------------------------------------------

    async def send_argv(self, spec: SendSpec, *, dry_run: bool = False) -> list[str]:
        caps = await self.capabilities()
        args = [self.zfs_bin, "send"]
        if dry_run:
            caps.require("send_size_estimate")
            args += ["-n", "-P"]
        if spec.resume_token is not None:
            caps.require("resumable_receive")
            return [*args, "-t", spec.resume_token]
        opts = spec.options
        for on, feature in ((opts.raw, "encryption"), (opts.compressed, "compressed_send"),
                            (opts.large_blocks, "large_blocks"),
                            (opts.embedded, "embedded_data")):
            if on:
                caps.require(feature)
        args += opts.flags()
        assert spec.snapshot is not None
        if spec.base is not None:
            if isinstance(spec.base, Bookmark):
                caps.require("bookmarks")
            args += ["-I" if spec.intermediates else "-i", str(spec.base)]
        return [*args, str(spec.snapshot)]

    async def send(self, spec: SendSpec, *, stdout: proc.Wire = proc.PIPE) -> proc.Spawned:
        """Start ``zfs send``; read its stdout or pass an fd. Finish with ``check``."""
        return await proc.spawn(await self.send_argv(spec), stdout=stdout)

    async def send_size(self, spec: SendSpec) -> int:
        """Estimated stream size in bytes (``send -n -P``)."""
        argv = await self.send_argv(spec, dry_run=True)
        done = await proc.run(argv, timeout=self.timeout)
        if not done.ok:
            raise classify(done.argv, done.stderr, done.returncode)
        text = done.stdout.decode("utf-8", "replace") + "\n" + done.stderr
        m = re.search(r"^size\s+(\d+)\s*$", text, re.M)
        if m is None:
            raise ZfsError(done.argv, text, done.returncode, "no size in send -n -P output")
        return int(m.group(1))

    async def receive_argv(self, target: Dataset, *, resumable: bool = True,
                           force: bool = False, exclude: Sequence[str] = ()) -> list[str]:
        caps = await self.capabilities()
        args = [self.zfs_bin, "receive"]
        if resumable and caps.resumable_receive:
            args.append("-s")
        if caps.receive_unmounted:
            args.append("-u")
        if force:
            args.append("-F")
        if caps.receive_exclude:
            # -x, not -o: the value comes from the (safe) container above.
            for prop in exclude:
                args += ["-x", _check_native_prop(prop)]
        return [*args, str(target)]

    async def receive(self, target: Dataset, *, stdin: proc.Wire = proc.PIPE,
                      resumable: bool = True, force: bool = False,
                      exclude: Sequence[str] = ()) -> proc.Spawned:
        """Start ``zfs receive [-s] [-u] [-F] [-x PROP]... target``; feed its stdin.

        Finish with ``check``; with ``exclude`` (``protected_props``), then
        ``override_received`` (a no-op where ``receive -x`` kept them out).
        """
        argv = await self.receive_argv(target, resumable=resumable, force=force,
                                       exclude=exclude)
        return await proc.spawn(argv, stdin=stdin)

    async def override_received(self, target: Dataset,
                                props: Sequence[str] = PROTECTED_PROPS) -> list[str]:
        """Undo every one of ``props`` whose value ``target`` took from a stream;
        return their names. Where ZFS has ``receive -x`` there is none to undo."""
        if (await self.capabilities()).receive_exclude or not props:
            return []
        try:
            rows = await self._get([str(target)], [_check_native_prop(p) for p in props])
        except DatasetNotFound:
            return []
        return await self._undo_received(target, rows.get(str(target), {}))

    async def received(self, target: Dataset,
                       props: Sequence[str] = PROTECTED_PROPS) -> list[SnapshotInfo]:
        """After a good receive: ``override_received(target, props)``, then
        ``snapshots(target)`` to confirm what arrived; one ``zfs get`` reads both
        where there is anything to undo (a receive's every command is a process)."""
        if (await self.capabilities()).receive_exclude or not props:
            return await self.snapshots(target)
        rows = await self._get([str(target)], [*_SNAP_PROPS, *map(_check_native_prop, props)],
                               depth=1)
        # A snapshot's row reads "-" for a filesystem's property: only the dataset's counts.
        await self._undo_received(target, {p: cell for p, cell in rows.get(str(target), {}).items()
                                           if p in props})
        return _snapshot_infos(rows, (), target)

    async def _undo_received(self, target: Dataset,
                             row: Mapping[str, tuple[str, str]]) -> list[str]:
        done = []
        for prop, (_value, source) in row.items():
            if source != "received":
                continue
            if prop in _NOT_INHERITABLE:
                await self._run("set", f"{prop}={_NOT_INHERITABLE[prop]}", str(target))
            else:
                await self._run("inherit", prop, str(target))  # unmounts it, too
            done.append(prop)
        return done

    @staticmethod
    async def check(child: proc.Spawned) -> proc.Completed:
        """Wait for a streaming child; raise its typed error if it failed."""
        done = await child.wait()
        if not done.ok:
            raise classify(done.argv, done.stderr, done.returncode)
        return done

    async def pipe(self, spec: SendSpec, target: Dataset, *, resumable: bool = True,
                   force: bool = False) -> None:
        """Local ``zfs send | zfs receive`` through a kernel pipe.

        A ZFS-layer primitive for its own tests and the benchmarks' baseline:
        no product path receives with it (streams into a zone or a CN go
        through ``transfer.local``, which vets them first).

        The error raised is the one that explains the failure: the sender's
        when it failed for a reason of its own, else the receiver's.
        """
        r, w = proc.os_pipe()
        try:
            sender = await self.send(spec, stdout=w)
        finally:
            os.close(w)
        try:
            receiver = await self.receive(target, stdin=r, resumable=resumable, force=force)
        except BaseException:
            await sender.abort()
            raise
        finally:
            os.close(r)
        sent, received = await asyncio.gather(sender.wait(), receiver.wait())
        send_err = None if sent.ok else classify(sent.argv, sent.stderr, sent.returncode)
        if received.ok:
            if send_err is not None:
                raise send_err
            return
        recv_err = classify(received.argv, received.stderr, received.returncode)
        # A sender that failed for a reason of its own (stale token, missing
        # snapshot) explains the receiver's "truncated stream"; a sender that
        # merely lost its reader (broken pipe: a plain ZfsError) does not.
        if send_err is not None and type(send_err) is not ZfsError:
            raise send_err
        raise recv_err

    async def resume_token(self, ds: Dataset) -> str | None:
        if not (await self.capabilities()).resumable_receive:
            return None
        rows = await self._get([str(ds)], ["receive_resume_token"])
        value = rows.get(str(ds), {}).get("receive_resume_token", ("-", "-"))[0]
        return None if value in ("-", "") else value

    async def receive_abort(self, ds: Dataset) -> None:
        """Discard a partial resumable receive (``zfs receive -A``)."""
        (await self.capabilities()).require("resumable_receive")
        await self._run("receive", "-A", str(ds))

    async def resume_token_info(self, token: str) -> dict[str, str]:
        """Decode a token (``zfs send -nvt``): toname, toguid, fromguid, ..."""
        argv = await self.send_argv(SendSpec(resume_token=token))
        done = await proc.run([argv[0], "send", "-n", "-v", "-t", token], timeout=self.timeout)
        if not done.ok:
            raise classify(done.argv, done.stderr, done.returncode)
        info = {}
        for line in (done.stdout.decode("utf-8", "replace") + done.stderr).splitlines():
            m = re.match(r"\s*(\w+)\s*=\s*(\S+)\s*$", line)
            if m:
                info[m.group(1)] = m.group(2)
        return info

    # -- pools ------------------------------------------------------------

    async def pool_create(self, pool: str, vdevs: Sequence[str], *, mountpoint: str | None = None,
                          props: Mapping[str, str] | None = None) -> None:
        args = ["create", "-f", "-o", "cachefile=none"]
        for k, v in (props or {}).items():
            args += ["-O", f"{_check_native_prop(k)}={_check_value(v)}"]
        if mountpoint is not None:
            args += ["-m", mountpoint]
        await self._zpool(*args, check_component(pool, "pool name"), *vdevs)

    async def pool_destroy(self, pool: str) -> None:
        await self._zpool("destroy", "-f", check_component(pool, "pool name"))

    async def pools(self) -> list[str]:
        done = await self._zpool("list", "-H", "-o", "name")
        return done.stdout.decode().split()

    async def available(self, ds: Dataset) -> int:
        """Bytes that can still be written below ``ds`` (quota and pool aware)."""
        rows = await self._get([str(ds)], ["available"])
        return int(rows[str(ds)]["available"][0])


def _has_dev_zfs() -> bool:
    # OpenZFS on Linux has a kernel device; zfs-fuse talks over a socket.
    return os.path.exists("/dev/zfs")


_NATIVE_PROP = re.compile(r"[a-z][a-z0-9_]{0,40}")


def _check_native_prop(name: str) -> str:
    if ":" in name:
        return check_user_property(name)
    if not _NATIVE_PROP.fullmatch(name):
        raise InvalidName(f"invalid property name {name!r}")
    return name


def _dataset_info(name: str, p: Mapping[str, tuple[str, str]],
                  extra: Sequence[str]) -> DatasetInfo | None:
    """A ``zfs get`` row as a filesystem's or volume's info; None for anything else."""
    if "@" in name or "#" in name or p.get("type", ("", ""))[0] not in (
            "filesystem", "volume"):
        return None
    token = p.get("receive_resume_token", ("-", "-"))[0]
    return DatasetInfo(
        dataset=Dataset(name), type=p["type"][0], guid=int(p["guid"][0]),
        used=int(p["used"][0]), referenced=int(p["referenced"][0]),
        available=int(p["available"][0]), resume_token=None if token in ("-", "") else token,
        user_props=_user_props(p, extra), encrypted=_is_encrypted(p.get("encryption", ("", ""))[0]))


def _is_encrypted(value: str | None) -> bool:
    return value not in (None, "off", "-", "")


def _snapshot_infos(rows: Mapping[str, Mapping[str, tuple[str, str]]], extra: Sequence[str],
                    only: Dataset | None) -> list[SnapshotInfo]:
    """The snapshots among ``zfs get`` rows (``only``: of that dataset), oldest first."""
    out = []
    for name, p in rows.items():
        if "@" not in name:
            continue
        snap = Snapshot.parse(name)
        if only is not None and snap.dataset != only:
            continue
        out.append(SnapshotInfo(
            snapshot=snap, guid=int(p["guid"][0]), createtxg=int(p["createtxg"][0]),
            creation=int(p["creation"][0]), used=int(p["used"][0]),
            referenced=int(p["referenced"][0]), userrefs=_int(p.get("userrefs")),
            user_props=_user_props(p, extra)))
    out.sort(key=lambda s: (s.snapshot.dataset.path, s.createtxg))
    return out


def _bookmark_infos(rows: Mapping[str, Mapping[str, tuple[str, str]]]) -> list[BookmarkInfo]:
    """The bookmarks among ``zfs get`` rows, oldest first."""
    out = [BookmarkInfo(Bookmark.parse(name), int(p["guid"][0]), int(p["createtxg"][0]),
                        int(p["creation"][0]))
           for name, p in rows.items() if "#" in name]
    out.sort(key=lambda b: (b.bookmark.dataset.path, b.createtxg))
    return out


def _int(cell: tuple[str, str] | None) -> int:
    if cell is None or not cell[0].isdigit():
        return 0
    return int(cell[0])


def _user_props(row: Mapping[str, tuple[str, str]], names: Sequence[str]) -> dict[str, str]:
    # An unset user property reads as value "-" with source "-".
    return {n: row[n][0] for n in names if n in row and row[n][1] != "-"}
