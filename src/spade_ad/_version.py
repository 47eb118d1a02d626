"""The release of spade-ad, read by the model files, bundles, the record and the service (`spade_ad.__version__`)."""

__version__ = "0.1.0"
