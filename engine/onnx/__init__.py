"""ONNX export, behind :mod:`engine.export`: convert + parity gate, guidance graph, fused attention."""
