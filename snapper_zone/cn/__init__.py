"""The compute-node side: the push/restore client (client.py) and the snapper CLI (cli.py).
"""
