"""The one ZFS layer: the zfs command (zfs.py), names, the one way to run a command
(proc.py), the send stream header (sendstream.py).
"""
