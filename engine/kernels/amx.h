// Intel AMX plumbing shared by the kernels that use the tile registers: whether
// the library was built for AMX, asking Linux for the tile state, and the tile
// configuration record.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ENGINE_HAS_AMX 1
#else
#define ENGINE_HAS_AMX 0
#endif

namespace engine_kernels {

// Linux hands out the AMX register state only on request (once per process);
// false where the library is built without AMX or the kernel refuses
inline bool amx_permitted() {
#if ENGINE_HAS_AMX
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
    constexpr long XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#if ENGINE_HAS_AMX
// the 64-byte record LDTILECFG reads (palette 1: 8 tiles of up to 16 rows x 64 bytes)
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// loads a configuration of `count` tiles, tile t being rows[t] rows of 64 bytes
inline void configure_tiles(const int64_t* rows, int count) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < count; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t] ? rows[t] : 1);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}
#endif

}  // namespace engine_kernels
