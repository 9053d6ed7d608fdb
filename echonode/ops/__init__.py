"""Operating the node: logs, metrics and health, systemd notification."""
