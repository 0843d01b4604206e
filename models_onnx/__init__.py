"""The shipped models (ONNX + metadata; subfolders hold further model sets).

Installed as the package `agent.shipped_models` (pyproject.toml maps this folder there),
so an installed agent finds them through importlib.resources: see agent/shipped.py.
"""
