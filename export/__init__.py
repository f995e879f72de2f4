"""Turns the engine's extractor into artifacts (TorchScript, ONNX) and validates them.

* ``torchscript``: trace + freeze, save/load with a description, the on-disk cache the loop uses.
* ``onnx_export``: the dynamo ONNX exporter with dynamic batch/height/width and named outputs.
* ``ort``: an ONNX Runtime extractor with the same call as the torch one.
* ``validate``: every backend against eager, per layer, with timings (``nst validate``).

Builds on ``engine``; ``engine`` reaches in here only for ``--backend torchscript``.
"""
