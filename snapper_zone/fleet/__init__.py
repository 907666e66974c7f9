"""A local fleet on file-backed pools, for snapper demo, the tests and the soak; nothing in
the product imports it.
"""
