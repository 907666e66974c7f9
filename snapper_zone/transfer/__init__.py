"""The transfer path: every ZFS stream this project moves goes through here.

- ``stream``: the pumps, flow control, pacing and the tee's sink, written once;
- ``local``: this zone as an endpoint, and the only caller of ``zfs receive``
  (vetting, receive slots, space, guid confirmation);
- ``remote``: the endpoint over SSH (``ZoneClient``);
- ``endpoint``: the protocol both implement;
- ``plan``: the pure send rules (base, chain, resume), shared by the CN and
  zone-to-zone reconcile;
- ``registry``: transfers in flight and pending parts' leases;
- ``store``: the layout under the delegated root.

Imports point down: zfs, wire and common below; replication, cn and the
daemon above (``tests/test_layout.py``).
"""
