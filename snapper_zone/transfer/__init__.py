"""The transfer path: every ZFS stream this project moves goes through here.

``stream`` moves bytes (the pumps, flow control, pacing, the tee's sink);
``local`` is the only caller of ``zfs receive`` (vetting, slots, space,
guid confirmation). Imports point down: zfs/wire below, replication and the
daemon above.
"""
