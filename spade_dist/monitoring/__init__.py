"""Monitoring helpers: Grafana dashboard generator, local Prometheus / Pushgateway services."""
