/* What the generated AOT launchers (native/generate.py) call back into: error recording.

   Triton's AOT template exits the process on a CUDA error while loading a module; the generator
   rewrites its CUDA_CHECK to record the error here and return, and the launcher then returns it. */
#pragma once
#include <cuda.h>

void ff_aot_note_error(CUresult result);
/* The error of the last failed module load on this thread (CUDA_ERROR_NOT_INITIALIZED if none). */
CUresult ff_aot_load_error(void);
