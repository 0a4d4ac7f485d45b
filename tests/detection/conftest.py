import os
import sys

# The classification parity helpers (tests/models/parity.py: the fixtures' weight rule, the spec
# folder) serve the detection fixtures too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
