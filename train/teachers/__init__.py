"""Teachers trained on real labels: the four musicnn 0.1.0 models, ported to torch.

:mod:`rtagger.train.teachers.musicnn` holds the input pipeline and both architectures and
loads converted teachers; :mod:`rtagger.train.teachers.convert` turns musicnn's TensorFlow
checkpoints into safetensors once (``rtagger data teachers``, the only step that needs
TensorFlow); :mod:`rtagger.train.teachers.parity` measures the port against TensorFlow.
"""
