"""XLA FFI handlers written in numba: reading XLA's call frame.

A handler is a numba `cfunc` taking the address of an XLA_FFI_CallFrame
(xla/ffi/api/c_api.h) and returning a null XLA_FFI_Error* for success; XLA
passes its own buffers, so a call costs about as much as any XLA op (a
`jax.pure_callback` copies its arguments to NumPy on every call). Used by
the CPU N:M matmul (`pgf.inference.cpu`) and mask (`pgf.sparsity.mask_kernel`).
"""

from __future__ import annotations

import jax
import numba

# The XLA FFI C API version whose struct layouts the handlers read
# (XLA_FFI_API_MAJOR / _MINOR of the jaxlib headers they were written for).
FFI_API_VERSION = (0, 3)


def _pointer_cast(dtype):
  """An intrinsic turning an int64 address into a typed pointer."""
  ptr = numba.types.CPointer(dtype)

  @numba.extending.intrinsic
  def cast(typingctx, addr):
    del typingctx

    def codegen(context, builder, signature, args):
      del signature
      return builder.inttoptr(args[0], context.get_value_type(ptr))
    return ptr(numba.types.int64), codegen
  return cast


as_i64 = _pointer_cast(numba.types.int64)
as_i32 = _pointer_cast(numba.types.int32)
as_f32 = _pointer_cast(numba.types.float32)
as_u32 = _pointer_cast(numba.types.uint32)


@numba.njit(inline='always')
def buffer_dims(frame, group, i):
  """(data address, rank, address of dims[rank]) of argument (group 5) or
  result (group 10) i of an XLA_FFI_CallFrame seen as int64 words."""
  entries = numba.carray(as_i64(frame[group + 4]), i + 1)
  buf = numba.carray(as_i64(entries[i]), 6)  # XLA_FFI_Buffer.
  return buf[3], buf[4], as_i64(buf[5])


@numba.njit(inline='always')
def buffer(frame, group, i, rank=2):
  """(data address, dims[rank]) of a buffer of known rank (`buffer_dims`)."""
  data, _, dims = buffer_dims(frame, group, i)
  return data, numba.carray(dims, rank)


@numba.njit(inline='always')
def answered_metadata(frame):
  """True if XLA only asks for metadata (then answered here): the FFI API
  version these offsets are for."""
  ext = frame[1]
  if ext == 0:
    return False
  if numba.carray(as_i32(ext + 8), 1)[0] == 1:
    meta = numba.carray(as_i64(ext), 4)[3]
    version = numba.carray(as_i64(meta + 8), 2)
    version[0] = 24  # XLA_FFI_Api_Version struct_size.
    version[1] = 0
    ints = numba.carray(as_i32(meta + 24), 3)
    ints[0] = FFI_API_VERSION[0]
    ints[1] = FFI_API_VERSION[1]
    ints[2] = 0  # No handler traits.
  return True


_LIVE = []


def register(name: str, handler) -> str:
  """Compiles an FFI handler as a cfunc (cached on disk) and registers it
  with XLA as `name`."""
  sig = numba.types.int64(numba.types.CPointer(numba.types.int64))
  cfunc = numba.cfunc(sig, nopython=True, cache=True)(handler)
  # XLA keeps only the function pointer: the cfunc (which owns the machine
  # code) must live as long as the process.
  _LIVE.append(cfunc)
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(cfunc.ctypes),
                              platform='cpu')
  return name
