"""The two estimators and what both do with a score: `spade` (`Spade`, `load`: torch), `runtime` (`Runtime`: a
bundle on numpy + ONNX Runtime / OpenVINO, never torch), `detector` (verdicts, thresholds, the `FittedModel`
protocol), `prediction` (`Prediction`) and `opening` (`open_model`: a model file or a bundle, for the front doors).
"""
