"""Snapper zone daemon and the ZFS layer every part shares."""
