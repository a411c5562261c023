"""Commands beside the daemon: replay (a loopback Binance), backfill, subscribe."""
