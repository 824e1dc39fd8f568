"""keplm: knowledge-enhanced medical language model pretraining on Ray.

Layers (imports only point down): platform -> kg -> models -> tuning -> jobs.
"""

__version__ = "0.1.0"
