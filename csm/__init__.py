"""csm: Sesame's Conversational Speech Model (CSM-1B), exact and fast, on PyTorch and MLX.

    import csm
    gen = csm.load("unsloth/csm-1b")            # local folder/file or Hub id; backend="auto"
    audio = gen.generate("Hello!", speaker=0)    # float32, 24 kHz, watermarked
    with gen.engine(max_batch_size=8) as engine: # many streams sharing one running batch
        for chunk in engine.submit("Hi!", seed=1): ...
"""

from csm.api import Generator, load, load_csm_1b
from csm.conversation import Conversation, Turn
from csm.engine import Engine, EngineFull, Request
from csm.errors import CheckpointError, CsmError
from csm.prompt import Segment
from csm.sampling import Sampling

__all__ = ["load", "load_csm_1b", "Generator", "Engine", "EngineFull", "Request", "Sampling", "Segment",
           "Conversation", "Turn", "CsmError", "CheckpointError"]
__version__ = "0.1.0"
