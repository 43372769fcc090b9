"""The ops: one module per kernel family (cuda_src/<family>.cu), NumPy and kernel paths side by side."""
