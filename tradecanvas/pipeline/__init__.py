"""IngestPipeline: commit → derive → events, then publish(best_effort)."""
