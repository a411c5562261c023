"""Operations: systemd notify and watchdog, logging, Prometheus metrics."""
