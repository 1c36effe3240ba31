"""jaxroute: interpreting neural networks through their routing paths."""
__version__ = "0.1.0"
