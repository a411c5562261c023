"""Redis Streams for the ingest | edge roles: pure cores (ids, outbox, cursors) and the trio
shells (BusPublisher, EdgeFeed). Absent from the single process."""
