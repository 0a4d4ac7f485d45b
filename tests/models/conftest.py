import os
import sys

# Make the shared parity helpers importable as `parity` from every test module in this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
