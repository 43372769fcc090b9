// cuda_bf16.h for the gpu CPU emulator: everything it declares comes from cuda_emulator.h, which the
// build force-includes in front of every kernel source.
#pragma once
