"""`jaxlm.convert_hf` from a checkout (installed: `jaxlm-convert`): see its docstring."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's jaxlm
from jaxlm import convert_hf  # noqa: E402

if __name__ == "__main__":
    sys.exit(convert_hf.main())
