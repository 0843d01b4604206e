"""tsad-agent: edge time-series anomaly detection for factory sensor streams."""
__version__ = "0.1.0"
