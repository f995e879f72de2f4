"""Turns the engine's extractor into deployable artifacts (TorchScript, ONNX) and validates them.

Empty for now: the exporters arrive with the issue "Compiled extractor: a fused
TorchScript graph for the loop and ONNX Runtime as an independent validator".
"""
