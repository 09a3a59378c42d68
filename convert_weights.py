#!/usr/bin/env python3
"""Convert CSM checkpoints between layouts: `python convert_weights.py SRC DST --to csm`.

The converter lives in `csm.convert` (also installed as `csm-convert`); this file keeps the
name people look for at the top of the repository.
"""

from csm.convert import main

if __name__ == "__main__":
    main()
