"""Mirroring every snapshot to a second snapper zone."""
