"""tsad-agent: edge time-series anomaly detection for factory sensor streams."""
__version__ = "0.2.0"
