"""snapperd, the zone daemon: SSH server and command handlers, HTTP API, auth, the layout
under the delegated root (store.py), the zone (zone.py), bootstrap (main.py).
"""
