"""Commands beside the daemon: replay (a loopback Binance), backfill, subscribe; and
exit_codes, how each command names its exit codes in ``--help``."""
