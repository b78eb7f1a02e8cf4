"""Export: a registered model to ONNX with a parity check (:mod:`.onnx`), its float16
variant (:mod:`.fp16`), and TensorRT plans built on a GPU host (:mod:`.tensorrt`,
:mod:`.tensorrt_models`)."""
