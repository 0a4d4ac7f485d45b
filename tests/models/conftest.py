import os
import sys

import torch

# Make the shared parity helpers importable as `parity` from every test module in this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One intra-op thread: on a shared 2-core box two spinning OpenMP threads per process made these
# tests ~15x slower (measured); the models are small enough that one thread loses little.
torch.set_num_threads(1)
