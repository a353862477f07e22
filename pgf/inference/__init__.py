"""N:M inference: exported N:M models computed with a compressed matmul.

  nm.py       nm_matmul / NMWeights / apply: y = x @ W with W as exported
              (values + in-group indices along the contraction axis);
              backends 'cpu' (numba), 'pallas' (NVIDIA GPUs), 'xla'.
  cpu.py      the CPU kernels (numba, an XLA FFI custom call; the call
              frame is read by pgf.numba_ffi).
  pallas.py   the Pallas GPU kernel (Triton lowering).
  model.py    CompressedModel: a pgf export run through pgf's own model,
              every compressed layer intercepted (ViT classify, T5 decode).
  __main__    python -m pgf.inference --workdir=DIR --batch=N
"""

from pgf.inference.model import CompressedModel
from pgf.inference.model import load
from pgf.inference.nm import NMWeights
from pgf.inference.nm import apply
from pgf.inference.nm import dense_kernel
from pgf.inference.nm import nm_matmul
