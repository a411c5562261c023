"""Candles and their records (holes, bans, fingerprints) behind one interface."""
