"""Model import (HF directories, GGUF files) and, later, QoQ calibration and checkpoints."""
