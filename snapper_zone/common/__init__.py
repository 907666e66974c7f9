"""What every part shares: config loading, logs, metrics, progress.
"""
