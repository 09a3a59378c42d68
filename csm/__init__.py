"""csm: Sesame's Conversational Speech Model (CSM-1B), exact and fast, on PyTorch and MLX.

    import csm
    gen = csm.load("unsloth/csm-1b")            # local folder/file or Hub id; backend="auto"
    audio = gen.generate("Hello!", speaker=0)    # float32, 24 kHz, watermarked
"""

from csm.api import Generator, load, load_csm_1b
from csm.errors import CheckpointError, CsmError
from csm.prompt import Segment

__all__ = ["load", "load_csm_1b", "Generator", "Segment", "CsmError", "CheckpointError"]
__version__ = "0.1.0"
