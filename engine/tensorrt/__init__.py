"""TensorRT plans (behind :mod:`engine.build_trt`): profiles, the plan cache, the environment, the builder."""
