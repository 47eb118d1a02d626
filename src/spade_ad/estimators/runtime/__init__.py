"""Scoring without torch: an exported bundle (`spade-ad export`) scored with numpy, scipy, Pillow and ONNX Runtime
(or OpenVINO). Same `Prediction` objects, verdicts and maps as `spade_ad.Spade`, from the same code after the
backbone (`spade_ad.core.maps_numpy`, `spade_ad.estimators.detector`); only the network and the nearest-neighbour search
run elsewhere. `import spade_ad.estimators.runtime` never imports torch (a test checks it).
"""

from .bundle import BUNDLE_FORMAT, Bundle, is_bundle, read_bundle
from .estimator import ENGINES, Runtime, load_bundle

__all__ = ["BUNDLE_FORMAT", "Bundle", "ENGINES", "Runtime", "is_bundle", "load_bundle", "read_bundle"]
