"""Typed errors shared by every part of Snapper.

One class per failure a caller must tell apart. Each carries a stable ``code``
(the JSON ``code`` field of the HTTP API, in the style of Triton's restify
services) and the HTTP status it maps to.
"""

from __future__ import annotations

from collections.abc import Sequence


class SnapperError(Exception):
    """Base of every error Snapper raises on purpose."""

    code = "InternalError"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidName(SnapperError, ValueError):
    """A dataset, snapshot, bookmark or VM name failed validation.

    Raised before any command is built, so nothing ran.
    """

    code = "InvalidArgument"
    http_status = 422


class CommandNotFound(SnapperError):
    code = "CommandNotFound"


class CommandTimeout(SnapperError):
    code = "CommandTimeout"
    http_status = 504


class ZfsError(SnapperError):
    """A ``zfs``/``zpool`` command failed; carries argv and ZFS's own words."""

    code = "ZfsError"

    def __init__(
        self,
        argv: Sequence[str],
        stderr: str,
        returncode: int | None = None,
        message: str | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self.stderr = stderr.strip()
        self.returncode = returncode
        text = message or self.stderr or f"exited with status {returncode}"
        super().__init__(f"{' '.join(self.argv[:2])}: {text}")


class DatasetNotFound(ZfsError):
    code = "ResourceNotFound"
    http_status = 404


class DatasetExists(ZfsError):
    code = "ResourceExists"
    http_status = 409


class DatasetBusy(ZfsError):
    """Held, has clones, mounted and in use, or a receive is in progress."""

    code = "ResourceBusy"
    http_status = 409


class DestinationModified(ZfsError):
    code = "DestinationModified"
    http_status = 409


class IncrementalSourceMismatch(ZfsError):
    """The receiver's newest snapshot is not the stream's base."""

    code = "IncrementalSourceMismatch"
    http_status = 409


class PartialReceiveExists(ZfsError):
    """A resumable receive left state; resume it or abort it with ``-A``."""

    code = "PartialReceiveExists"
    http_status = 409


class OutOfSpace(ZfsError):
    code = "InsufficientSpace"
    http_status = 507


class StreamInvalid(ZfsError):
    """Truncated, corrupted or otherwise unreceivable stream."""

    code = "InvalidStream"
    http_status = 400


class ResumeTokenStale(ZfsError):
    """The snapshot a resume token names no longer exists on the sender."""

    code = "ResumeTokenStale"
    http_status = 409


class ResumeTokenInvalid(ZfsError):
    code = "ResumeTokenInvalid"
    http_status = 400


class UnsupportedFeature(SnapperError):
    """This host's ZFS lacks a capability (e.g. zfs-fuse: no resumable receive)."""

    code = "NotImplemented"
    http_status = 501

    def __init__(self, feature: str, detail: str = "") -> None:
        self.feature = feature
        super().__init__(f"this ZFS lacks {feature}" + (f": {detail}" if detail else ""))


class EncryptionUnsupported(SnapperError):
    """An encrypted dataset cannot go raw (``zfs send -w``) to or from this receiver:
    refused before any byte moves, since a decrypted send would leave the key's
    protection behind (and an encrypted zone copy cannot be sent any other way)."""

    code = "EncryptionUnsupported"
    http_status = 422


class MetadataTooLarge(SnapperError):
    """A snapshot's metadata (a command's input) is over the zone's limit."""

    code = "MetadataTooLarge"
    http_status = 413


class NotPlacedHere(SnapperError):
    """A CN pushes a VM to a zone it is not placed on (the CN's placement is stale:
    a move took the VM away while no coordinator answered). Refused before
    anything is sent; the snapshot stays on the CN, and the next push with a
    fresh placement carries it along."""

    code = "NotPlacedHere"
    http_status = 409


class PartDeleted(SnapperError):
    """A commit of a VM snapshot one of whose parts was deleted on purpose here
    (its guid is tombstoned). The commit was planned from a listing taken before
    or during the delete; a marker written now would outlive the parts the
    delete destroys next. Nothing is written; a reconcile plans again."""

    code = "PartDeleted"
    http_status = 409


class PartComplete(SnapperError):
    """A reconcile's destroy of a part that a complete snapshot on this zone now
    includes. The plan came from a listing taken while another zone committed the
    snapshot here (parts listed, marker not yet): it is not debris any more, so
    nothing is destroyed and the caller plans again from a fresh listing."""

    code = "PartComplete"
    http_status = 409
