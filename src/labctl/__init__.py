"""labctl: provision course lab environments on Chameleon, AWS, GCP and an emulated testbed."""

__version__ = "0.1.0"
