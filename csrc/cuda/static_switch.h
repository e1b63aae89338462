// Runtime flags to template constants, for the kernel launchers of csrc/cuda:
//
//   FR_BOOL_SWITCH(has_residual, kResidual, [&] { launch<T, kResidual>(...); });
//
// instantiates the body for both values and runs the one that matches. The flags switched this
// way are the ones that change a kernel's inner loop: has_residual, the layout (rows or planes)
// and whether 16-byte vector accesses are possible.
#pragma once

#define FR_BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                        \
    if (COND) {                                \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static bool CONST_NAME = false;\
      return __VA_ARGS__();                    \
    }                                          \
  }()
