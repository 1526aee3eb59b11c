// emulator/include/cuda_bf16.h: an empty stand-in for CUDA's header, so a kernel's
// `#include <cuda_bf16.h>` compiles under g++ unchanged. The bf16 types and intrinsics the
// emulator supports are defined in emulator.h, which rawmodule.py force-includes before the kernel.
#pragma once
