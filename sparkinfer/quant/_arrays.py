"""Array aliases shared by the block codecs.

Every codec maps a 2-D array of blocks to a 2-D array of blocks: raw blocks are
uint8[n_blocks, type_size], weights are float32[n_blocks, block_size].
"""

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
F16 = npt.NDArray[np.float16]
