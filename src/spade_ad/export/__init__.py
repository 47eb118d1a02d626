"""Writing a bundle for the runtime (`spade-ad export`): `bundle` (the backbone as ONNX or OpenVINO beside the
model file) and `single_graph` (the whole pipeline as one ONNX graph).
"""
