"""seminar-tf: SEMINAR lifelong sequential recommendation in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
