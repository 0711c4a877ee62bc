import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported (Lightning imports it while tests are
# collected), so the CPU interpreter must be chosen here, before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic, small thread count: the suite must behave the same on a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The compiled CPU path is tested on purpose in test_quantize_compiled.py; elsewhere it would
# only add compile time.
os.environ.setdefault("MXPROBE_COMPILE", "0")
